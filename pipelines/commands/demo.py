"""`imgsim demo` and `python -m pipelines.demo`: the whole pipeline on Fashion-MNIST."""

from __future__ import annotations

import argparse
import os

from imgsim.console.arguments import positive_int
from imgsim.console.command import Command, new_run


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work", default="demo-run", metavar="DIR", help="folder for the data and the run")
    p.add_argument("--limit", type=positive_int, default=None, help="images per split (default: all)")
    p.add_argument(
        "--epochs", type=positive_int, default=None, help="training epochs (default: as imgsim train chooses)"
    )


def run(args: argparse.Namespace) -> int:
    from pipelines.demo import demo

    demo(args.work, limit=args.limit, epochs=args.epochs)
    return 0


COMMAND = Command(
    "demo",
    "the whole pipeline on Fashion-MNIST",
    "Data set -> train -> index -> eval (test split as queries) -> t-SNE -> one query plot, "
    "then a summary of the figures and where every file went.",
    arguments,
    run,
    "pipelines.demo",
    run_dir=lambda a: new_run(os.path.join(a.work, "run")),
)
