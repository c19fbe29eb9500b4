"""Training throughput: samples/s of a plain single-process PyTorch loop (baseline) and of Ray Train
with 1 and 2 workers, same model, same batch, same objective, measured in one run.

    .venv/bin/python -m bench.train                              # 16,384 images, 3 epochs: about 2.5 minutes
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import ray
import torch

from bench.common import report
from bench.patterns import make_pattern_image
from imgsim.config import DEFAULTS
from imgsim.models.autoencoder import Augment, AutoEncoder, ModelConfig, training_loss
from pipelines.runtime import ensure_ray
from pipelines.train import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16384)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=DEFAULTS.train.batch_size)
    a = p.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        for i in range(a.images):
            (data / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
            make_pattern_image(i % 4, seed=i, size=32).save(data / f"c{i % 4}" / f"{i:05d}.png")

        # baseline: the same objective in a plain loop on in-memory tensors, all cores
        torch.set_num_threads(cores)
        model = AutoEncoder(ModelConfig())
        opt = torch.optim.AdamW(model.parameters(), lr=DEFAULTS.train.lr)
        x = torch.randint(0, 256, (a.images, 1, 32, 32), dtype=torch.uint8)
        aug = Augment()
        steps = a.images // a.batch_size
        start = time.perf_counter()
        for _ in range(a.epochs):
            for s in range(steps):
                loss, _ = training_loss(
                    model, x[s * a.batch_size : (s + 1) * a.batch_size], aug, DEFAULTS.train.nce_weight
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
        plain = a.epochs * steps * a.batch_size / (time.perf_counter() - start)

        ensure_ray(num_cpus=cores, include_dashboard=False, log_to_driver=False)  # as `imgsim train` does
        rows = [("plain PyTorch loop, 1 process (baseline)", plain)]
        for workers in (1, 2):
            summary = train(
                str(data),
                str(Path(tmp) / f"run{workers}"),
                epochs=a.epochs,
                workers=workers,
                batch_size=a.batch_size,
                image_size=32,
                channels=1,
            )
            # throughput inside the epochs (excludes Ray start-up and decoding, like the baseline)
            rate = sum(h["images"] for h in summary["history"]) / sum(
                h["seconds"] for h in summary["history"]
            )
            rows.append((f"Ray Train TorchTrainer, {workers} worker(s)", rate))
        ray.shutdown()
    report(
        f"train: samples/s, batch {a.batch_size}, {a.images} 32x32 images, {cores} cores",
        rows,
        "plain PyTorch loop, 1 process (baseline)",
        "samples/s",
    )


if __name__ == "__main__":
    main()
