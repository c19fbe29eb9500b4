"""`imgsim query`: the indexed images most like one image, or its duplicates (`--duplicates`)."""

from __future__ import annotations

import argparse

from imgsim.console.arguments import add_json, add_k, add_model, non_negative_float, print_json
from imgsim.console.command import Command
from imgsim.errors import ImgsimError


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE_OR_URL", help="query image: path, s3:// URI or http(s) URL")
    add_model(p)
    add_k(p, "number of results")
    p.add_argument("--plot", metavar="OUT.png", help="draw the query beside its results")
    p.add_argument(
        "--within-cluster",
        action="store_true",
        help="search only the images of the query's cluster: faster, may miss close images in other clusters",
    )
    p.add_argument(
        "--duplicates",
        action="store_true",
        help="instead: is the image a duplicate of indexed ones? Every indexed image within the run's "
        "calibrated threshold (calibrated now if the run has none yet), byte-identical files first",
    )
    p.add_argument(
        "--threshold",
        type=non_negative_float,
        default=None,
        metavar="D",
        help="with --duplicates: this distance instead of the run's threshold",
    )
    add_json(p)


def run(args: argparse.Namespace) -> int:
    from imgsim.index.search import Searcher

    if args.duplicates:
        return _run_query_duplicates(args)
    searcher = Searcher.load(args.model)
    result = searcher.search(args.image, k=args.k, within_cluster=args.within_cluster)
    if args.plot:
        from imgsim.evaluation.plots import plot_results

        plot_results(searcher, args.image, result, args.plot)
    if args.json:
        print_json(result)
        return 0
    print(f"query: {result['query']}  (cluster {result['cluster']})")
    print(f"{'rank':>4}  {'distance':>9}  {'cluster':>7}  {'label':<14} path")
    for r in result["results"]:
        print(
            f"{r['rank']:>4}  {r['distance']:>9.4f}  {r['cluster']:>7}  {str(r['label'] or '-'):<14} {r['path']}"
        )
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def _run_query_duplicates(args: argparse.Namespace) -> int:
    from imgsim.duplicates.lookup import DuplicateLookup

    if args.plot or args.within_cluster:
        raise ImgsimError("--duplicates answers with the matches only: drop --plot and --within-cluster")
    answer = DuplicateLookup.load(args.model).duplicates_of(args.image, threshold=args.threshold)
    if args.json:
        print_json(answer)
        return 0
    verdict = "a duplicate" if answer["duplicate"] else "not a duplicate"
    print(
        f"{answer['query']} is {verdict} of an indexed image "
        f"(threshold {answer['threshold']:.6g}, {answer['threshold_source']})"
    )
    for m in answer["matches"]:
        kind = "identical bytes" if m["exact"] else "near"
        print(f"  {m['distance']:>9.4f}  {kind:<15} {m['path']}")
    return 0


COMMAND = Command(
    "query",
    "the N indexed images most like an image (path or URL)",
    "Embed IMAGE_OR_URL (a local path, s3:// URI or http(s) URL), predict its cluster and print the "
    "top N most similar indexed images with their distances.",
    arguments,
    run,
)
