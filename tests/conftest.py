"""Shared fixtures: one local Ray runtime per session, tiny generated images, free ports."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
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


def wait_healthy(url: str, timeout_s: float = 120.0, alive: Callable[[], None] | None = None) -> None:
    """Poll `url` until it answers 200; `alive()` (if given) raises when the server has died."""
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        if alive:
            alive()
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not become healthy in {timeout_s} s")
        time.sleep(0.25)


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


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real S3-compatible HTTP server (moto) on 127.0.0.1, with the AWS settings pointing at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    try:
        yield endpoint
    finally:
        server.stop()


def upload_folder(endpoint: str, folder: Path, bucket: str, prefix: str) -> None:
    """Create `bucket` and upload every file under `folder` to s3://bucket/prefix/<relative path>."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def write_pattern_folder(root: Path, per_class: int = 8) -> Path:
    """4 visually distinct classes x `per_class` PNGs under root/<class>/."""
    for kind, name in enumerate(["stripes-v", "stripes-h", "blob", "checks"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_pattern_image(kind, seed=kind * 100 + i).save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> tuple[Path, Path]:
    """(data folder, run dir): a real model trained by Ray Train and indexed by the Ray Data job.

    Tests must not modify it; copy it (shutil.copytree) to change anything.
    """
    from pipelines.build_index import build_index
    from pipelines.train import train

    base = tmp_path_factory.mktemp("tiny")
    data = write_pattern_folder(base / "data")
    run = base / "run"
    train(str(data), str(run), epochs=6, image_size=16, dim=8, batch_size=16, lr=3e-3)
    build_index(str(data), str(run), clusters=4)
    return data, run


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """An empty bucket on `s3_server` (AWS settings already point there); its name."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="imgsim-test")
    return "imgsim-test"


def upload_tree(bucket: str, folder: Path, prefix: str) -> list[str]:
    """Upload every file under `folder` to s3://bucket/prefix/<relative path>; the URIs, sorted.

    Uses the AWS settings of the environment (the `s3_server` fixture sets them).
    """
    import boto3

    s3 = boto3.client("s3")
    uris = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = f"{prefix.strip('/')}/{path.relative_to(folder).as_posix()}"
            s3.upload_file(str(path), bucket, key)
            uris.append(f"s3://{bucket}/{key}")
    return uris
