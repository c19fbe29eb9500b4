"""Decoding every kind of image the same way, and turning every kind of bad file into a reason."""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from imgsim.config import MAX_FILE_BYTES, MAX_IMAGE_PIXELS
from imgsim.data.decode import (
    DecodeError,
    decode_image,
    greyscale_bytes,
    is_greyscale,
    open_image,
    prepare_image,
    try_decode,
)
from imgsim.errors import ImgsimError


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def half_black_half_white(mode: str = "RGB", size: tuple[int, int] = (40, 40)) -> Image.Image:
    """Left half black, right half white."""
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[:, size[0] // 2 :] = 255
    return Image.fromarray(arr).convert(mode)


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG file declaring enormous dimensions (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 100))
        + chunk(b"IEND", b"")
    )


def dark_left_bright_right(out: np.ndarray) -> bool:
    x = out.astype(int)
    return bool(x[..., :6].mean() < 60 and x[..., -6:].mean() > 190)


def test_output_shape_and_dtype() -> None:
    out = decode_image(encode(half_black_half_white(), "PNG"), 16, 3)
    assert out.shape == (3, 16, 16) and out.dtype == np.uint8
    assert decode_image(encode(half_black_half_white(), "PNG"), 16, 1).shape == (1, 16, 16)


@pytest.mark.parametrize("orientation", [3, 6])
def test_exif_orientation_is_applied(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = half_black_half_white("RGB", (60, 40))  # stored: left half black
    out = decode_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95), 16, 1)[0].astype(int)
    if orientation == 3:  # rotated 180°: the viewer sees the black half on the right
        assert out[:, :5].mean() > 200 and out[:, -5:].mean() < 50
    else:  # rotated 90° clockwise: the stored left half is the viewer's top half
        assert out[:5, :].mean() < 50 and out[-5:, :].mean() > 200


def test_broken_exif_does_not_lose_the_image() -> None:
    data = encode(half_black_half_white(), "JPEG", exif=b"Exif\x00\x00garbage-not-tiff")
    assert dark_left_bright_right(decode_image(data, 16, 1))


def test_alpha_is_composited_on_white() -> None:
    clear = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # fully transparent black
    assert decode_image(encode(clear, "PNG"), 8, 3).min() == 255
    half = Image.new("RGBA", (20, 20), (0, 0, 0, 128))  # half-transparent black: mid grey
    assert 120 <= int(decode_image(encode(half, "PNG"), 8, 1).mean()) <= 135
    grey_alpha = Image.new("LA", (20, 20), (0, 0))
    assert decode_image(encode(grey_alpha, "PNG"), 8, 1).min() == 255


@pytest.mark.parametrize("fmt", ["GIF", "PNG"])
def test_palette_transparency_is_white(fmt: str) -> None:
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (10, 0, 20, 20))  # right half: opaque red
    out = decode_image(encode(img, fmt, transparency=0), 8, 3).astype(int)
    assert out[:, :, :3].min() == 255  # the transparent (black) index shows as white
    assert out[0, :, -3:].min() > 200 and out[1, :, -3:].max() < 50  # red stays red


@pytest.mark.parametrize(
    "make,fmt",
    [
        (lambda: half_black_half_white("RGB"), "JPEG"),
        (lambda: half_black_half_white("CMYK"), "JPEG"),
        (lambda: half_black_half_white("P"), "GIF"),
        (lambda: half_black_half_white("L"), "PNG"),
        (lambda: half_black_half_white("LA"), "PNG"),
        (lambda: half_black_half_white("RGBA"), "PNG"),
        (lambda: half_black_half_white("1"), "PNG"),
        (lambda: half_black_half_white("RGB"), "WEBP"),
        (lambda: half_black_half_white("RGB"), "BMP"),
        (lambda: half_black_half_white("RGB"), "TIFF"),
        (lambda: half_black_half_white("CMYK"), "TIFF"),
        (lambda: Image.fromarray(np.asarray(half_black_half_white("L"), np.uint16) * 257), "PNG"),
        (lambda: Image.fromarray(np.asarray(half_black_half_white("L"), np.float32) / 255), "TIFF"),
        (lambda: Image.fromarray(np.asarray(half_black_half_white("L"), np.int32) * 257), "TIFF"),
    ],
    ids=["jpeg", "cmyk-jpeg", "gif", "grey", "grey-alpha", "rgba", "1-bit", "webp", "bmp", "tiff",
         "cmyk-tiff", "16-bit", "float", "32-bit"],
)  # fmt: skip
@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_decodes_consistently(make: Callable[[], Image.Image], fmt: str, channels: int) -> None:
    out = decode_image(encode(make(), fmt), 16, channels)
    assert out.shape == (channels, 16, 16)
    assert dark_left_bright_right(out)  # the same picture whatever the mode


