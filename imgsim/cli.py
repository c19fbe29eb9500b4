"""The `imgsim` command: parses arguments and calls the library, pipelines and Serve app.

No logic lives here: each `cmd_*` function translates flags into one call and prints the outcome.
Heavy modules (torch, Ray) are imported inside commands so `imgsim --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from imgsim.config import DEFAULTS, INGRESS_CHOICES
from imgsim.errors import ImgsimError

EPILOG = """\
DATA is a local folder or s3://bucket/prefix (images found recursively; an image's label is its
first sub-folder). S3 uses the standard AWS settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_PROFILE). RUN is a run directory holding the model, the
index and plots. Typical use:

  imgsim dataset fashion-mnist data/fm --limit 10000
  imgsim train data/fm/train --out runs/fm
  imgsim index data/fm/train --model runs/fm
  imgsim query data/fm/test/bag/00017.png --model runs/fm -k 8 --plot q.png
  imgsim eval --model runs/fm --queries data/fm/test
  imgsim serve --model runs/fm

Set IMGSIM_DEBUG=1 to see full tracebacks.
"""


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, got {text}")
    return value


def _channels(text: str) -> int | None:
    if text == "auto":
        return None
    if text in ("1", "3"):
        return int(text)
    raise argparse.ArgumentTypeError("channels must be 1, 3 or auto")


# --- commands -----------------------------------------------------------------------------------


def cmd_dataset(args: argparse.Namespace) -> int:
    from imgsim.datasets import write_fashion_mnist

    written = write_fashion_mnist(args.out, limit=args.limit)
    total = sum(written.counts.values())
    parts = ", ".join(f"{n} {split}" for split, n in written.counts.items())
    print(f"wrote {total} images ({parts}) under {written.root}/{{train,test}}/<class>/")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipelines.train import train

    summary = train(
        args.data,
        args.out,
        epochs=args.epochs,
        image_size=args.image_size,
        channels=args.channels,
        dim=args.dim,
        batch_size=args.batch_size,
        lr=args.lr,
        workers=args.workers,
        use_gpu=args.gpu,
        resume=args.resume,
        nce_weight=args.contrastive,
    )
    if args.json:
        _print_json(summary)
    else:
        print(
            f"trained {summary['epochs']} epochs on {summary['images']} images "
            f"(final loss {summary['final_loss']:.4f}); model saved to {summary['model_dir']}"
        )
    return 0


def cmd_index(args: argparse.Namespace) -> int:
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
        _print_json(summary)
    else:
        print(
            f"{summary['images']} images, {summary['skipped']} skipped — see {summary['skipped_path']}\n"
            f"embedded {summary['embedded']} new or changed, reused {summary['reused']}, "
            f"removed {summary['removed']}; {summary['clusters']} clusters; "
            f"{summary['index_kind']} {summary['metric']} index in {summary['index_dir']}"
        )
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from imgsim.search import Searcher

    searcher = Searcher.load(args.model)
    result = searcher.search(args.image, k=args.k, within_cluster=args.within_cluster)
    if args.plot:
        from imgsim.plots import plot_results

        plot_results(searcher, args.image, result, args.plot)
    if args.json:
        _print_json(result)
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


def cmd_eval(args: argparse.Namespace) -> int:
    from pipelines.evaluate import evaluate_run

    metrics = evaluate_run(args.model, queries=args.queries, k=args.k, within_cluster=args.within_cluster)
    if args.json:
        _print_json(metrics)
    else:
        print(
            f"{metrics['queries']} queries against {metrics['database']} images, k={metrics['k']}: "
            f"precision@1 {metrics['precision_at_1']:.4f}  precision@{metrics['k']} "
            f"{metrics['precision_at_k']:.4f}  mAP@{metrics['k']} {metrics['map_at_k']:.4f}  "
            f"recall@{metrics['k']} {metrics['recall_at_k']:.4f}"
        )
    return 0


def cmd_tsne(args: argparse.Namespace) -> int:
    from imgsim.plots import plot_tsne_run

    info = plot_tsne_run(args.model, args.out, max_points=args.max_points, seed=args.seed)
    print(f"t-SNE of {info['points']} embeddings written to {args.out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serve import ingress

    if os.environ.get("RAY_ADDRESS"):
        chosen = "as configured on the cluster at RAY_ADDRESS"
    else:  # our own local Ray: its processes inherit this environment
        chosen = ingress.apply(args.ingress)
    from serve.app import run

    run(
        args.model,
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        allow_private_urls=args.allow_private_urls,
        ingress=chosen,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import demo

    demo(args.work, limit=args.limit, epochs=args.epochs)
    return 0


# --- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    parser = argparse.ArgumentParser(
        prog="imgsim",
        description="Image-similarity search: learn a compact embedding of a folder or S3 prefix of images "
        "with a convolutional autoencoder (Ray Train), embed and cluster them (Ray Data, KMeans), "
        "and answer 'the N images most like this one' from the command line, Python or HTTP (Ray Serve).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help_, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        return p

    p = add(
        "dataset",
        "write the built-in default data set as PNG folders",
        "Write Fashion-MNIST as OUT/train/<class>/*.png and OUT/test/<class>/*.png. The IDX files come "
        "from Debian's dataset-fashion-mnist package (/usr/share/datasets/fashion-mnist) when installed, "
        "else they are downloaded from the data set's official URL.",
    )
    p.add_argument("name", choices=["fashion-mnist"], help="which data set")
    p.add_argument("out", metavar="OUT", help="folder to write the PNGs into")
    p.add_argument(
        "--limit", type=_positive_int, default=None, help="first N images per split, balanced across classes"
    )
    p.set_defaults(func=cmd_dataset)

    p = add(
        "train",
        "train the autoencoder on a folder or s3:// prefix (Ray Train)",
        "Train the convolutional autoencoder with Ray Train's TorchTrainer (DDP across --workers). "
        "Labels are never used: the embedding is learned without supervision. Checkpoints go under "
        "RUN/checkpoints (resume with --resume); the model under RUN/model; the loss curve to "
        "RUN/plots/loss.png.",
    )
    p.add_argument("data", metavar="DATA", help="local folder or s3://bucket/prefix of images")
    p.add_argument("--out", required=True, metavar="RUN", help="run directory to create or resume")
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help=f"passes over the data (default {d.train.epochs}; a small data set is then repeated "
        f"within each epoch so that training makes at least {d.train.min_steps} steps)",
    )
    p.add_argument(
        "--image-size", type=_positive_int, default=d.preprocess.image_size, help="images are resized to SxS"
    )
    p.add_argument(
        "--channels",
        type=_channels,
        default=None,
        help="1 (greyscale), 3 (RGB) or auto (greyscale if a sample of DATA is)",
    )
    p.add_argument("--dim", type=_positive_int, default=d.train.dim, help="embedding (bottleneck) size")
    p.add_argument("--batch-size", type=_positive_int, default=d.train.batch_size, help="global batch size")
    p.add_argument("--lr", type=float, default=d.train.lr, help="peak learning rate (AdamW, one-cycle)")
    p.add_argument("--workers", type=_positive_int, default=d.train.workers, help="Ray Train workers (DDP)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (bf16 autocast)")
    p.add_argument(
        "--contrastive",
        type=_non_negative_float,
        default=d.train.nce_weight,
        metavar="W",
        help="weight of an auxiliary contrastive (InfoNCE) term between two augmented views; 0 (default) "
        "trains a plain denoising autoencoder, which was better on short budgets (see README)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in RUN")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=cmd_train)

    p = add(
        "index",
        "embed every image, cluster (KMeans) and build the KNN index",
        "Embed every image of DATA with the trained encoder (a Ray Data actor pool), write "
        "RUN/index/embeddings.parquet and RUN/index/skipped.jsonl, fit KMeans and build the KNN index. "
        "Re-running on the same DATA embeds only new or changed images and drops removed ones.",
    )
    p.add_argument("data", metavar="DATA", help="local folder or s3://bucket/prefix of images")
    p.add_argument("--model", required=True, metavar="RUN", help="run directory holding a trained model")
    p.add_argument("--clusters", type=_positive_int, default=d.index.clusters, help="KMeans clusters (K)")
    p.add_argument("--metric", choices=["cosine", "l2"], default=d.index.metric, help="distance for KNN")
    p.add_argument(
        "--kind",
        choices=["auto", "exact", "ivf"],
        default=d.index.kind,
        help=f"exact search, partitioned (IVF), or auto (IVF above {d.index.ivf_threshold:,} images)",
    )
    p.add_argument(
        "--nprobe", type=_positive_int, default=d.index.nprobe, help="IVF partitions searched per query"
    )
    p.add_argument("--concurrency", type=_positive_int, default=d.index.concurrency, help="embedding actors")
    p.add_argument("--gpu", action="store_true", help="one GPU per embedding actor")
    p.add_argument(
        "--full", action="store_true", help="re-embed everything instead of only new or changed images"
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=cmd_index)

    p = add(
        "query",
        "the N indexed images most like an image (path or URL)",
        "Embed IMAGE_OR_URL (a local path, s3:// URI or http(s) URL), predict its cluster and print the "
        "top N most similar indexed images with their distances.",
    )
    p.add_argument("image", metavar="IMAGE_OR_URL", help="query image: path, s3:// URI or http(s) URL")
    p.add_argument("--model", required=True, metavar="RUN", help="run directory with a model and an index")
    p.add_argument("-k", type=_positive_int, default=10, help="number of results")
    p.add_argument("--plot", metavar="OUT.png", help="draw the query beside its results")
    p.add_argument(
        "--within-cluster",
        action="store_true",
        help="search only the query's predicted cluster (the original design; faster, lower recall)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_query)

    p = add(
        "eval",
        "retrieval quality (precision@k, mAP@k) on labelled data",
        "Without --queries every indexed image queries the rest (itself excluded); with --queries, "
        "QDATA's images query the index. A result is relevant when its label equals the query's.",
    )
    p.add_argument("--model", required=True, metavar="RUN", help="run directory with a model and an index")
    p.add_argument(
        "--queries", metavar="QDATA", default=None, help="labelled folder or s3:// prefix of query images"
    )
    p.add_argument("-k", type=_positive_int, default=10, help="cut-off k")
    p.add_argument(
        "--within-cluster", action="store_true", help="evaluate search restricted to the predicted cluster"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = add(
        "tsne",
        "t-SNE plot of the indexed embeddings",
        "Project the indexed embeddings (a stratified sample of at most --max-points) to 2-D with t-SNE "
        "and plot them coloured by cluster, and by label where labels are known.",
    )
    p.add_argument("--model", required=True, metavar="RUN", help="run directory with an index")
    p.add_argument("--out", required=True, metavar="OUT.png", help="PNG to write")
    p.add_argument("--max-points", type=_positive_int, default=10_000, help="sample size")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling and t-SNE")
    p.set_defaults(func=cmd_tsne)

    p = add(
        "serve",
        "serve search over HTTP (Ray Serve) with a web page",
        "Run the Ray Serve app until interrupted: POST /search, GET /images/{id}, GET /healthz and a "
        "web page at /. Set IMGSIM_API_KEY to require 'Authorization: Bearer <key>'.",
    )
    p.add_argument("--model", required=True, metavar="RUN", help="run directory with a model and an index")
    p.add_argument("--host", default=d.serve.host, help="address to listen on")
    p.add_argument("--port", type=_positive_int, default=d.serve.port, help="port to listen on")
    p.add_argument("--replicas", type=_positive_int, default=d.serve.replicas, help="Serve replicas")
    p.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="let URL queries reach private, loopback and link-local addresses (off: SSRF protection)",
    )
    p.add_argument(
        "--ingress",
        choices=INGRESS_CHOICES,
        default=d.serve.ingress,
        help="HTTP front end: 'haproxy' (HAProxy in front of the replicas; 2.7x the throughput here), "
        "'proxy' (Ray Serve's Python HTTP proxy), 'auto' (haproxy when installed)",
    )
    p.set_defaults(func=cmd_serve)

    p = add(
        "demo",
        "the whole pipeline on Fashion-MNIST",
        "Data set -> train -> index -> eval (test split as queries) -> t-SNE -> one query plot, "
        "then a summary of the figures and where every file went.",
    )
    p.add_argument("--work", default="demo-run", metavar="DIR", help="folder for the data and the run")
    p.add_argument(
        "--limit", type=_positive_int, default=None, help="images per split (default: all 60K/10K)"
    )
    p.add_argument(
        "--epochs", type=_positive_int, default=None, help="training epochs (default: train's default)"
    )
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("imgsim: interrupted", file=sys.stderr)
        return 130
    except ImgsimError as e:
        print(f"imgsim: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # anything unexpected still ends in one line, unless debugging
        if os.environ.get("IMGSIM_DEBUG"):
            raise
        print(
            f"imgsim: error: {type(e).__name__}: {e} (set IMGSIM_DEBUG=1 for the traceback)", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
