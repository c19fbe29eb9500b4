"""`imgsim dataset`: write the built-in default data set (Fashion-MNIST) as PNG folders."""

from __future__ import annotations

import argparse

from imgsim.console.arguments import positive_int
from imgsim.console.command import Command


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=["fashion-mnist"], help="which data set")
    p.add_argument("out", metavar="OUT", help="folder to write the PNGs into")
    p.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="first N images per split, balanced across classes (default: all)",
    )


def run(args: argparse.Namespace) -> int:
    from imgsim.data.datasets import write_fashion_mnist

    written = write_fashion_mnist(args.out, limit=args.limit)
    total = sum(written.counts.values())
    parts = ", ".join(f"{n} {split}" for split, n in written.counts.items())
    print(f"wrote {total} images ({parts}) under {written.root}/{{train,test}}/<class>/")
    return 0


COMMAND = Command(
    "dataset",
    "write the built-in default data set as PNG folders",
    "Write Fashion-MNIST as OUT/train/<class>/*.png and OUT/test/<class>/*.png. The IDX files come "
    "from Debian's dataset-fashion-mnist package (/usr/share/datasets/fashion-mnist) when installed, "
    "else they are downloaded from the data set's official URL.",
    arguments,
    run,
)
