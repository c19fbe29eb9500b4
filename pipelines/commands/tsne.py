"""`imgsim tsne`: a t-SNE plot of the indexed embeddings."""

from __future__ import annotations

import argparse

from imgsim.console.arguments import add_model, positive_int
from imgsim.console.command import Command


def arguments(p: argparse.ArgumentParser) -> None:
    add_model(p, "an index")
    p.add_argument("--out", required=True, metavar="OUT.png", help="PNG to write")
    p.add_argument(
        "--max-points", type=positive_int, default=10_000, help="most points to plot (a sample of the index)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling and t-SNE")


def run(args: argparse.Namespace) -> int:
    from imgsim.evaluation.plots import plot_tsne_run

    info = plot_tsne_run(args.model, args.out, max_points=args.max_points, seed=args.seed)
    print(f"t-SNE of {info['points']} embeddings written to {args.out}")
    return 0


COMMAND = Command(
    "tsne",
    "t-SNE plot of the indexed embeddings",
    "Project the indexed embeddings (a stratified sample of at most --max-points) to 2-D with t-SNE "
    "and plot them coloured by cluster, and by label where labels are known.",
    arguments,
    run,
)
