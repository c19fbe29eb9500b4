"""End-to-end embedding throughput, files on disk -> Parquet: the Ray Data actor-pool job vs a plain
single-process loop (same decode_image, same model, same Parquet output), in one run.

`ray.init` is excluded, as the plain loop's own interpreter start and `import torch` are.
Everything after it counts for Ray. Each round starts a fresh local Ray and times, in turn:

- the plain loop (baseline);
- the Ray job *cold*: the first Ray Data job of the session. Ray Data starts its service actors
  (stats, autoscaling coordinator, actor-location tracker) and the map actors, each a new process
  that imports ray.data (and, for the map actors, torch) before the first image is decoded;
- the same job again, *warm*: the service actors are up, as on a cluster that has run a job
  before; the map actors still start afresh (Ray Data starts and stops them with each job);
- and, for both, the rate after the first batch arrived (the steady state).

The best round of each counts (other load only ever slows a round down). The start-up is what a
job takes beyond its image count at its steady rate; a larger --n amortises it.

    .venv/bin/python -m bench.embed                      # 12,000 JPEGs (shared with bench.ingest), 32x32
    .venv/bin/python -m bench.embed --n 48000 --rounds 1
    .venv/bin/python -m bench.embed --worker-env runtime-env   # as before ensure_ray inherited it
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

from bench.common import CACHE, jpeg_refs, report, timed
from imgsim.data.decode import decode_image
from imgsim.models import autoencoder as model_lib
from imgsim.models.autoencoder import AutoEncoder, ModelConfig
from pipelines.embed import embed_images
from pipelines.runtime import ensure_ray, worker_env


def embedding_table(paths: list[str], embeddings: np.ndarray) -> pa.Table:
    """The Parquet rows both sides write: path and embedding."""
    return pa.table(
        {
            "path": pa.array(paths, pa.string()),
            "embedding": pa.array(list(embeddings), pa.list_(pa.float32())),
        }
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=12000)
    p.add_argument("--size", type=int, default=32, help="model input size (imgsim's default: 32)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, each on a fresh Ray; the best counts")
    p.add_argument("--dir", default=str(CACHE / "jpegs-512"))
    p.add_argument(
        "--worker-env",
        choices=["inherit", "runtime-env"],
        default="inherit",
        help="how the local Ray's workers get imgsim's worker environment: inherited from this "
        "process, as pipelines.runtime.ensure_ray does (default), or in a job runtime environment",
    )
    a = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    refs = jpeg_refs(a.dir, a.n)
    best = {k: 0.0 for k in ("plain", "cold", "warm", "cold_after", "warm_after")}
    startup = {"cold": float("inf"), "warm": float("inf")}
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
            pq.write_table(embedding_table(paths, np.concatenate(chunks)), Path(tmp) / "plain.parquet")
            return len(paths)

        def ray_job(first: dict[str, float]) -> int:
            # like pipelines.build_index: stream batches to the driver, write Parquet there
            started, n, writer = time.perf_counter(), 0, None
            ds = embed_images(a.dir, str(run), refs=refs, concurrency=cores)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                table = embedding_table(batch["path"].tolist(), batch["embedding"])
                writer = writer or pq.ParquetWriter(Path(tmp) / "ray.parquet", table.schema)
                writer.write_table(table)
                n += table.num_rows
                if not first:
                    first.update(seconds=time.perf_counter() - started, rows=n)
            if writer:
                writer.close()
            return n

        for round_ in range(1, a.rounds + 1):
            init = dict(num_cpus=cores, include_dashboard=False, log_to_driver=False)
            if a.worker_env == "inherit":
                ensure_ray(**init)
            else:
                ray.init(configure_logging=False, runtime_env={"env_vars": worker_env()}, **init)
            ray.data.DataContext.get_current().enable_progress_bars = False
            time.sleep(3)  # let Ray finish starting its workers before anything is timed
            n, t = timed(plain_loop)
            assert n == len(refs)
            best["plain"] = max(best["plain"], n / t)
            print(f"round {round_}: plain {n / t:8.1f} img/s ({t:.2f} s)")
            for kind in ("cold", "warm"):
                first: dict[str, float] = {}
                n, t = timed(lambda: ray_job(first))  # noqa: B023 (called at once)
                assert n == len(refs) == pq.read_table(Path(tmp) / "ray.parquet").num_rows
                after = (n - first["rows"]) / max(t - first["seconds"], 1e-9)
                # start-up: the time beyond what the steady rate alone would have taken
                startup[kind] = min(startup[kind], t - n / after)
                best[kind] = max(best[kind], n / t)
                best[f"{kind}_after"] = max(best[f"{kind}_after"], after)
                print(
                    f"round {round_}: ray {kind}  {n / t:8.1f} img/s ({t:.2f} s; first batch of "
                    f"{first['rows']:.0f} after {first['seconds']:.2f} s, then {after:.0f} img/s)"
                )
            ray.shutdown()
    base = "plain single-process loop (baseline)"
    report(
        f"embed: {len(refs)} 512x512 JPEGs on disk -> Parquet, model input {a.size}x{a.size}x3, "
        f"{cores} cores (best of {a.rounds}; worker env: {a.worker_env})",
        [
            (base, best["plain"]),
            ("Ray Data actor pool, cold (first job)", best["cold"]),
            ("  the same, after its first batch", best["cold_after"]),
            ("Ray Data actor pool, warm (second job)", best["warm"]),
            ("  the same, after its first batch", best["warm_after"]),
        ],
        base,
        "img/s",
    )
    for kind in ("cold", "warm"):
        print(f"{kind} job: {startup[kind]:.1f} s of start-up (beyond what its steady rate needs)")


if __name__ == "__main__":
    main()
