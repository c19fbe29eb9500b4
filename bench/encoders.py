"""Embedding throughput of imported encoders vs the trained autoencoder, in the Ray Data job
(`pipelines.embed.embed_images`: read, decode, embed in the actor pool) on the same JPEGs.

Models, all at the same input (3 x S x S):
- the autoencoder as `imgsim train` saves it (`imgsim.models.autoencoder.save`; weights do not change its cost) —
  the baseline;
- the same encoder exported with TorchScript (trace) and with torch.export (.pt2), then imported
  with `imgsim.models.encoders.import_encoder`: the cost of the import path itself;
- a small CNN (four 3x3 convs, global average pool, linear; about the autoencoder's encoder size)
  imported as TorchScript and as a .pt2, normalised with ImageNet's mean/std.

One fresh local Ray; a throw-away job first starts Ray Data's service actors; then each round runs
every model's job in turn (so load on the machine hits them alike) and the best round counts.
Reported: end-to-end images/s of the job, the encode stage's milliseconds per image (the
Embedder's own time, from the rows' `encode_s`), and, measured first in this process, each model's
`embed` alone on pre-decoded images with one thread (as an embedding actor runs it).

    .venv/bin/python -m bench.encoders                  # 3,000 JPEGs (shared with bench.embed), 32x32
    .venv/bin/python -m bench.encoders --n 4000 --size 64 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.common import CACHE, jpeg_refs, report
from imgsim.models import autoencoder as model_lib
from imgsim.models.autoencoder import AutoEncoder, ModelConfig
from imgsim.models.encoders import import_encoder
from pipelines.embed import embed_images
from pipelines.runtime import ensure_ray

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class AutoEncoderEncoder(nn.Module):
    """The autoencoder's embedding path (`AutoEncoder.embed` without its uint8 scaling) as a module."""

    def __init__(self, ae: AutoEncoder) -> None:
        super().__init__()
        self.ae = ae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.ae.encode(self.ae.to_float(x))
        return (z - self.ae.emb_mean) @ self.ae.emb_whiten


def small_cnn(dim: int = 64) -> nn.Module:
    def block(a: int, b: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(a, b, 3, stride, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, 32, 2), *block(32, 64, 2), *block(64, 128, 2), *block(128, 128, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, dim),
    )  # fmt: skip


def export(module: nn.Module, path: Path, kind: str, size: int) -> Path:
    module = module.eval()
    example = torch.rand(2, 3, size, size)
    if kind == "torchscript":
        torch.jit.save(torch.jit.trace(module, example), str(path))
    else:
        batch = torch.export.Dim("batch", min=1, max=65536)
        torch.export.save(torch.export.export(module, (example,), dynamic_shapes=({0: batch},)), str(path))
    return path


def make_runs(tmp: Path, size: int) -> dict[str, Path]:
    """Run directories with each model; the autoencoder's first (the baseline)."""
    torch.manual_seed(0)
    ae = AutoEncoder(ModelConfig(image_size=size, channels=3))
    runs = {"trained autoencoder (imgsim.models.autoencoder)": tmp / "ae"}
    model_lib.save(ae, runs["trained autoencoder (imgsim.models.autoencoder)"])
    cnn = small_cnn()
    for label, module, norm in (
        ("the same encoder, imported", AutoEncoderEncoder(ae), {}),
        ("small CNN, imported", cnn, {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}),
    ):
        for kind, suffix in (("torchscript", "pt"), ("export", "pt2")):
            name = f"{label} ({'TorchScript' if kind == 'torchscript' else 'torch.export .pt2'})"
            run = tmp / f"run-{len(runs)}"
            file = export(module, tmp / f"model-{len(runs)}.{suffix}", kind, size)
            import_encoder(file, run, image_size=size, channels=3, **norm)
            runs[name] = run
    return runs


def model_only(runs: dict[str, Path], size: int, reps: int = 5, n: int = 2048) -> dict[str, float]:
    """Milliseconds per image of each model's `embed` alone: one process, one thread (as each
    embedding actor runs), pre-decoded random images in batches of 256; best of `reps`, interleaved."""
    torch.set_num_threads(1)
    images = np.random.default_rng(0).integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    models = {name: model_lib.load(run) for name, run in runs.items()}
    best = {name: float("inf") for name in runs}
    for _ in range(reps):
        for name, model in models.items():
            started = time.perf_counter()
            for start in range(0, n, 256):
                model.embed(images[start : start + 256])
            best[name] = min(best[name], 1000 * (time.perf_counter() - started) / n)
    return best


def ray_job(data: str, run: Path, refs: list) -> tuple[int, float, float]:
    """(images, seconds, summed encode seconds) of one embedding job, batches streamed to the driver."""
    started, n, encode_s = time.perf_counter(), 0, 0.0
    for batch in embed_images(
        data, str(run), refs=refs, concurrency=len(os.sched_getaffinity(0))
    ).iter_batches(batch_size=None, batch_format="numpy"):
        n += len(batch["path"])
        encode_s += float(np.sum(batch["encode_s"]))
    return n, time.perf_counter() - started, encode_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--size", type=int, default=32, help="model input size (imgsim's default: 32)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dir", default=str(CACHE / "jpegs-512"))
    a = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    refs = jpeg_refs(a.dir, a.n)
    with tempfile.TemporaryDirectory() as tmp:
        runs = make_runs(Path(tmp), a.size)
        alone = model_only(runs, a.size)
        threads = torch.get_num_threads()
        ensure_ray(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        base = next(iter(runs))
        ray_job(a.dir, runs[base], refs[:200])  # starts Ray Data's service actors
        best = {name: 0.0 for name in runs}
        encode_ms = {name: float("inf") for name in runs}
        for round_ in range(1, a.rounds + 1):
            for name, run in runs.items():
                n, t, enc = ray_job(a.dir, run, refs)
                assert n == len(refs)
                best[name] = max(best[name], n / t)
                encode_ms[name] = min(encode_ms[name], 1000 * enc / n)
                print(f"round {round_}: {name:<55} {n / t:7.0f} img/s, encode {1000 * enc / n:.3f} ms/img")
    report(
        f"embed job (Ray Data, {cores} cores): {len(refs)} 512x512 JPEGs -> 3x{a.size}x{a.size} -> embedding "
        f"(best of {a.rounds})",
        [(name, best[name]) for name in runs],
        base,
        "img/s",
    )
    for title, ms in (
        ("the job's encode stage (ms per image, from the rows' encode_s; lower is faster):", encode_ms),
        (f"embed() alone, one process, {threads} thread, pre-decoded (ms per image, best of 5):", alone),
    ):
        print(title)
        for name in runs:
            print(f"  {name:<62} {ms[name]:.3f}  ({ms[name] / ms[base]:.2f}x the baseline)")


if __name__ == "__main__":
    main()
