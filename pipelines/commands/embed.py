"""`imgsim embed` and `python -m pipelines.embed`: embed every image into Parquet files."""

from __future__ import annotations

import argparse

from imgsim.config import DEFAULTS
from imgsim.console.arguments import add_data, add_model, positive_int
from imgsim.console.command import Command, existing_run


def arguments(p: argparse.ArgumentParser) -> None:
    add_data(p)
    add_model(p, "a trained model")
    p.add_argument("--out", required=True, metavar="PATH", help="Parquet folder to write (local or s3://)")
    p.add_argument(
        "--concurrency",
        type=positive_int,
        default=None,
        help=f"embedding processes at once (default: {DEFAULTS.index.concurrency}; with --gpu, one per GPU of the cluster)",
    )
    p.add_argument("--gpu", action="store_true", help="embed on GPUs, one per embedding process")


def run(args: argparse.Namespace) -> int:
    from pipelines.embed import write_embeddings

    write_embeddings(args.data, args.model, args.out, concurrency=args.concurrency, use_gpu=args.gpu)
    print(f"embeddings written to {args.out}")
    return 0


COMMAND = Command(
    "embed",
    "embed every image into Parquet files, nothing else (Ray Data)",
    "Embed every image of DATA with RUN's encoder and write the rows (path, label, embedding, "
    "error, content_hash, width, height) as Parquet files under --out, for your own pipeline.",
    arguments,
    run,
    "pipelines.embed",
    run_dir=lambda a: existing_run(a.model),
)
