"""Decode + preprocess throughput: the Ray Data ingest pipeline vs a plain single-process PIL loop.

Both read the same few thousand structured 512x512 JPEGs with `imgsim.data.sources.read_bytes` and
preprocess them with the same `imgsim.data.decode.decode_image`, in the same run. Ray start-up
(`ray.init`) is excluded; everything after it counts for Ray: building the dataset, scheduling,
worker-side decoding, and moving every decoded image back to this process. Each side runs
`--rounds` times, alternating, and its best round is reported (other users' load on a shared
machine only ever slows a round down). Target on 2 cores: >= 1.5x the plain loop.

    .venv/bin/python -m bench.ingest --n 12000 --rounds 3
"""

from __future__ import annotations

import argparse
import os

import ray

from bench.common import CACHE, jpeg_refs, report, timed
from imgsim.data.decode import decode_image
from imgsim.data.sources import read_bytes
from pipelines.ingest import read_images
from pipelines.runtime import ensure_ray


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=12000, help="number of 512x512 JPEGs")
    p.add_argument("--image-size", type=int, default=32, help="preprocessed size S (default 32)")
    p.add_argument("--channels", type=int, choices=[1, 3], default=3)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per side; the best counts")
    p.add_argument("--dir", default=str(CACHE / "jpegs-512"))
    a = p.parse_args()
    cpus = len(os.sched_getaffinity(0))
    refs = jpeg_refs(a.dir, a.n)

    def plain_loop() -> int:
        for r in refs:
            decode_image(read_bytes(r.path), a.image_size, a.channels)
        return len(refs)

    def ray_pipeline() -> int:
        n = 0
        ds = read_images(a.dir, a.image_size, a.channels, refs=refs)
        for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
            assert batch["error"].tolist().count(None) == len(batch["error"])
            n += len(batch["image"])
        return n

    ensure_ray(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    best = {"plain": 0.0, "ray": 0.0}
    for round_ in range(1, a.rounds + 1):
        for name, fn in (("plain", plain_loop), ("ray", ray_pipeline)):
            n, seconds = timed(fn)
            assert n == len(refs), (name, n)
            best[name] = max(best[name], n / seconds)
            print(f"round {round_}: {name:<5} {n / seconds:8.1f} img/s ({seconds:.2f} s)")
    ray.shutdown()
    report(
        f"ingest: read + decode + preprocess {len(refs)} 512x512 JPEGs to "
        f"{a.channels}x{a.image_size}x{a.image_size} on {cpus} cores (best of {a.rounds})",
        [
            ("plain single-process PIL loop (baseline)", best["plain"]),
            ("Ray Data read_images", best["ray"]),
        ],
        "plain single-process PIL loop (baseline)",
        "img/s",
    )


if __name__ == "__main__":
    main()
