import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from visrec.config import Config, ConfigError, apply_overrides, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_load_and_match_defaults(repo_root):
    cfg = load_config(repo_root / "params.yaml")
    assert isinstance(cfg, Config)
    assert cfg.data.source == "synthetic"
    assert cfg.split.train_classes == 100
    # params.yaml spells out every knob: its keys equal the schema's (down to the fields
    # whose value is a free-form mapping, such as the backbone's options).
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    missing = schema_keys(Config) - present_keys(raw)
    assert not missing, f"params.yaml lacks {sorted(missing)}"


def schema_keys(cls, prefix=""):
    """Dotted names of every field, recursing into sections (dataclasses) only."""
    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.add(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= schema_keys(hints[f.name], f"{prefix}{f.name}.")
    return keys


def present_keys(raw, prefix=""):
    keys = set()
    for k, v in raw.items():
        keys.add(prefix + k)
        if isinstance(v, dict):
            keys |= present_keys(v, f"{prefix}{k}.")
    return keys


def test_unknown_key_names_the_key_and_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown key 'split\.train_clases'.*train_classes"):
        config_from_dict({"split": {"train_clases": 3}})
    with pytest.raises(ConfigError, match=r"unknown key 'spilt'"):
        config_from_dict({"spilt": {}})


@pytest.mark.parametrize(
    ("raw", "pattern"),
    [
        ({"split": {"train_classes": "ten"}}, r"split\.train_classes: expected int, got str"),
        ({"split": {"train_classes": 2.5}}, r"split\.train_classes: expected int"),
        ({"split": {"train_classes": True}}, r"split\.train_classes: expected int, got bool"),
        ({"runtime": {"device": "tpu"}}, r"runtime\.device: expected one of 'auto' \| 'cpu' \| 'gpu'"),
        ({"data": {"synthetic": {"seed": None}}}, r"data\.synthetic\.seed: expected int"),
        ({"data": "cub"}, r"data: expected a mapping"),
    ],
)
def test_wrong_types_name_key_and_expected_type(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(raw)


def test_int_is_accepted_for_float():
    cfg = config_from_dict({"validate": {"max_box_overshoot": 0}})
    assert cfg.validate.max_box_overshoot == 0.0 and isinstance(cfg.validate.max_box_overshoot, float)


def test_dotted_overrides_parse_yaml_values(tmp_path, repo_root):
    params = tmp_path / "params.yaml"
    params.write_text((repo_root / "params.yaml").read_text())
    cfg = load_config(params, ["split.train_classes=25", "data.synthetic.image_size=64",
                               "data.source=/some/where/CUB_200_2011"])
    assert cfg.split.train_classes == 25
    assert cfg.data.synthetic.image_size == 64
    assert cfg.data.source == "/some/where/CUB_200_2011"
    with pytest.raises(ConfigError, match=r"unknown key 'split\.nope'"):
        load_config(params, ["split.nope=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(params, ["split.train_classes"])


def test_override_into_a_value_is_refused():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"split": {"train_classes": 3}}, ["split.train_classes.x=1"])


def test_missing_and_malformed_params_files(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("split: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def _differences(default, loaded, path=""):
    if isinstance(default, dict) and isinstance(loaded, dict):
        return [d for key in sorted(set(default) | set(loaded))
                for d in _differences(default.get(key, "<absent>"), loaded.get(key, "<absent>"),
                                      f"{path}.{key}" if path else key)]
    return [] if default == loaded else [f"{path}: default {default!r}, params.yaml {loaded!r}"]


def test_dataclass_defaults_are_params_yaml():
    """One source of truth: Config() builds what params.yaml builds, field by field."""
    differences = _differences(Config().to_dict(), load_config(REPO / "params.yaml").to_dict())
    assert not differences, "config defaults disagree with params.yaml:\n" + "\n".join(differences)


def test_a_changed_default_is_reported():
    changed = Config()
    changed.extractor.image.size = 96
    assert _differences(changed.to_dict(), Config().to_dict()) == [
        "extractor.image.size: default 96, params.yaml 224"]
