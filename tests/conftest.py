"""Shared fixtures: one local Ray runtime per session, tiny generated images, free ports."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_ACCEPT_CALLABLE_ENTRYPOINT", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A real local Ray runtime shared by the session's tests (2 CPUs, like this machine)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


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


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A labelled folder: 4 classes x 6 PNGs under tmp/<class>/, plus one unlabelled top-level image."""
    root = tmp_path / "images"
    names = ["stripes-v", "stripes-h", "blob", "checks"]
    for kind, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(6):
            make_pattern_image(kind, seed=kind * 100 + i).save(root / name / f"{i:02d}.png")
    make_pattern_image(2, seed=999).save(root / "top.png")
    return root
