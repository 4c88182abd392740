"""Loading settings: ``params.yaml`` plus dotted command-line overrides (``-o section.key=value``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from visrec.config.schema import Config, ConfigError
from visrec.config.validation import build


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'split.train_classes=100'`` -> (['split', 'train_classes'], 100); values are YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. split.train_classes=100")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r}: empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any] | None) -> Config:
    return build(Config, raw or {})


def load_config(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such params file (run from the repository root or pass --params)")
    with path.open(encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    try:
        return config_from_dict(apply_overrides(raw, overrides or []))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def stage_argparser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "-o", "--override", action="append", default=[], metavar="KEY=VALUE",
        help="dotted override, e.g. -o split.train_classes=25 (repeatable)",
    )
    return parser


def load_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.params, args.override)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a.b.c': value}; used for logging params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
