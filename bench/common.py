"""Shared benchmark helpers: structured test images, timing, and ratio printing."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from imgsim.data.sources import ImageRef

CLASSES = ("gradients", "circles", "stripes", "blocks")

#: Where benchmarks keep what they generate or gather (images, photo sources, runs): `bench-cache/`
#: at the repository root, ignored by git; `IMGSIM_BENCH_CACHE` puts it elsewhere.
CACHE = Path(os.environ.get("IMGSIM_BENCH_CACHE") or Path(__file__).resolve().parent.parent / "bench-cache")


def make_jpegs(out_dir: str | os.PathLike[str], n: int, size: int = 512, seed: int = 0) -> list[Path]:
    """`n` structured size×size JPEGs (gradients, shapes, stripes, text-like blocks) in class folders.

    Files are `out_dir/<class>/<i>.jpg`; one already there is reused (repeated runs do not pay for
    generation again), so use a fresh `out_dir` for another `size` or `seed`.
    """
    out = Path(out_dir)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    paths = []
    for i in range(n):
        kind = CLASSES[i % len(CLASSES)]
        path = out / kind / f"{i:05d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, i])  # per image: the same file whichever others exist
        c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if kind == "gradients":
            t = (xx * rng.uniform(0.2, 1) + yy * rng.uniform(0.2, 1))[..., None] / 2
            arr = (c1 * (1 - t) + c2 * t).astype(np.uint8)
            img = Image.fromarray(arr)
        else:
            img = Image.new("RGB", (size, size), tuple(int(v) for v in c1))
            draw = ImageDraw.Draw(img)
            for _ in range(int(rng.integers(3, 12))):
                x0, y0 = rng.integers(0, size, 2)
                w, h = rng.integers(size // 16, size // 3, 2)
                colour = tuple(int(v) for v in rng.integers(0, 256, 3))
                if kind == "circles":
                    draw.ellipse([x0, y0, x0 + w, y0 + w], fill=colour)
                elif kind == "stripes":
                    draw.rectangle([0, y0, size, y0 + h // 4], fill=colour)
                else:
                    for row in range(0, h, 12):
                        draw.rectangle([x0, y0 + row, x0 + w, y0 + row + 6], fill=colour)
        img.save(path, quality=90)
    return paths


def jpeg_refs(out_dir: str, n: int) -> list[ImageRef]:
    """ImageRefs (path + class label) of the first `n` images `make_jpegs` generates in `out_dir`,
    generating any that are missing: the same set whatever else the folder holds (a run with a
    larger n adds files, which would otherwise change what a smaller n measures)."""
    from imgsim.data.sources import list_images

    wanted = {str(p) for p in make_jpegs(out_dir, n)}
    refs = [r for r in list_images(str(out_dir)) if r.path in wanted]
    assert len(refs) == n, f"{out_dir}: found {len(refs)} of the {n} generated JPEGs"
    return refs


def timed(fn: Callable[[], int]) -> tuple[int, float]:
    """(items, seconds) for fn() returning an item count."""
    start = time.perf_counter()
    items = fn()
    return items, time.perf_counter() - start


def report(title: str, rows: list[tuple[str, float]], baseline: str, unit: str) -> None:
    """Print rates and each one's ratio to `baseline`, all measured in this run."""
    base = dict(rows)[baseline]
    print(f"\n{title}")
    for name, rate in rows:
        print(f"  {name:<44} {rate:>10.1f} {unit}   {rate / base:>5.2f}x vs {baseline}")
