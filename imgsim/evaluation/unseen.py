"""Edits no training recipe ever makes, for measuring how copy detection carries over to the unknown.

`imgsim.training.views` trains the pretrained-trunk model on crops, stretches, mirrors, rotations,
colour, greyscale, blur, text and boxes, borders and JPEG/PNG. The edits here are none of those:
perspective warps, sensor noise, pixelation, sharpening, vignettes, hue rotation, gamma, posterising,
round stickers, pasting onto a larger noisy canvas (a screenshot or collage), median filtering and
8-bit palettes. `unseen_combo_bytes` applies three of them at once, in random order, then re-encodes
as WebP (another codec training never uses): `bench.copydetect`'s `unseen3` query set.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from imgsim.data.decode import open_image


def _u(rng, a, b):
    return float(rng.uniform(a, b))


def _rand_colour(rng):
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _webp(img, quality):
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "WEBP", quality=quality)
    return buf.getvalue()


def u_perspective(img, rng):
    w, h = img.size
    m = 0.12
    pts = [
        (_u(rng, 0, m) * w, _u(rng, 0, m) * h),
        (w - _u(rng, 0, m) * w, _u(rng, 0, m) * h),
        (w - _u(rng, 0, m) * w, h - _u(rng, 0, m) * h),
        (_u(rng, 0, m) * w, h - _u(rng, 0, m) * h),
    ]
    # coefficients mapping output (w,h) rectangle to the quad
    A, B = [], []
    for (x, y), (X, Y) in zip([(0, 0), (w, 0), (w, h), (0, h)], pts, strict=False):
        A += [[x, y, 1, 0, 0, 0, -X * x, -X * y], [0, 0, 0, x, y, 1, -Y * x, -Y * y]]
        B += [X, Y]
    coef = np.linalg.solve(np.array(A, float), np.array(B, float))
    return img.transform((w, h), Image.Transform.PERSPECTIVE, tuple(coef), Image.Resampling.BICUBIC)


def u_noise(img, rng):
    a = np.asarray(img.convert("RGB"), np.float32)
    a = a + rng.normal(0, _u(rng, 6, 16), a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def u_pixelate(img, rng):
    w, h = img.size
    f = _u(rng, 0.12, 0.25)
    return img.resize((max(4, round(w * f)), max(4, round(h * f))), Image.Resampling.BOX).resize(
        (w, h), Image.Resampling.NEAREST
    )


def u_sharpen(img, rng):
    return img.filter(
        ImageFilter.UnsharpMask(radius=_u(rng, 2, 5), percent=int(_u(rng, 150, 300)), threshold=2)
    )


def u_vignette(img, rng):
    w, h = img.size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.sqrt(((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2)
    g = np.clip(1 - _u(rng, 0.5, 0.8) * np.clip(r - 0.3, 0, None) ** 1.5, 0, 1)[..., None]
    return Image.fromarray((np.asarray(img.convert("RGB"), np.float32) * g).astype(np.uint8))


def u_hue(img, rng):
    hsv = np.asarray(img.convert("RGB").convert("HSV")).copy()
    hsv[..., 0] = (
        hsv[..., 0].astype(int) + int(rng.integers(30, 90)) * (1 if rng.random() < 0.5 else -1)
    ) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def u_gamma(img, rng):
    g = _u(rng, 0.45, 0.7) if rng.random() < 0.5 else _u(rng, 1.5, 2.2)
    lut = [round(255 * (i / 255) ** g) for i in range(256)] * 3
    return img.convert("RGB").point(lut)


def u_posterize(img, rng):
    return ImageOps.posterize(img.convert("RGB"), int(rng.integers(2, 4)))


def u_stickers(img, rng):
    img = img.convert("RGB").copy()
    d = ImageDraw.Draw(img)
    w, h = img.size
    for _ in range(int(rng.integers(2, 5))):
        r = _u(rng, 0.04, 0.1) * min(w, h)
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        d.ellipse(
            (x - r, y - r, x + r, y + r), fill=_rand_colour(rng), outline=(0, 0, 0), width=max(1, int(r / 8))
        )
    return img


def u_canvas(img, rng):
    """pasted off-centre onto a larger canvas of random noise colour (a screenshot/collage)."""
    w, h = img.size
    f = _u(rng, 1.15, 1.4)
    W, H = round(w * f), round(h * f)
    base = np.full((H, W, 3), rng.integers(0, 256, 3), np.float32) + rng.normal(0, 20, (H, W, 3))
    canvas = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    canvas.paste(img.convert("RGB"), (int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))))
    return canvas


def u_median(img, rng):
    return img.filter(ImageFilter.MedianFilter(int(rng.choice([5, 7]))))


def u_png8(img, rng):
    return (
        img.convert("RGB")
        .quantize(colors=int(rng.integers(16, 64)), dither=Image.Dither.FLOYDSTEINBERG)
        .convert("RGB")
    )


UNSEEN = {
    "perspective": u_perspective,
    "noise": u_noise,
    "pixelate": u_pixelate,
    "sharpen": u_sharpen,
    "vignette": u_vignette,
    "hue": u_hue,
    "gamma": u_gamma,
    "posterize": u_posterize,
    "stickers": u_stickers,
    "canvas": u_canvas,
    "median": u_median,
    "png8": u_png8,
}


def unseen_combo_bytes(data: bytes, rng, k: int = 3) -> bytes:
    """k distinct unseen edits, in random order, then WebP (also unseen: training uses JPEG/PNG)."""
    img = open_image(data).convert("RGB")
    names = list(UNSEEN)
    for i in rng.choice(len(names), k, replace=False):
        img = UNSEEN[names[i]](img, rng)
    w, h = img.size
    t = int(rng.integers(200, 400))
    sc = t / max(w, h)
    img = img.resize((max(1, round(w * sc)), max(1, round(h * sc))), Image.Resampling.LANCZOS)
    return _webp(img, int(rng.integers(30, 70)))
