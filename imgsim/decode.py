"""Bytes → the model's input. THE preprocessing function, shared by training, indexing and queries.

`decode_image` returns a uint8 array of shape (C, S, S). Every way an input can fail becomes a
`DecodeError` with a short reason, so pipelines can skip and report instead of crashing.

Resize policy: the image is scaled so that its *shorter* side is S and the centre S×S is kept
(centre crop). This keeps the aspect ratio (no squashing), fills the whole input (no padding bars
that would make every letterboxed photo look alike) and loses only the edges of elongated images.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from imgsim.config import MAX_FILE_BYTES, MAX_IMAGE_PIXELS
from imgsim.errors import ImgsimError

# Keep Pillow's decompression-bomb guard on, at an explicit limit.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False

_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "La"}


class DecodeError(ImgsimError):
    """An input that is not a usable image; `reason` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def open_image(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Open and fully load an image from bytes (first frame only) with the bomb guard on.

    With `draft_size`, a JPEG larger than needed is decoded at a reduced scale (`draft`), which is
    much faster and still leaves both sides >= `draft_size`.
    """
    if not data:
        raise DecodeError("empty file")
    if len(data) > MAX_FILE_BYTES:
        raise DecodeError(f"file too large ({len(data):,} bytes > {MAX_FILE_BYTES:,})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if draft_size and img.format == "JPEG":
                img.draft(img.mode, (draft_size, draft_size))
            img.load()  # first frame of an animation; raises on truncation
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"image too large (decompression bomb guard): {e}") from None
    except UnidentifiedImageError:
        raise DecodeError("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError(f"corrupt or truncated image: {e}") from None
    return img


def is_greyscale(img: Image.Image) -> bool:
    """True for greyscale modes, and for palette images whose palette is all grey."""
    if img.mode in _GREY_MODES:
        return True
    if img.mode == "P":
        palette = img.getpalette() or []
        rgb = np.asarray(palette[: (len(palette) // 3) * 3], dtype=np.int16).reshape(-1, 3)
        return bool(np.all(rgb[:, 0] == rgb[:, 1]) and np.all(rgb[:, 1] == rgb[:, 2]))
    return False


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow mode to L (channels=1) or RGB (channels=3); alpha is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def resize_centre_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size`, then keep the centre `size`×`size`."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def prepare_image(img: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """A loaded PIL image → uint8 (C, S, S): orientation, mode, resize. Used for every input kind."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    with contextlib.suppress(Exception):  # a broken EXIF block must not lose an otherwise good image
        img = ImageOps.exif_transpose(img)
    img = resize_centre_crop(to_mode(img, channels), image_size)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None, :, :].copy() if channels == 1 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def decode_image(data: bytes, image_size: int, channels: int) -> np.ndarray:
    """Decode image bytes to uint8 (C, S, S); raises `DecodeError` with a reason for bad input."""
    img = open_image(data, draft_size=image_size)
    try:
        return prepare_image(img, image_size, channels)
    except (OSError, ValueError) as e:
        raise DecodeError(f"could not convert image: {e}") from None


def try_decode(data: bytes, image_size: int, channels: int) -> tuple[np.ndarray | None, str | None]:
    """`decode_image` as a value: (array, None) on success, (None, reason) on failure."""
    try:
        return decode_image(data, image_size, channels), None
    except DecodeError as e:
        return None, e.reason


def greyscale_bytes(data: bytes) -> bool | None:
    """Whether the image in `data` is greyscale (None if it cannot be opened). For channel detection."""
    try:
        return is_greyscale(open_image(data))
    except DecodeError:
        return None
