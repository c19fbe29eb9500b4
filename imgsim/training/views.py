"""Training views for the pretrained-trunk autoencoder: several edits of one image at once.

`train_view(img, rng)` makes one edited copy of a PIL image the way people's copies of a picture
differ from it, several edits together: a crop keeping 30-100 % of each side (the aspect may change),
a typical web size, a stretch, a mirror, a small rotation (with a coloured fill or enlarged canvas),
brightness/contrast/colour, greyscale, blur, a box and a word of text on top, a border, and a
re-encode as JPEG (quality 30-95) or PNG. `view_array` decodes that copy with the same preprocessing
every query gets (`imgsim.data.decode.decode_image`), so a view is exactly what the trunk would see
if a user searched with it.

The edits are deliberately broad (the trunk already knows what things look like; the head learns
which differences do not make another picture). Evaluation keeps edits no view ever makes
(`imgsim.evaluation.unseen`: perspective, noise, pixelation, hue shifts, stickers, ...), so what
`bench.copydetect` calls "unseen" is unseen.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from imgsim.data.decode import decode_image

_WORDS = (
    "photo",
    "copy",
    "2019",
    "my trip",
    "REPOST",
    "hello",
    "#tbt",
    "fotos",
    "X",
    "Lorem ipsum",
    "(c)",
    "NEW",
)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = (int(c) for c in rng.integers(0, 256, 3))
    return r, g, b


def _crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    cw, ch = round(w * _u(rng, 0.3, 1.0)), round(h * _u(rng, 0.3, 1.0))
    if max(cw, ch) / max(1, min(cw, ch)) > 2.2:  # not a sliver
        cw = ch = min(cw, ch) if rng.random() < 0.5 else max(cw, ch)
    cw, ch = max(1, min(cw, w)), max(1, min(ch, h))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def _overlay(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A translucent box and/or a word of text, as captions, watermarks and stickers are."""
    img = img.convert("RGBA")
    w, h = img.size
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    if rng.random() < 0.6:
        s = _u(rng, 0.08, 0.3) * min(w, h)
        x0, y0 = rng.uniform(0, max(1.0, w - s)), rng.uniform(0, max(1.0, h - s))
        draw.rectangle(
            (x0, y0, x0 + s * _u(rng, 0.5, 2), y0 + s), fill=(*_colour(rng), int(255 * _u(rng, 0.4, 1)))
        )
    text = _WORDS[int(rng.integers(len(_WORDS)))]
    font = ImageFont.load_default(size=max(8, round(_u(rng, 0.05, 0.15) * h)))
    draw.text((rng.uniform(0, w * 0.7), rng.uniform(0, h * 0.85)), text, font=font, fill=(*_colour(rng), 255))
    return Image.alpha_composite(img, layer).convert("RGB")


def train_view(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str, int]:
    """One edited copy of `img` (several edits at once; see the module docstring): (image, format, quality)."""
    img = img.convert("RGB")
    if rng.random() < 0.9:
        img = _crop(img, rng)
    w, h = img.size
    scale = int(rng.integers(160, 400)) / max(w, h)  # a typical web size (also keeps the edits cheap)
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    if rng.random() < 0.3:  # stretched one way
        f, (w, h) = _u(rng, 0.6, 1.0), img.size
        img = img.resize((max(8, round(w * f)), h) if rng.random() < 0.5 else (w, max(8, round(h * f))))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    if rng.random() < 0.35:
        img = img.rotate(
            _u(rng, -15, 15),
            resample=Image.Resampling.BILINEAR,
            expand=rng.random() < 0.5,
            fillcolor=_colour(rng),
        )
    if rng.random() < 0.8:
        img = ImageEnhance.Brightness(img).enhance(_u(rng, 0.6, 1.4))
        img = ImageEnhance.Contrast(img).enhance(_u(rng, 0.6, 1.4))
        img = ImageEnhance.Color(img).enhance(_u(rng, 0.3, 1.7))
    if rng.random() < 0.2:
        img = img.convert("L").convert("RGB")
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(_u(rng, 0.002, 0.012) * max(img.size)))
    if rng.random() < 0.35:
        img = _overlay(img, rng)
    if rng.random() < 0.25:
        img = ImageOps.expand(
            img, border=max(1, round(_u(rng, 0.02, 0.15) * min(img.size))), fill=_colour(rng)
        )
    return img, ("JPEG" if rng.random() < 0.6 else "PNG"), int(rng.integers(30, 95))


def encode(img: Image.Image, fmt: str, quality: int = 75) -> bytes:
    """`img` as JPEG, WEBP (at `quality`) or PNG bytes."""
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, "PNG", compress_level=1)
    else:
        img.convert("RGB").save(buf, fmt, quality=quality)
    return buf.getvalue()


def view_array(image: np.ndarray, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """One training view of a uint8 (3, S, S) image, decoded to uint8 (3, image_size, image_size)."""
    img = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
    view, fmt, quality = train_view(img, rng)
    return decode_image(encode(view, fmt, quality), image_size, 3)
