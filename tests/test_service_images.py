"""Upload decoding for the service (visrec.serving.images) and its auth helper: no server needed."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from visrec.serving.images import BadImageError, decode_upload

MB = 1024 * 1024


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def rgb_image(width: int = 40, height: int = 30) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def png_declaring(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR is patched to declare width x height (CRC fixed)."""
    data = bytearray(encode(Image.new("RGB", (2, 2), (10, 20, 30)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def check_rgb(arr: np.ndarray, width: int, height: int) -> None:
    assert arr.dtype == np.uint8 and arr.shape == (height, width, 3) and arr.flags.c_contiguous


def test_rgb_png_roundtrips_exactly():
    image = rgb_image()
    arr = decode_upload(encode(image, "PNG"), 10 * MB, 40_000_000)
    np.testing.assert_array_equal(arr, np.asarray(image))


def test_jpeg_matches_the_pipeline_decoder(tmp_path):
    from visrec.imaging import load_image

    data = encode(rgb_image(64, 48), "JPEG", quality=90)
    (tmp_path / "a.jpg").write_bytes(data)
    reference = load_image(tmp_path / "a.jpg")
    assert np.abs(decode_upload(data).astype(int) - reference.astype(int)).max() <= 2  # IDCT rounding


@pytest.mark.parametrize("mode", ["L", "1", "RGBA", "LA"])
def test_greyscale_and_alpha_become_rgb(mode):
    image = rgb_image().convert(mode)
    arr = decode_upload(encode(image, "PNG"))
    check_rgb(arr, 40, 30)
    if mode in ("L", "LA"):
        assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    if mode == "RGBA":  # alpha dropped, colours kept (as OpenCV IMREAD_COLOR does)
        np.testing.assert_array_equal(arr, np.asarray(rgb_image()))


def test_palette_with_transparency_becomes_rgb():
    image = rgb_image().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    data = encode(image, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).info.get("transparency") is not None
    check_rgb(decode_upload(data), 40, 30)


def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (20, 10), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    arr = decode_upload(data)
    check_rgb(arr, 20, 10)
    assert arr[..., 0].mean() > 200 and arr[..., 1].mean() < 60 and arr[..., 2].mean() < 60


def test_16bit_png_is_scaled_to_8bit():
    ramp = (np.arange(32, dtype=np.uint16)[None, :].repeat(8, axis=0) * 2000)  # 0 .. 62000
    image = Image.new("I;16", (32, 8))
    image.frombytes(ramp.astype("<u2").tobytes())
    data = encode(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    arr = decode_upload(data)
    check_rgb(arr, 32, 8)
    np.testing.assert_array_equal(arr[0, :, 0], (ramp[0].astype(int) // 257).astype(np.uint8))


def test_zero_bytes_refused():
    with pytest.raises(BadImageError, match="zero bytes"):
        decode_upload(b"")


def test_random_bytes_refused():
    with pytest.raises(BadImageError, match="not an image"):
        decode_upload(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())


def test_truncated_jpeg_refused():
    data = encode(rgb_image(200, 150), "JPEG", quality=90)
    with pytest.raises(BadImageError, match="truncated"):
        decode_upload(data[: len(data) // 2])


def test_oversized_upload_refused_before_decoding():
    data = encode(rgb_image(), "PNG")
    with pytest.raises(BadImageError, match="too large.*limit is 100 bytes"):
        decode_upload(data, max_bytes=100)


def test_decompression_bomb_refused_from_the_header():
    data = png_declaring(100_000, 100_000)
    with pytest.raises(BadImageError, match="too large.*40000000 pixels.*refused before decoding"):
        decode_upload(data, 10 * MB, 40_000_000)
    with pytest.raises(BadImageError, match="refused before decoding"):  # the limit is ours, not PIL's
        decode_upload(encode(rgb_image(40, 30), "PNG"), 10 * MB, max_pixels=1000)


def test_decompression_bomb_message_names_the_configured_limit():
    """Pillow's own guard fires at twice its MAX_IMAGE_PIXELS (set by configure_pil): the client
    must read the configured limit (40,000,000), not Pillow's (80,000,000)."""
    from PIL import Image

    from visrec.serving.images import ImageTooLarge, configure_pil

    saved = Image.MAX_IMAGE_PIXELS
    try:
        configure_pil(40_000_000)
        with pytest.raises(ImageTooLarge) as info:
            decode_upload(png_declaring(100_000, 100_000), 10 * MB, 40_000_000)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    assert "40000000" in str(info.value) and "80000000" not in str(info.value)
    assert info.value.status == 413


def test_decoded_format_is_reported():
    from visrec.serving.images import decode_image

    assert decode_image(encode(rgb_image(), "PNG")).extension == ".png"
    assert decode_image(encode(rgb_image(), "JPEG")).extension == ".jpg"


def test_bad_image_error_is_a_value_error():
    assert issubclass(BadImageError, ValueError)


# ----------------------------------------------------------------------------- auth helper


def test_admin_auth_disabled_without_a_token_and_checked_with_one():
    from visrec.serving import check_admin

    status, message = check_admin(None, "Bearer x")
    assert status == 403 and "VISREC_ADMIN_TOKEN" in message
    status, message = check_admin("", "Bearer ")
    assert status == 403
    assert check_admin("s3cret", None)[0] == 401
    assert check_admin("s3cret", "Bearer wrong")[0] == 401
    assert check_admin("s3cret", "Basic s3cret")[0] == 401
    assert check_admin("s3cret", "Bearer s3cret") == (200, "")
    assert check_admin("s3cret", "bearer  s3cret ") == (200, "")
