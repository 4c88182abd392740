"""Decoding and validating uploaded images (pure Python + Pillow; no BentoML needed).

    array = decode_upload(data, max_bytes=10 * 2**20, max_pixels=40_000_000)  # HWC uint8 RGB

Everything a client can send wrong becomes a :class:`BadImageError` (a ``ValueError``) whose
message names the problem, so the service answers 4xx and stays up:

* zero bytes, more than ``max_bytes``, bytes that are no image format Pillow knows;
* a decompression bomb: the size declared in the header is checked BEFORE any pixel is
  decoded (``Image.open`` only reads the header), and refused above ``max_pixels``;
* a truncated or corrupt file (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False, so Pillow raises).

What can be converted is converted to 8-bit RGB, as the rest of the pipeline decodes images
(``visrec.data.datasets.load_image``, OpenCV ``IMREAD_COLOR``): greyscale and palette images
are expanded, alpha is dropped (not composited), CMYK / YCbCr / LAB are converted, 16-bit and
32-bit integer images are scaled to 8 bits, EXIF orientation is ignored (pixels as stored,
like the gallery). Multi-frame files (GIF, TIFF) give their first frame.
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from visrec.serving.errors import BadRequest

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
# Pillow format -> the extension a stored upload gets (from the decoded bytes, never the client's name)
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif",
              "MPO": ".jpg"}


class BadImageError(BadRequest):
    """An upload that is not a usable image (400); the message says why (safe to show a client)."""


class ImageTooLarge(BadImageError):
    """Too many bytes or too many pixels (413)."""

    status = 413


class DecodedImage(NamedTuple):
    array: np.ndarray  # HWC uint8 RGB
    format: str  # Pillow's name of the decoded format, e.g. "JPEG"

    @property
    def extension(self) -> str:
        return EXTENSIONS.get(self.format, "." + "".join(c for c in self.format.lower() if c.isalnum())[:8])


def configure_pil(max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Process-wide Pillow settings for serving: bomb limit and no silent truncation.

    Pillow warns above ``MAX_IMAGE_PIXELS`` and raises above twice that; our own header check
    in :func:`decode_upload` is the real gate, this is a backstop for any other Pillow use.
    """
    Image.MAX_IMAGE_PIXELS = int(max_pixels)
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """A single-channel array of a high bit-depth mode -> uint8 (full range mapped to 0..255)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if arr.size and float(arr.max()) <= 1.0 and float(arr.min()) >= 0.0:
            arr = arr * 255.0
        return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    arr = arr.astype(np.int64)
    if mode.startswith("I;16") or arr.dtype.kind == "u" or (arr.size and arr.max() > 255):
        # 16-bit data (Pillow gives 16-bit PNG greyscale as I;16 or I): 0..65535 -> 0..255
        arr = np.clip(arr, 0, 65535) // 257
    return np.clip(arr, 0, 255).astype(np.uint8)


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        out = np.asarray(image)
    elif mode in ("RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "1", "L", "LA", "La", "P", "PA"):
        # P with a transparency chunk: convert("RGB") uses the palette colours and drops the
        # transparency, as OpenCV does; alpha channels are dropped the same way.
        out = np.asarray(image.convert("RGB"))
    elif mode.startswith("I") or mode == "F":
        grey = _to_uint8(np.asarray(image), mode)
        if grey.ndim != 2:
            raise BadImageError(f"unsupported image layout: mode {mode} with shape {grey.shape}")
        out = np.repeat(grey[:, :, None], 3, axis=2)
    else:
        try:
            out = np.asarray(image.convert("RGB"))
        except (ValueError, OSError) as exc:
            raise BadImageError(f"unsupported image mode {mode!r}: cannot convert it to RGB ({exc})") from None
    out = np.ascontiguousarray(out, dtype=np.uint8)
    if out.ndim != 3 or out.shape[2] != 3:
        raise BadImageError(f"unsupported image mode {mode!r}: converted to shape {out.shape}, not HxWx3")
    return out


def decode_upload(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Validate and decode uploaded image bytes to an HWC uint8 RGB array.

    Raises :class:`BadImageError` (with a message for the client) on anything unusable.
    """
    return decode_image(data, max_bytes, max_pixels).array


def decode_image(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """:func:`decode_upload` with the decoded format (what a stored upload is named after)."""
    if data is None or len(data) == 0:
        raise BadImageError("empty upload: the image file has zero bytes")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"upload too large: {len(data)} bytes, the limit is {max_bytes} bytes "
                            f"({max_bytes / 2**20:.1f} MiB)")
    try:
        image = Image.open(io.BytesIO(data))  # lazy: reads the header only
    except UnidentifiedImageError:
        raise BadImageError("not an image: the bytes are in no image format this server can read "
                            "(send a JPEG, PNG, WebP, BMP, GIF or TIFF file)") from None
    except Image.DecompressionBombError:  # Pillow's own guard (over 2x MAX_IMAGE_PIXELS): name OUR limit
        raise ImageTooLarge(f"image too large: its header declares more than {max_pixels} pixels, the limit "
                            "(refused before decoding)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"corrupt image header: {exc}") from None
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise BadImageError(f"invalid image size {width}x{height}")
        if width * height > max_pixels:
            raise ImageTooLarge(f"image too large: its header declares {width}x{height} = {width * height} "
                                f"pixels, the limit is {max_pixels} (refused before decoding)")
        fmt = image.format or "image"
        try:
            image.load()
        except Image.DecompressionBombError:
            raise ImageTooLarge(f"image too large: more than {max_pixels} pixels, the limit "
                                "(decompression bomb guard)") from None
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
            raise BadImageError(f"corrupt or truncated {fmt} file: {exc}") from None
        try:
            return DecodedImage(_to_rgb(image), image.format or "image")
        except BadImageError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise BadImageError(f"corrupt or truncated {fmt} file: {exc}") from None
