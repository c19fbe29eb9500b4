"""The edits people make to a photo, applied to a full-resolution image: copies for label-free evaluation.

A *copy* of an image is the same picture after edits like those below. `imgsim eval --copies`,
duplicate-threshold calibration and the copy-detection benchmark all make their copies here, so
they measure the same thing. Every edit is seeded by a `numpy.random.Generator`: the same image,
edit name and generator state give the same bytes.

Two groups:
- `TRAINED_EDITS`: crop, rescale, brightness/contrast, saturation, mirror, greyscale, JPEG, and
  `mix` (the protocol: crop + rescale + colour jitter, mirrored 30 %, greyscale 20 %, JPEG). The
  training recipe's augmentations imitate these.
- `HELD_OUT_EDITS`: edits the recipe never trains with (small rotation, blur, heavier crop,
  changed aspect ratio, overlaid text/logo, a border, WebP, a palette PNG): they measure whether
  the learned invariance generalises rather than memorises the listed edits.

Each edit's ranges are data (`Edit.ranges`), so `--help` and JSON reports print what was done.

    rng = np.random.default_rng([seed, i])
    copy = edit_bytes(original_bytes, "mix", rng)      # bytes, decodable by imgsim.data.decode
    img = apply_edit(pil_image, "greyscale", rng)      # a PIL image (JPEG artefacts included)
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from imgsim.data.decode import apply_orientation, open_image, to_mode

#: How an edited image is stored: (format, save options). Lossless PNG unless the edit is a codec.
Encoding = tuple[str, dict[str, Any]]
_PNG: Encoding = ("PNG", {"compress_level": 1})

_RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Edit:
    """One kind of edit: a name, what it does, its ranges (data), and whether training imitates it."""

    name: str
    description: str
    ranges: Mapping[str, Any]
    held_out: bool
    apply: Callable[[Image.Image, np.random.Generator, Mapping[str, Any]], tuple[Image.Image, Encoding]] = (
        field(repr=False, compare=False)
    )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: name, description, ranges, held_out."""
        ranges = {k: list(v) if isinstance(v, tuple) else v for k, v in self.ranges.items()}
        return {
            "name": self.name,
            "description": self.description,
            "ranges": ranges,
            "held_out": self.held_out,
        }


# -- the building blocks (each draws its own random values from rng, in a fixed order) -------------


def _uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(*lo_hi))


def _crop(img: Image.Image, rng: np.random.Generator, side: tuple[float, float]) -> Image.Image:
    """Keep a fraction in `side` of each side (drawn per side), at a random position."""
    w, h = img.size
    cw = max(1, round(w * _uniform(rng, side)))
    ch = max(1, round(h * _uniform(rng, side)))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def _rescale(img: Image.Image, rng: np.random.Generator, longer: tuple[int, int], filters: tuple[str, ...]):
    """Longer side to a random length in `longer` (aspect kept), with a randomly chosen filter."""
    target = int(rng.integers(longer[0], longer[1] + 1))
    resample = _RESAMPLING[filters[int(rng.integers(len(filters)))]]
    w, h = img.size
    scale = target / max(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)


def _brightness_contrast(img: Image.Image, rng: np.random.Generator, amount: float) -> Image.Image:
    brightness = _uniform(rng, (1 - amount, 1 + amount))
    contrast = _uniform(rng, (1 - amount, 1 + amount))
    img = ImageEnhance.Brightness(img).enhance(brightness)
    return ImageEnhance.Contrast(img).enhance(contrast)


def _saturation(img: Image.Image, rng: np.random.Generator, amount: float) -> Image.Image:
    factor = _uniform(rng, (1 - amount, 1 + amount))
    return img if img.mode == "L" else ImageEnhance.Color(img).enhance(factor)


def _jpeg(rng: np.random.Generator, quality: tuple[int, int]) -> Encoding:
    return ("JPEG", {"quality": int(rng.integers(quality[0], quality[1] + 1))})


# -- trained edits ----------------------------------------------------------------------------------


def _edit_crop(img, rng, r):
    return _crop(img, rng, r["side"]), _PNG


def _edit_rescale(img, rng, r):
    return _rescale(img, rng, r["longer_side"], r["filters"]), _PNG


def _edit_brightness_contrast(img, rng, r):
    return _brightness_contrast(img, rng, r["amount"]), _PNG


def _edit_saturation(img, rng, r):
    return _saturation(img, rng, r["amount"]), _PNG


def _edit_mirror(img, rng, r):
    return ImageOps.mirror(img), _PNG


def _edit_greyscale(img, rng, r):
    return img.convert("L"), _PNG


def _edit_jpeg(img, rng, r):
    return img, _jpeg(rng, r["quality"])


