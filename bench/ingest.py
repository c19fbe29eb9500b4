"""Decode + preprocess throughput: the Ray Data ingest pipeline vs a plain single-process PIL loop.

Both use the same `imgsim.decode.decode_image` on the same few thousand 512x512 JPEGs, measured in
the same run; Ray start-up is excluded, everything after it counts. Target on 2 cores: >= 1.5x.

    .venv/bin/python -m bench.ingest --n 2000
"""

from __future__ import annotations

import argparse
import os

import ray

from bench.common import make_jpegs, report, timed
from imgsim.decode import decode_image
from imgsim.sources import list_images
from pipelines.ingest import read_images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--size", type=int, default=64, help="preprocessed image size")
    p.add_argument("--dir", default="/tmp/imgsim-bench-jpegs")
    a = p.parse_args()
    make_jpegs(a.dir, a.n)
    refs = list_images(a.dir)[: a.n]

    def plain_loop() -> int:
        for r in refs:
            with open(r.path, "rb") as f:
                decode_image(f.read(), a.size, 3)
        return len(refs)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
    read_images(a.dir, a.size, 3, refs=refs[:64]).materialize()  # warm the workers up

    def ray_pipeline() -> int:
        n = 0
        for batch in read_images(a.dir, a.size, 3, refs=refs).iter_batches(
            batch_size=512, batch_format="numpy"
        ):
            n += len(batch["path"])
        return n

    n_plain, t_plain = timed(plain_loop)
    n_ray, t_ray = timed(ray_pipeline)
    assert n_plain == n_ray == len(refs)
    report(
        f"ingest: decode + preprocess {len(refs)} 512x512 JPEGs to {a.size}x{a.size}x3 on {os.cpu_count()} cores",
        [
            ("plain single-process PIL loop (baseline)", n_plain / t_plain),
            ("Ray Data read_images", n_ray / t_ray),
        ],
        "plain single-process PIL loop (baseline)",
        "img/s",
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
