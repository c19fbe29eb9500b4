"""End-to-end embedding throughput, files on disk -> Parquet: the Ray Data actor-pool job vs a plain
single-process loop (same decode_image, same model, same Parquet output), in one run.

The Ray job's first rows arrive only after its actor pool has started (a process per actor that
imports torch and loads the model, about 2.5 s on 2 cores, plus Ray Data's own start), so the
report also gives that start-up time and the Ray job's rate after its first batch.

    .venv/bin/python -m bench.embed                      # 12,000 JPEGs (shared with bench.ingest), 32x32
    .venv/bin/python -m bench.embed --n 2000 --size 64
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
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
    p.add_argument("--n", type=int, default=12000)
    p.add_argument("--size", type=int, default=32, help="model input size (imgsim's default: 32)")
    p.add_argument("--dir", default="/tmp/imgsim-bench-jpegs-512")
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

        first: dict[str, float] = {}

        def ray_job() -> int:
            # as pipelines.build_index does: stream batches to the driver, write Parquet there
            started, n, writer = time.perf_counter(), 0, None
            ds = embed_images(a.dir, str(run), refs=refs, concurrency=cores)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                table = pa.table(
                    {
                        "path": pa.array(batch["path"].tolist(), pa.string()),
                        "embedding": pa.array(list(batch["embedding"]), pa.list_(pa.float32())),
                    }
                )
                writer = writer or pq.ParquetWriter(Path(tmp) / "ray.parquet", table.schema)
                writer.write_table(table)
                n += table.num_rows
                if not first:
                    first.update(seconds=time.perf_counter() - started, rows=n)
            if writer:
                writer.close()
            return n

        n_plain, t_plain = timed(plain_loop)
        n_ray, t_ray = timed(ray_job)
        assert n_plain == n_ray == len(refs), (n_plain, n_ray)
        assert pq.read_table(Path(tmp) / "ray.parquet").num_rows == n_ray
        ray.shutdown()
    after_start = (n_ray - first["rows"]) / max(t_ray - first["seconds"], 1e-9)
    print(f"Ray job: first batch ({first['rows']:.0f} rows) after {first['seconds']:.1f} s of {t_ray:.1f} s")
    report(
        f"embed: {len(refs)} 512x512 JPEGs on disk -> Parquet, model input {a.size}x{a.size}x3, {cores} cores",
        [
            ("plain single-process loop (baseline)", n_plain / t_plain),
            ("Ray Data actor pool (pipelines.embed)", n_ray / t_ray),
            ("  the same, after its first batch", after_start),
        ],
        "plain single-process loop (baseline)",
        "img/s",
    )


if __name__ == "__main__":
    main()
