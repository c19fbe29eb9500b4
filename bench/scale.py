"""`imgsim index` at N images, end to end: throughput, driver memory, index size, re-index, serving.

    .venv/bin/python -m bench.scale                  # N = 20,000: a quick run
    .venv/bin/python -m bench.scale --n 1000000      # the real one (images generated once, cached)
    .venv/bin/python -m bench.scale --n 1000000 --json

1. Generates N distinct 32×32 greyscale PNGs once into `--cache` (default /work/cache/scale, outside
   git): `n<N>/d<folder>/<id>.png`, 1,000 per folder, written by parallel processes. Every 100th
   image is a planted near-duplicate of the one before it (a brightness shift and a few changed
   pixels); every other image is distinct (its id is written into three pixels). Another 1 % of new
   images waits in `n<N>-added/` for the re-index step.
2. A model: `--model RUN`, else one trained once on the first 10,000 images (`imgsim train`, 2
   epochs) and cached.
3. `imgsim index` from scratch, as a subprocess: wall time, images/s, the driver's peak RSS (its
   RSS sampled with psutil every 0.2 s, children excluded: the Ray workers are measured apart),
   the size of `embeddings.parquet`.
4. `Searcher.load` in a fresh process: seconds and RSS.
5. A Serve replica (`imgsim serve`, one replica) at that size: its RSS, and the p50 of sequential
   and of 8-client uploads.
6. 1 % more images moved into DATA, `imgsim index` again: seconds, and as a share of step 3.
7. `imgsim duplicates` if this imgsim has it.

Targets on 2 cores at 1M: index >= 3,000 img/s end to end, driver peak RSS <= 2 GB, re-index after
+1 % <= 5 % of the full run, a replica <= 1.5 GB RSS with p50 <= 20 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PER_FOLDER = 1000
NEAR_DUPLICATE_EVERY = 100  # image i with i % 100 == 99 is a near-copy of image i - 1
SIZE = 32
TRAIN_SAMPLE = 10_000
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TQDM_DISABLE": "1"}


# -- images ------------------------------------------------------------------------------------------
def _pattern(rng: np.random.Generator) -> np.ndarray:
    """A structured 32×32 greyscale image (stripes, rings, checks, blobs, gradients) with noise."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    kind = int(rng.integers(0, 5))
    f, phase, angle = rng.uniform(2, 8), rng.uniform(0, 1), rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    if kind == 0:
        img = np.sin((u + phase) * f * np.pi)
    elif kind == 1:
        cx, cy = rng.uniform(0.2, 0.8, 2)
        img = np.cos(np.hypot(xx - cx, yy - cy) * f * 2 * np.pi)
    elif kind == 2:
        img = np.sign(np.sin((xx + phase) * f * np.pi) * np.sin((yy + phase) * f * np.pi))
    elif kind == 3:
        img = np.zeros_like(xx)
        for _ in range(int(rng.integers(1, 4))):
            cx, cy, r = *rng.uniform(0.1, 0.9, 2), rng.uniform(0.1, 0.3)
            img += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    else:
        img = u + 0.3 * np.sin(yy * f * np.pi)
    img = img + rng.normal(0, 0.08, img.shape)
    return np.clip((img - img.min()) / (np.ptp(img) + 1e-6) * 255, 0, 255).astype(np.uint8)


def image_array(i: int, seed: int = 0) -> np.ndarray:
    """Image `i` of the generated collection (planted near-duplicates included)."""
    if i % NEAR_DUPLICATE_EVERY == NEAR_DUPLICATE_EVERY - 1:
        rng = np.random.default_rng([seed, i])
        arr = image_array(i - 1, seed).astype(np.int16) + int(rng.integers(4, 12))
        idx = rng.integers(0, SIZE, (6, 2))
        arr[idx[:, 0], idx[:, 1]] = rng.integers(0, 256, 6)
        return np.clip(arr, 0, 255).astype(np.uint8)
    arr = _pattern(np.random.default_rng([seed, i]))
    arr[0, :3] = [(i >> 16) & 255, (i >> 8) & 255, i & 255]  # distinct bytes for every id
    return arr


def image_path(root: Path, i: int) -> Path:
    return root / f"d{i // PER_FOLDER:05d}" / f"{i:07d}.png"


def _write_folder(root: str, folder: int, start: int, stop: int) -> int:
    """Images of one folder (ids start..stop-1); a marker file says the folder is complete."""
    from PIL import Image

    directory = Path(root) / f"d{folder:05d}"
    marker = directory / ".complete"
    if marker.is_file():
        return 0
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(start, stop):
        Image.fromarray(image_array(i)).save(directory / f"{i:07d}.png", format="PNG", compress_level=1)
    marker.write_text(f"{stop - start}\n")
    return stop - start


def generate(root: Path, start: int, stop: int, workers: int) -> float:
    """Images start..stop-1 under `root` (those already there are kept); seconds taken."""
    marker = root / f".complete-{start}-{stop}"
    if marker.is_file():
        return 0.0
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        jobs = [
            pool.submit(_write_folder, str(root), f, max(start, f * PER_FOLDER), min(stop, (f + 1) * PER_FOLDER))
            for f in range(start // PER_FOLDER, -(-stop // PER_FOLDER))
        ]
        done = sum(job.result() for job in jobs)
    marker.write_text(f"{stop - start}\n")
    took = time.perf_counter() - t0
    print(f"[scale] generated {done:,} images in {took:.0f} s under {root}", flush=True)
    return took
