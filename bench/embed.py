"""End-to-end embedding throughput, files on disk -> Parquet: the Ray Data actor-pool job vs a plain
single-process loop (same decode_image, same model, same Parquet output), in one run.

    .venv/bin/python -m bench.embed --n 2000
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from bench.common import make_jpegs, report, timed
from imgsim import model as model_lib
from imgsim.decode import decode_image
from imgsim.model import AutoEncoder, ModelConfig
from imgsim.sources import list_images
from pipelines.embed import embed_images
from pipelines.runtime import ensure_ray


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--size", type=int, default=64, help="model input size")
    p.add_argument("--dir", default="/tmp/imgsim-bench-jpegs")
    a = p.parse_args()
    cores = os.cpu_count() or 1
    make_jpegs(a.dir, a.n)
    refs = list_images(a.dir)[: a.n]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        model_lib.save(AutoEncoder(ModelConfig(image_size=a.size, channels=3)), run)

        def plain_loop() -> int:
            torch.set_num_threads(cores)
            model = model_lib.load(run)
            paths, chunks = [], []
            for start in range(0, len(refs), 256):
                batch = refs[start : start + 256]
                images = np.stack([decode_image(Path(r.path).read_bytes(), a.size, 3) for r in batch])
                chunks.append(model.embed(images))
                paths += [r.path for r in batch]
            emb = np.concatenate(chunks)
            table = pa.table({"path": paths, "embedding": pa.array(list(emb), pa.list_(pa.float32()))})
            pq.write_table(table, Path(tmp) / "plain.parquet")
            return len(paths)

        ensure_ray(num_cpus=cores, include_dashboard=False, log_to_driver=False)

        def ray_job() -> int:
            ds = embed_images(a.dir, str(run), refs=refs, concurrency=cores)
            ds.select_columns(["path", "label", "embedding"]).write_parquet(str(Path(tmp) / "ray"))
            return pq.read_table(Path(tmp) / "ray").num_rows

        n_plain, t_plain = timed(plain_loop)
        n_ray, t_ray = timed(ray_job)
        assert n_plain == n_ray == len(refs), (n_plain, n_ray)
        ray.shutdown()
    report(
        f"embed: {len(refs)} 512x512 JPEGs on disk -> Parquet, model input {a.size}x{a.size}x3, {cores} cores",
        [
            ("plain single-process loop (baseline)", n_plain / t_plain),
            ("Ray Data actor pool (pipelines.embed)", n_ray / t_ray),
        ],
        "plain single-process loop (baseline)",
        "img/s",
    )


if __name__ == "__main__":
    main()