def _edit_mix(img, rng, r):
    """Every trained edit at once, in this order: crop, rescale, colour, mirror?, greyscale?, JPEG."""
    img = _crop(img, rng, r["crop_side"])
    img = _rescale(img, rng, r["longer_side"], r["filters"])
    img = _brightness_contrast(img, rng, r["brightness_contrast"])
    img = _saturation(img, rng, r["saturation"])
    mirror, grey = rng.random() < r["p_mirror"], rng.random() < r["p_greyscale"]
    if mirror:
        img = ImageOps.mirror(img)
    if grey:
        img = img.convert("L")
    return img, _jpeg(rng, r["quality"])


# -- held-out edits (never imitated by training) -----------------------------------------------------


def _edit_rotate(img, rng, r):
    """Rotate by ±(min..max) degrees, then crop the largest upright rectangle with no empty corners."""
    angle = _uniform(rng, r["degrees"]) * (1 if rng.random() < 0.5 else -1)
    w, h = img.size
    rotated = img.rotate(angle, resample=Image.Resampling.BICUBIC, expand=False)
    a = math.radians(abs(angle))
    # inner rectangle of the same aspect ratio that fits inside the rotated frame
    k = min(w / (w * math.cos(a) + h * math.sin(a)), h / (w * math.sin(a) + h * math.cos(a)))
    cw, ch = w * k, h * k
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    return rotated.crop(tuple(round(v) for v in box)), _PNG


def _edit_blur(img, rng, r):
    """Gaussian blur with a radius (sigma) relative to the longer side."""
    radius = _uniform(rng, r["radius_of_longer_side"]) * max(img.size)
    return img.filter(ImageFilter.GaussianBlur(radius)), _PNG


def _edit_heavy_crop(img, rng, r):
    return _crop(img, rng, r["side"]), _PNG


def _edit_aspect(img, rng, r):
    """Stretch one side (chosen at random) by a factor in `stretch`: a changed aspect ratio."""
    factor = _uniform(rng, r["stretch"])
    w, h = img.size
    size = (round(w * factor), h) if rng.random() < 0.5 else (w, round(h * factor))
    return img.resize(size, Image.Resampling.BICUBIC), _PNG


_CAPTIONS = ("© imgsim", "SAMPLE", "holiday 2024", "@photos", "DRAFT", "www.example.com")


def _edit_overlay(img, rng, r):
    """A caption in a random colour and a translucent logo box, at random places."""
    img = img.convert("RGB")
    w, h = img.size
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    # the logo: a filled rounded box with a border
    side = _uniform(rng, r["logo_side"]) * min(w, h)
    x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    alpha = int(255 * _uniform(rng, r["logo_opacity"]))
    draw.rounded_rectangle((x0, y0, x0 + side, y0 + side), radius=side / 5, fill=(*colour, alpha))
    # the caption
    text = _CAPTIONS[int(rng.integers(len(_CAPTIONS)))]
    font = ImageFont.load_default(size=max(8, round(_uniform(rng, r["text_height"]) * h)))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tx = rng.uniform(0, max(1.0, w - (right - left)))
    ty = rng.uniform(0, max(1.0, h - (bottom - top)))
    text_colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    draw.text((tx - left, ty - top), text, font=font, fill=(*text_colour, 255))
    return Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB"), _PNG


def _edit_border(img, rng, r):
    """Pad every side by a fraction of the shorter side, in one solid random colour."""
    pad = max(1, round(_uniform(rng, r["width_of_shorter_side"]) * min(img.size)))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    return ImageOps.expand(img.convert("RGB"), border=pad, fill=colour), _PNG


def _edit_webp(img, rng, r):
    return img, ("WEBP", {"quality": int(rng.integers(r["quality"][0], r["quality"][1] + 1))})


def _edit_png8(img, rng, r):
    """Colour quantisation to a palette (a GIF-like PNG-8), dithered."""
    colours = int(rng.integers(r["colours"][0], r["colours"][1] + 1))
    quantised = img.convert("RGB").quantize(colors=colours, dither=Image.Dither.FLOYDSTEINBERG)
    return quantised, ("PNG", {"compress_level": 1})


# -- the table ---------------------------------------------------------------------------------------

_LONGER = (200, 400)
_FILTERS = ("bilinear", "bicubic", "lanczos")