def test_cmyk_keeps_colours() -> None:
    red = Image.new("RGB", (16, 16), (255, 0, 0)).convert("CMYK")
    r, g, b = decode_image(encode(red, "JPEG", quality=95), 8, 3).reshape(3, -1).mean(axis=1)
    assert r > 200 and g < 60 and b < 60


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    arr = np.full((10, 10), 32768, dtype=np.uint16)
    out = decode_image(encode(Image.fromarray(arr), "PNG"), 8, 1)
    assert 125 <= int(out.mean()) <= 130


def test_greyscale_input_gives_equal_rgb_channels() -> None:
    out = decode_image(encode(half_black_half_white("L"), "PNG"), 16, 3)
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_images_use_the_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (10, 10), (0, 0, 0)), Image.new("RGB", (10, 10), (255, 255, 255))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert decode_image(data, 8, 1).max() < 10


def test_centre_crop_keeps_aspect_ratio() -> None:
    wide = np.zeros((20, 60), dtype=np.uint8)
    wide[:, 20:40] = 255  # a white band in the middle third
    out = decode_image(encode(Image.fromarray(wide), "PNG"), 20, 1)[0]
    assert out.mean() > 240  # only the central square is kept, not a squashed whole
    tall = np.ascontiguousarray(wide.T)
    assert decode_image(encode(Image.fromarray(tall), "PNG"), 20, 1)[0].mean() > 240


def test_small_images_are_upscaled() -> None:
    assert dark_left_bright_right(decode_image(encode(half_black_half_white("L", (8, 8)), "PNG"), 32, 1))


def test_large_jpegs_are_drafted_and_match_a_full_decode() -> None:
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).resize((2400, 1800))
    data = encode(big, "JPEG", quality=90)
    assert max(open_image(data, draft_size=32).size) <= 600  # decoded at 1/4 scale or less
    drafted = decode_image(data, 32, 3).astype(int)
    full = prepare_image(Image.open(io.BytesIO(data)), 32, 3).astype(int)
    assert np.abs(drafted - full).mean() < 4


def test_decompression_bomb_guard_is_on() -> None:
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS
    # just over the limit (Pillow would only warn) and far over it (Pillow raises): both refused
    for width, height in [(10_000, MAX_IMAGE_PIXELS // 10_000 + 1), (40_000, 40_000)]:
        started = time.perf_counter()
        with pytest.raises(DecodeError, match="decompression bomb"):
            decode_image(bomb_png(width, height), 16, 1)
        assert time.perf_counter() - started < 1  # refused from the header, nothing allocated


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty file"),
        (b"hello, I am a text file", "not an image"),
        (encode(half_black_half_white(), "JPEG")[:200], "truncated"),
        (encode(half_black_half_white(), "PNG")[:60], "truncated"),
        (encode(half_black_half_white(), "GIF")[:40], "truncated"),
        (bomb_png(40_000, 40_000), "decompression bomb"),
        (b"\xff" * (MAX_FILE_BYTES + 1), "file too large"),
    ],
    ids=["empty", "text", "truncated-jpeg", "truncated-png", "truncated-gif", "bomb", "too-large"],
)
def test_bad_input_becomes_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason) as caught:
        decode_image(data, 16, 1)
    assert isinstance(caught.value, ImgsimError) and len(caught.value.reason) < 200
    arr, why = try_decode(data, 16, 1)
    assert arr is None and why is not None and reason in why


def test_file_size_limit_can_be_lowered() -> None:
    data = encode(half_black_half_white(), "PNG")
    assert try_decode(data, 8, 1, max_bytes=len(data))[1] is None
    assert "file too large" in str(try_decode(data, 8, 1, max_bytes=len(data) - 1)[1])


def test_bad_arguments_are_programming_errors_not_bad_images() -> None:
    with pytest.raises(ValueError, match="channels"):
        decode_image(encode(half_black_half_white(), "PNG"), 16, 2)


def test_greyscale_detection() -> None:
    assert is_greyscale(open_image(encode(half_black_half_white("L"), "PNG")))
    assert is_greyscale(open_image(encode(half_black_half_white("P"), "GIF")))
    assert greyscale_bytes(encode(half_black_half_white("RGB"), "JPEG"))  # grey content saved as RGB
    assert greyscale_bytes(encode(Image.new("RGB", (4, 4), (255, 0, 0)), "PNG")) is False
    assert greyscale_bytes(b"not an image") is None
