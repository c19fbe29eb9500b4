"""Small structured test images, one look per class, shared by the benchmarks and the tests (which
import it through tests/conftest.py). Imports no imgsim."""

from __future__ import annotations

import numpy as np
from PIL import Image


def make_pattern_image(kind: int, seed: int, size: int = 32, mode: str = "L") -> Image.Image:
    """A small structured image of class `kind` (stripes, checks, blob, ...) with per-seed jitter.

    Classes are visually distinct so that a working embedding retrieves same-class images.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phase = rng.uniform(0, 0.2)
    if kind % 4 == 0:
        img = np.sin((xx + phase) * 6 * np.pi)  # vertical stripes
    elif kind % 4 == 1:
        img = np.sin((yy + phase) * 6 * np.pi)  # horizontal stripes
    elif kind % 4 == 2:
        cx, cy = 0.5 + rng.uniform(-0.1, 0.1, size=2)
        img = 1.0 - 4 * ((xx - cx) ** 2 + (yy - cy) ** 2)  # blob
    else:
        img = np.sign(np.sin((xx + phase) * 4 * np.pi) * np.sin((yy + phase) * 4 * np.pi))  # checks
    img = img + rng.normal(0, 0.1, img.shape)
    arr = np.clip((img - img.min()) / (np.ptp(img) + 1e-6) * 255, 0, 255).astype(np.uint8)
    out = Image.fromarray(arr, mode="L")
    return out.convert(mode) if mode != "L" else out
