"""Drawing recognition results: boxes and labels (any Unicode) onto the image, as a PNG.

OpenCV's ``putText`` only draws ASCII, and labels such as 元气森林 are ordinary in this field,
so text goes through Pillow with a TrueType font: ``recognition.font`` if set, else the first
CJK-capable font found on the machine, else DejaVu Sans, else Pillow's built-in font. A glyph
the font lacks is drawn as a box; nothing raises.
"""

from __future__ import annotations

import functools
import glob
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

# Where Debian/Ubuntu, Fedora, macOS and Windows keep fonts that cover CJK (checked in order).
_FONT_PATTERNS = (
    "/usr/share/fonts/**/NotoSansCJK*.tt[cf]",
    "/usr/share/fonts/**/NotoSansSC*.[ot]tf",
    "/usr/share/fonts/**/wqy-*.tt[cf]",
    "/usr/share/fonts/**/DroidSansFallback*.ttf",
    "/System/Library/Fonts/PingFang.ttc",
    "C:/Windows/Fonts/msyh.tt[cf]",
    "/usr/share/fonts/**/DejaVuSans.ttf",
)
_PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


@functools.lru_cache(maxsize=8)
def find_font(preferred: str | None = None) -> str | None:
    """A TrueType font path for labels, or None for Pillow's built-in font."""
    if preferred:
        if not Path(preferred).is_file():
            raise FileNotFoundError(f"recognition.font {preferred} not found: give a .ttf/.otf/.ttc path or null")
        return preferred
    for pattern in _FONT_PATTERNS:
        found = sorted(glob.glob(pattern, recursive=True))
        if found:
            return found[0]
    return None


def _load_font(size: int, preferred: str | None) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    path = find_font(preferred)
    if path:
        return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


def draw_results(image: np.ndarray, results: Sequence[dict[str, Any]], font: str | None = None) -> np.ndarray:
    """HWC uint8 RGB image with each result's box and ``label score`` drawn on it."""
    canvas = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    size = max(12, round(min(canvas.size) / 28))
    text_font = _load_font(size, font)
    line = max(2, round(min(canvas.size) / 200))
    for i, result in enumerate(results):
        colour = _PALETTE[i % len(_PALETTE)]
        x1, y1, x2, y2 = (int(v) for v in result["bbox"])
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=line)
        text = f"{result['rec_docs']} {float(result['rec_scores']):.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=text_font)
        y_text = y1 - (bottom - top) - 4 if y1 - (bottom - top) - 4 >= 0 else y1
        left, top, right, bottom = draw.textbbox((x1 + 2, y_text), text, font=text_font)
        draw.rectangle([left - 2, top - 2, right + 2, bottom + 2], fill=colour)
        draw.text((x1 + 2, y_text), text, fill=(255, 255, 255), font=text_font)
    return np.asarray(canvas)


def save_visualization(image: np.ndarray, results: Sequence[dict[str, Any]], path: str | Path,
                       font: str | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(draw_results(image, results, font)).save(path)
    return path
