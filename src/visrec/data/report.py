"""The data report of the ``validate`` stage: counts, a class histogram and a contact sheet."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from visrec.data.cub import DataLayoutError, read_cub  # noqa: E402
from visrec.data.validation_result import ValidationResult  # noqa: E402
from visrec.utils.fs import atomic_write_text, write_json  # noqa: E402

logger = logging.getLogger(__name__)

SPLIT_COLOURS = {"train": "tab:blue", "test": "tab:orange"}


def split_counts(manifest: pd.DataFrame) -> dict[str, Any]:
    """Per split (and overall): images, classes, and min/median/max images per class."""
    parts = {"all": manifest, **{s: manifest[manifest["split"] == s] for s in SPLIT_COLOURS}}
    counts: dict[str, Any] = {}
    for name, part in parts.items():
        per_class = part.groupby("label").size()
        counts[name] = {
            "images": int(len(part)),
            "classes": int(per_class.size),
            "per_class": {
                "min": int(per_class.min()) if per_class.size else 0,
                "median": float(per_class.median()) if per_class.size else 0.0,
                "max": int(per_class.max()) if per_class.size else 0,
            },
        }
    return counts


def class_histogram(manifest: pd.DataFrame, path_png: str | Path) -> Path:
    """Bar chart of images per class, stacked by split (train and test coloured differently)."""
    path_png = Path(path_png)
    table = manifest.groupby(["label", "split"]).size().unstack(fill_value=0)
    table = table.reindex(columns=list(SPLIT_COLOURS), fill_value=0)
    labels = table.index.to_numpy()
    fig, ax = plt.subplots(figsize=(min(24.0, max(6.0, 0.12 * len(labels) + 2)), 4))
    bottom = np.zeros(len(labels))
    for split, colour in SPLIT_COLOURS.items():
        values = table[split].to_numpy()
        if values.any():
            ax.bar(labels, values, bottom=bottom, width=0.85, color=colour,
                   label=f"{split} ({int(values.sum())} images, {int((values > 0).sum())} classes)")
        bottom += values
    ax.set_xlabel("class id")
    ax.set_ylabel("images")
    ax.set_title(f"Images per class ({len(manifest)} images, {len(labels)} classes)")
    if len(labels):
        ax.set_xlim(labels.min() - 1, labels.max() + 1)
        ax.set_ylim(0, bottom.max() * 1.25 + 1)  # headroom so the legend covers no bar
        ax.legend(loc="upper right", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path_png, dpi=100)
    plt.close(fig)
    return path_png


def _class_names(raw_root: Path) -> dict[int, str]:
    """Class id -> readable name (``001.Black_footed_Albatross`` -> ``Black footed Albatross``)."""
    try:
        classes = read_cub(raw_root).classes
    except (DataLayoutError, OSError) as exc:
        logger.warning("contact sheet without class names: %s", exc)
        return {}
    return {cid: name.split(".", 1)[-1].replace("_", " ") for cid, name in classes.items()}


def _read_rgb(path: Path) -> np.ndarray | None:
    try:
        image = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    except OSError:
        return None
    if image is None:
        return None
    if image.ndim == 2:  # greyscale: show it as grey RGB so the green box stays green
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def contact_sheet(manifest: pd.DataFrame, raw_root: str | Path, path_png: str | Path,
                  n: int = 16, seed: int = 0) -> Path:
    """A grid of ``n`` random decodable images, each with its box in green and its label."""
    path_png = Path(path_png)
    raw_root = Path(raw_root)
    candidates = manifest[manifest["decodes"]] if "decodes" in manifest else manifest
    rng = np.random.default_rng(seed)
    take = min(n, len(candidates))
    picks = candidates.iloc[np.sort(rng.choice(len(candidates), size=take, replace=False))] if take else candidates
    names = _class_names(raw_root)
    cols = max(1, int(np.ceil(np.sqrt(max(take, 1)))))
    rows = max(1, int(np.ceil(take / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (_, row) in zip(axes.flat, picks.iterrows()):
        image = _read_rgb(raw_root / row["path"])
        if image is None:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.imshow(image)
        if pd.notna(row.get("box_w")):
            ax.add_patch(Rectangle((row["box_x"], row["box_y"]), row["box_w"], row["box_h"],
                                   fill=False, edgecolor="lime", linewidth=2))
        name = names.get(int(row["label"]), "")
        title = f"{row['label']} {name}"[:30]
        ax.set_title(f"{title}\n{row['split']} id {row['unique_id']}", fontsize=8)
        ax.set_xlim(0, image.shape[1])
        ax.set_ylim(image.shape[0], 0)
    if not take:
        axes.flat[0].text(0.5, 0.5, "no decodable images", ha="center", va="center")
    fig.tight_layout()
    path_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path_png, dpi=100)
    plt.close(fig)
    return path_png


def _markdown(counts: dict[str, Any], result: ValidationResult) -> str:
    s = result.stats
    lines = [
        "# Data report",
        "",
        f"Validation: **{'passed' if result.success else 'FAILED'}**"
        + (f" (failed rules: {', '.join(result.failed_rules)})" if result.failed_rules else ""),
        "",
        "| split | images | classes | per class min | median | max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, c in counts.items():
        pc = c["per_class"]
        lines.append(f"| {name} | {c['images']} | {c['classes']} | {pc['min']} | {pc['median']:g} | {pc['max']} |")
    lines += [
        "",
        f"Boxes clipped at the image edge: {s['boxes_clipped']}; greyscale images: {s['greyscale_images']}; "
        f"missing files: {s['missing_files']}; undecodable files: {s['undecodable_files']}.",
        "",
        "| rule | result | offending |",
        "|---|---|---:|",
    ]
    for r in result.rules:
        lines.append(f"| {r['rule']} | {'ok' if r['success'] else 'FAILED'} | {r['unexpected_count']} |")
    lines += [
        "",
        "## Images per class",
        "",
        "![images per class](class_histogram.png)",
        "",
        "## Sample images with their boxes",
        "",
        "![contact sheet](contact_sheet.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(manifest: pd.DataFrame, result: ValidationResult, raw_root: str | Path,
                 out_dir: str | Path, n_samples: int = 16) -> Path:
    """Write ``report/`` (counts.json, class_histogram.png, contact_sheet.png, report.md)."""
    report_dir = Path(out_dir) / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    counts = split_counts(manifest)
    write_json(report_dir / "counts.json", counts)
    class_histogram(manifest, report_dir / "class_histogram.png")
    contact_sheet(manifest, raw_root, report_dir / "contact_sheet.png", n=n_samples)
    atomic_write_text(report_dir / "report.md", _markdown(counts, result))
    return report_dir
