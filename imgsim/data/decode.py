"""Bytes → the model's input. THE preprocessing function, shared by training, indexing and queries.

`decode_image(data, image_size, channels)` returns a uint8 array of shape (C, S, S). Nothing else
in the project may resize or convert an image, so a query is preprocessed exactly like the images
the model was trained and indexed on.

Steps, in order:
1. Guards: empty input, more than `MAX_FILE_BYTES`, more than `MAX_IMAGE_PIXELS` pixels (Pillow's
   decompression-bomb guard stays on; its warning counts as an error too).
2. Decode the first frame (animations); JPEGs are decoded at a reduced scale with `draft()` when
   they are at least twice the target size, which is several times faster.
3. EXIF orientation applied, so a photo looks as a viewer shows it. An image of more than
   `STRIP_REDUCE_PIXELS` is first reduced (box average by a whole factor, keeping at least three
   times the target size) strip by strip, its mode converted strip by strip too: preprocessing then
   holds the decoded image and a far smaller copy, not the four or five full-size buffers that
   converting and compositing a large RGBA image whole would (bench/hostile.py measures it).
4. Mode → L (channels=1) or RGB (channels=3): palette, CMYK, YCbCr, 1-bit, 16-bit and 32-bit
   integer (scaled, not clipped), float; alpha (RGBA, LA, PA, palette transparency) is composited
   on white, so transparent backgrounds look alike whatever colour the hidden pixels have.
5. Resize policy — *shorter side to S, then centre crop*: the aspect ratio is kept (no squashing,
   which would distort shapes differently for each aspect ratio) and the whole S×S input is
   picture (no padding bars: padded inputs would look similar because of their bars, and
   similarity search would group images by aspect ratio instead of content). The price is that
   the edges of elongated images are cut off. Resampling is antialiased (Pillow's bilinear filter
   widens with the scale factor), resizing only the cropped region.

Every way an input can fail becomes a `DecodeError` with a short reason, so pipelines can skip and
report instead of crashing.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from imgsim.config import MAX_FILE_BYTES, MAX_IMAGE_PIXELS
from imgsim.errors import ImgsimError

# Keep Pillow's decompression-bomb guard on, at an explicit limit (we also check it ourselves, so a
# library elsewhere that switches Pillow's guard off does not switch ours off).
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False

#: Modes that hold no colour.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
#: Where `open_image` keeps a draft-decoded JPEG's full size (PIL's `info` survives `draft`).
ORIGINAL_SIZE_KEY = "imgsim_original_size"
#: Above this many pixels, `prepare_image` reduces strip by strip before converting (memory bound).
STRIP_REDUCE_PIXELS = 4_000_000
#: Pixels per strip of that reduction.
STRIP_PIXELS = 1 << 20
#: EXIF orientation → the transposition that undoes it (as `ImageOps.exif_transpose` applies them).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
#: Largest channel difference (0-255) that still counts as grey: JPEG chroma noise stays below it.
GREY_TOLERANCE = 12


class DecodeError(ImgsimError):
    """An input that is not a usable image; `reason` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def image_size_of(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image's header, without decoding it; None if it cannot be read."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:  # noqa: BLE001 - an unreadable header: decoding will give the reason
        return None


def open_image(
    data: bytes,
    draft_size: int | None = None,
    *,
    max_bytes: int = MAX_FILE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Open and fully load an image from bytes (first frame only) with both size guards on.

    With `draft_size`, a JPEG much larger than needed is decoded at a reduced scale (`draft`),
    leaving both sides >= `draft_size`. `max_pixels` may lower the pixel limit (never raise it
    above `MAX_IMAGE_PIXELS`).
    """
    max_pixels = min(max_pixels, MAX_IMAGE_PIXELS)
    if not data:
        raise DecodeError("empty file")
    if len(data) > max_bytes:
        raise DecodeError(f"file too large ({len(data):,} bytes > {max_bytes:,})")
    size = ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            size = f"{width}x{height} pixels, "
            if width * height > max_pixels:
                raise Image.DecompressionBombError(size)
            if width < 1 or height < 1:
                raise DecodeError(f"image has no pixels ({width}x{height})")
            if draft_size and img.format in ("JPEG", "MPO"):
                img.info[ORIGINAL_SIZE_KEY] = (width, height)  # draft() reduces img.size
                img.draft(img.mode, (draft_size, draft_size))
            img.load()  # first frame of an animation; raises on truncation
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DecodeError(f"image too large ({size}limit {max_pixels:,}): decompression bomb guard") from None
    except UnidentifiedImageError:
        raise DecodeError("not an image (unrecognised format)") from None
    except MemoryError:
        raise DecodeError("image too large to decode (out of memory)") from None
    except Exception as e:  # Pillow raises many types on corrupt input; all mean "bad file"
        raise DecodeError(f"corrupt or truncated image ({_short(e)})") from None
    return img


def _short(e: BaseException, limit: int = 120) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def orientation_of(img: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored); a broken EXIF block counts as 1."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a broken EXIF block must not lose an otherwise good image
        return 1
    return orientation if orientation in _ORIENTATION_TRANSPOSE else 1


def apply_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF orientation tag says; a broken EXIF block leaves the image as is."""
    if orientation_of(img) == 1:
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose an otherwise good image
        return img


def _wide_top(img: Image.Image) -> float:
    """The value a 16/32-bit or float greyscale image's white stands for, from its mode and peak."""
    if img.mode.startswith("I;16"):
        return 65535.0
    extrema = img.getextrema()
    peak = float(extrema[1]) if extrema and extrema[1] is not None else 0.0
    if img.mode == "F" and peak <= 1.0:
        return 1.0  # float images in [0, 1]
    if peak <= 255:
        return 255.0  # 8-bit values stored in a wide mode
    if peak <= 65535:
        return 65535.0  # 16-bit values stored in a wide mode
    return peak


def _wide_to_l(img: Image.Image, top: float | None = None) -> Image.Image:
    """16/32-bit integer or float greyscale → 8-bit L, scaled by the range the mode implies."""
    top = _wide_top(img) if top is None else top
    arr = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")


def to_mode(img: Image.Image, channels: int, *, wide_top: float | None = None) -> Image.Image:
    """Convert any Pillow mode to L (channels=1) or RGB (channels=3); alpha is composited on white.
    `wide_top`: for a strip of a 16/32-bit image, the whole image's white (`_wide_top`)."""
    if img.mode in _WIDE_MODES:
        img = _wide_to_l(img, wide_top)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    if img.mode == target:
        return img
    if target == "L" and img.mode not in ("RGB", "1", "P"):
        img = img.convert("RGB")  # CMYK, YCbCr, ... reach L through RGB, like everything else
    return img.convert(target)


def resize_centre_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size` and keep the centre `size`×`size` (one resampling step)."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return img.resize(
        (size, size),
        Image.Resampling.BILINEAR,
        box=(left, top, left + side, top + side),
        reducing_gap=3.0,
    )


def _check_shape(image_size: int, channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")


def reduce_large(img: Image.Image, min_side: int, channels: int) -> Image.Image | None:
    """`img` in mode L or RGB, oriented, box-reduced by the largest whole factor that keeps its shorter
    side >= `min_side`, converted and reduced one strip of rows at a time so that no second full-size
    buffer exists; None when it has no more than `STRIP_REDUCE_PIXELS` or no factor of 2 fits."""
    width, height = img.size
    factor = min(width, height) // max(1, min_side)
    if width * height <= STRIP_REDUCE_PIXELS or factor < 2:
        return None
    orientation = orientation_of(img)
    wide_top = _wide_top(img) if img.mode in _WIDE_MODES else None
    rows = max(1, STRIP_PIXELS // width // factor) * factor
    reduced: Image.Image | None = None
    for top in range(0, height, rows):
        strip = img.crop((0, top, width, min(height, top + rows)))
        strip = to_mode(strip, channels, wide_top=wide_top).reduce(factor)
        if reduced is None:
            reduced = Image.new(strip.mode, (-(-width // factor), -(-height // factor)))
        reduced.paste(strip, (0, top // factor))
    assert reduced is not None
    return reduced if orientation == 1 else reduced.transpose(_ORIENTATION_TRANSPOSE[orientation])


def prepare_image(img: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """A loaded PIL image → uint8 (C, S, S): orientation, mode, resize. Used for every input kind.

    A large image is reduced strip by strip first (`reduce_large`, down to three times `image_size`,
    what the resize's own reduction step keeps), so its memory stays near one decoded buffer."""
    _check_shape(image_size, channels)
    reduced = reduce_large(img, 3 * image_size, channels)
    img = reduced if reduced is not None else to_mode(apply_orientation(img), channels)
    img = resize_centre_crop(img, image_size)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None, :, :].copy() if channels == 1 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def decode_image(
    data: bytes,
    image_size: int,
    channels: int,
    *,
    max_bytes: int = MAX_FILE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Decode image bytes to uint8 (C, S, S); raises `DecodeError` with a reason for bad input."""
    return decode_image_and_size(data, image_size, channels, max_bytes=max_bytes, max_pixels=max_pixels)[0]


def decode_image_and_size(
    data: bytes,
    image_size: int,
    channels: int,
    *,
    max_bytes: int = MAX_FILE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[np.ndarray, tuple[int, int]]:
    """`decode_image`, and the original image's (width, height) in pixels (before any reduction)."""
    _check_shape(image_size, channels)
    img = open_image(data, draft_size=image_size, max_bytes=max_bytes, max_pixels=max_pixels)
    size = img.info.get(ORIGINAL_SIZE_KEY, img.size)
    try:
        return prepare_image(img, image_size, channels), size
    except MemoryError:
        raise DecodeError("image too large to decode (out of memory)") from None
    except Exception as e:  # e.g. a mode Pillow cannot convert (LAB, HSV): a bad input, not a crash
        raise DecodeError(f"could not convert image ({_short(e)})") from None


def try_decode(
    data: bytes, image_size: int, channels: int, *, max_bytes: int = MAX_FILE_BYTES
) -> tuple[np.ndarray | None, str | None]:
    """`decode_image` as a value: (array, None) on success, (None, reason) on failure."""
    try:
        return decode_image(data, image_size, channels, max_bytes=max_bytes), None
    except DecodeError as e:
        return None, e.reason


def is_greyscale(img: Image.Image) -> bool:
    """True if the image holds no colour: a grey mode, or colour channels that (nearly) agree.

    The content is checked, not only the mode, so a greyscale photo saved as RGB JPEG counts as grey.
    """
    if img.mode in GREY_MODES:
        return True
    small = img.copy()
    small.thumbnail((64, 64))
    rgb = np.asarray(to_mode(small, 3), dtype=np.int16)
    spread = (
        np.abs(rgb[..., 0] - rgb[..., 1]).max(initial=0),
        np.abs(rgb[..., 1] - rgb[..., 2]).max(initial=0),
    )
    return bool(max(spread) <= GREY_TOLERANCE)


def greyscale_bytes(data: bytes) -> bool | None:
    """Whether the image in `data` is greyscale (None if it cannot be opened). For channel detection."""
    try:
        return is_greyscale(open_image(data, draft_size=64))
    except DecodeError:
        return None