_TABLE: tuple[Edit, ...] = (
    Edit("crop", "keep 75-95 % of each side at a random position", {"side": (0.75, 0.95)}, False, _edit_crop),
    Edit(
        "rescale",
        "longer side to 200-400 px, aspect kept",
        {"longer_side": _LONGER, "filters": _FILTERS},
        False,
        _edit_rescale,
    ),
    Edit(
        "brightness_contrast",
        "brightness and contrast each x(1 ± 0.3)",
        {"amount": 0.3},
        False,
        _edit_brightness_contrast,
    ),
    Edit("saturation", "saturation x(1 ± 0.5)", {"amount": 0.5}, False, _edit_saturation),
    Edit("mirror", "left-right mirror", {}, False, _edit_mirror),
    Edit("greyscale", "greyscale (one channel)", {}, False, _edit_greyscale),
    Edit("jpeg", "JPEG re-compression, quality 25-60", {"quality": (25, 60)}, False, _edit_jpeg),
    Edit(
        "mix",
        "crop 75-95 %, rescale to 200-400 px, brightness/contrast ±30 %, saturation ±50 %, "
        "mirrored 30 %, greyscale 20 %, JPEG quality 25-60",
        {
            "crop_side": (0.75, 0.95),
            "longer_side": _LONGER,
            "filters": _FILTERS,
            "brightness_contrast": 0.3,
            "saturation": 0.5,
            "p_mirror": 0.3,
            "p_greyscale": 0.2,
            "quality": (25, 60),
        },
        False,
        _edit_mix,
    ),
    Edit(
        "rotate",
        "rotate 5-10 degrees either way, cropped to no empty corners",
        {"degrees": (5.0, 10.0)},
        True,
        _edit_rotate,
    ),
    Edit(
        "blur",
        "Gaussian blur, radius 0.3-0.8 % of the longer side",
        {"radius_of_longer_side": (0.003, 0.008)},
        True,
        _edit_blur,
    ),
    Edit(
        "heavy_crop",
        "keep 50-70 % of each side at a random position",
        {"side": (0.5, 0.7)},
        True,
        _edit_heavy_crop,
    ),
    Edit(
        "aspect",
        "one side (either) scaled by 0.65-0.85: a changed aspect ratio",
        {"stretch": (0.65, 0.85)},
        True,
        _edit_aspect,
    ),
    Edit(
        "overlay",
        "a caption (6-12 % of the height) and a translucent logo box (10-20 % of the shorter side)",
        {"text_height": (0.06, 0.12), "logo_side": (0.1, 0.2), "logo_opacity": (0.5, 0.9)},
        True,
        _edit_overlay,
    ),
    Edit(
        "border",
        "a solid border, 4-12 % of the shorter side on every side",
        {"width_of_shorter_side": (0.04, 0.12)},
        True,
        _edit_border,
    ),
    Edit("webp", "WebP re-encode, quality 20-60", {"quality": (20, 60)}, True, _edit_webp),
    Edit("png8", "palette PNG: 32-128 colours, dithered", {"colours": (32, 128)}, True, _edit_png8),
)

#: Every edit by name, in a stable order (trained first, then held out).
EDITS: Mapping[str, Edit] = MappingProxyType({e.name: e for e in _TABLE})
#: Edits the training recipe imitates (and `mix`, all of them at once).
TRAINED_EDITS: tuple[str, ...] = tuple(e.name for e in _TABLE if not e.held_out)
#: Edits training never sees: they measure generalisation.
HELD_OUT_EDITS: tuple[str, ...] = tuple(e.name for e in _TABLE if e.held_out)


def _get(name: str) -> Edit:
    try:
        return EDITS[name]
    except KeyError:
        raise ValueError(f"unknown edit {name!r}; choose from {', '.join(EDITS)}") from None


def _run(img: Image.Image, name: str, rng: np.random.Generator) -> tuple[Image.Image, Encoding]:
    edit = _get(name)
    img = apply_orientation(img)
    img = img if img.mode in ("RGB", "L") else to_mode(img, 3)
    return edit.apply(img, rng, edit.ranges)


def _encode(img: Image.Image, encoding: Encoding) -> bytes:
    fmt, options = encoding
    if fmt == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def apply_edit(img: Image.Image, name: str, rng: np.random.Generator) -> Image.Image:
    """The edited copy of a loaded PIL image (RGB or L), codec artefacts included (JPEG, WebP)."""
    out, encoding = _run(img, name, rng)
    if encoding[0] == "PNG":
        return out  # lossless: the pixels are the edit's
    with Image.open(io.BytesIO(_encode(out, encoding))) as decoded:
        decoded.load()
        return decoded.copy()


def edit_bytes(data: bytes, name: str, rng: np.random.Generator) -> bytes:
    """The edited copy of an encoded image, encoded as the edit implies (JPEG, WebP, else PNG).

    Raises `imgsim.data.decode.DecodeError` if `data` is not a usable image.
    """
    img = open_image(data)
    out, encoding = _run(img, name, rng)
    return _encode(out, encoding)


def copy_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for copy number `index` of a seeded run: independent of how many copies there are."""
    return np.random.default_rng([seed, index])


def describe_edits(names: tuple[str, ...] | None = None) -> str:
    """One line per edit ("name: description"), for --help."""
    return "\n".join(f"{n}: {_get(n).description}" for n in (names or tuple(EDITS)))


def edits_table(names: tuple[str, ...] | None = None) -> dict[str, dict[str, Any]]:
    """{name: Edit.to_dict()} for JSON reports."""
    return {n: _get(n).to_dict() for n in (names or tuple(EDITS))}
