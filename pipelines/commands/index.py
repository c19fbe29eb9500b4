"""`imgsim index` and `python -m pipelines.build_index`: embed, cluster and build the KNN index."""

from __future__ import annotations

import argparse

from imgsim.config import DEFAULTS, INDEX_KINDS, METRICS
from imgsim.console.arguments import add_data, add_json, add_model, positive_int, print_json
from imgsim.console.command import Command, existing_run


def arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS.index
    add_data(p)
    add_model(p, "a trained model")
    p.add_argument(
        "--clusters",
        type=positive_int,
        default=d.clusters,
        help="number of clusters (K) the images are grouped into",
    )
    p.add_argument("--metric", choices=METRICS, default=d.metric, help="distance between embeddings")
    p.add_argument(
        "--kind",
        choices=INDEX_KINDS,
        default=d.kind,
        help=f"exact: compare a query with every image; ivf: search only the nearest partitions (faster on large collections, may miss a few); auto: ivf from {d.ivf_threshold:,} images",
    )
    p.add_argument(
        "--nprobe",
        type=positive_int,
        default=d.nprobe,
        help="with an ivf index: partitions searched per query; more finds more, slower",
    )
    p.add_argument(
        "--concurrency",
        type=positive_int,
        default=None,
        help=f"embedding processes at once (default: {d.concurrency}; with --gpu, one per GPU of the cluster)",
    )
    p.add_argument("--gpu", action="store_true", help="embed on GPUs, one per embedding process")
    p.add_argument(
        "--full", action="store_true", help="re-embed everything instead of only new or changed images"
    )
    add_json(p, "print the summary as one JSON object")


def run(args: argparse.Namespace) -> int:
    from pipelines.build_index import build_index

    summary = build_index(
        args.data,
        args.model,
        clusters=args.clusters,
        metric=args.metric,
        kind=args.kind,
        nprobe=args.nprobe,
        concurrency=args.concurrency,
        use_gpu=args.gpu,
        full=args.full,
    )
    if args.json:
        print_json(summary)
    else:
        print(
            f"{summary['images']} images, {summary['skipped']} skipped — see {summary['skipped_path']}\n"
            f"embedded {summary['embedded']} new or changed, reused {summary['reused']}, "
            f"removed {summary['removed']}; {summary['clusters']} clusters; "
            f"{summary['index_kind']} {summary['metric']} index in {summary['index_dir']}"
        )
    return 0


COMMAND = Command(
    "index",
    "embed every image, cluster (KMeans) and build the KNN index",
    "Embed every image of DATA with the trained encoder (in parallel, with Ray Data), write "
    "RUN/index/embeddings.parquet and RUN/index/skipped.jsonl, fit KMeans and build the KNN index. "
    "Re-running on the same DATA embeds only new or changed images and drops removed ones.",
    arguments,
    run,
    "pipelines.build_index",
    run_dir=lambda a: existing_run(a.model),
)
