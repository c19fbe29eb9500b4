"""The `imgsim` command: parses arguments and calls the library, pipelines and Serve app.

No logic lives here. Each command is one `Command`: an argument builder and a `run` function that
translates the parsed flags into one call and prints the outcome. The same builder serves
`imgsim X` and `python -m pipelines.X` (`main_for`), so both accept the same flags with the same
validation. Heavy modules (torch, Ray) are imported inside `run` so `imgsim --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from imgsim.config import DEFAULTS, INDEX_KINDS, INGRESS_CHOICES, METRICS
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


# --- argument types ------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, got {text}")
    return value


def channels(text: str) -> int | None:
    if text == "auto":
        return None
    if text in ("1", "3"):
        return int(text)
    raise argparse.ArgumentTypeError("channels must be 1, 3 or auto")


# --- arguments shared by several commands ----------------------------------------------------------
def _data(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="local folder or s3://bucket/prefix of images")


def _model(p: argparse.ArgumentParser, needs: str = "a model and an index") -> None:
    p.add_argument("--model", required=True, metavar="RUN", help=f"run directory with {needs}")


def _json(p: argparse.ArgumentParser, what: str = "print one JSON object") -> None:
    p.add_argument("--json", action="store_true", help=what)


def _k(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("-k", type=positive_int, default=DEFAULTS.search.k, help=what)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")


# --- commands: arguments, then what they run ----------------------------------------------------------
def dataset_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=["fashion-mnist"], help="which data set")
    p.add_argument("out", metavar="OUT", help="folder to write the PNGs into")
    p.add_argument(
        "--limit", type=positive_int, default=None, help="first N images per split, balanced across classes"
    )


def run_dataset(args: argparse.Namespace) -> int:
    from imgsim.datasets import write_fashion_mnist

    written = write_fashion_mnist(args.out, limit=args.limit)
    total = sum(written.counts.values())
    parts = ", ".join(f"{n} {split}" for split, n in written.counts.items())
    print(f"wrote {total} images ({parts}) under {written.root}/{{train,test}}/<class>/")
    return 0


def ingest_arguments(p: argparse.ArgumentParser) -> None:
    _data(p)
    p.add_argument(
        "--image-size", type=positive_int, default=DEFAULTS.preprocess.image_size, help="decode to SxS"
    )
    p.add_argument("--channels", type=channels, default=None, help="1, 3 or auto (from a sample of DATA)")
    p.add_argument("--concurrency", type=positive_int, default=None, help="most decode tasks at once")
    p.add_argument("--skipped", metavar="FILE", help="also write the skipped inputs as JSON lines")
    p.add_argument("--show", type=int, default=20, help="skipped inputs to print")
    _json(p)


def run_ingest(args: argparse.Namespace) -> int:
    from pipelines.ingest import check_images

    report = check_images(
        args.data, args.image_size, args.channels, concurrency=args.concurrency, skipped_out=args.skipped
    )
    skipped = report.pop("skipped_inputs")
    if args.json:
        _print_json(report)
        return 0
    print(
        f"{report['files']} files: {report['images']} images decoded to {report['channels']}x"
        f"{report['image_size']}x{report['image_size']}, {report['skipped']} skipped, in "
        f"{report['seconds']:.1f} s ({report['files'] / max(report['seconds'], 1e-9):.0f} files/s)"
    )
    for kind, count in report["skipped_by_reason"].items():
        print(f"  {count:>6}  {kind}")
    for path, reason in skipped[: args.show]:
        print(f"  skipped {path}: {reason}")
    if len(skipped) > args.show:
        more = f" (all in {args.skipped})" if args.skipped else ""
        print(f"  … and {len(skipped) - args.show} more{more}")
    return 0


def train_arguments(p: argparse.ArgumentParser) -> None:
    t = DEFAULTS.train
    _data(p)
    p.add_argument("--out", required=True, metavar="RUN", help="run directory to create or resume")
    p.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help=f"passes over the data (default {t.epochs}; a small data set is then repeated "
        f"within each epoch so that training makes at least {t.min_steps} steps)",
    )
    p.add_argument(
        "--image-size",
        type=positive_int,
        default=DEFAULTS.preprocess.image_size,
        help="images are resized to SxS",
    )
    p.add_argument(
        "--channels",
        type=channels,
        default=None,
        help="1 (greyscale), 3 (RGB) or auto (greyscale if a sample of DATA is)",
    )
    p.add_argument("--dim", type=positive_int, default=t.dim, help="embedding (bottleneck) size")
    p.add_argument("--batch-size", type=positive_int, default=t.batch_size, help="global batch size")
    p.add_argument("--lr", type=float, default=t.lr, help="peak learning rate (AdamW, one-cycle)")
    p.add_argument("--workers", type=positive_int, default=t.workers, help="Ray Train workers (DDP)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (bf16 autocast)")
    p.add_argument(
        "--contrastive",
        type=non_negative_float,
        default=t.nce_weight,
        metavar="W",
        help="weight of an auxiliary contrastive (InfoNCE) term between two augmented views; 0 trains a "
        "plain denoising autoencoder (README: how the default was chosen)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in RUN")
    _json(p, "print the summary as one JSON object")


def run_train(args: argparse.Namespace) -> int:
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


def index_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS.index
    _data(p)
    _model(p, "a trained model")
    p.add_argument("--clusters", type=positive_int, default=d.clusters, help="KMeans clusters (K)")
    p.add_argument("--metric", choices=METRICS, default=d.metric, help="distance for KNN")
    p.add_argument(
        "--kind",
        choices=INDEX_KINDS,
        default=d.kind,
        help=f"exact search, partitioned (IVF), or auto (IVF from {d.ivf_threshold:,} images)",
    )
    p.add_argument("--nprobe", type=positive_int, default=d.nprobe, help="IVF partitions searched per query")
    p.add_argument("--concurrency", type=positive_int, default=d.concurrency, help="embedding actors")
    p.add_argument("--gpu", action="store_true", help="one GPU per embedding actor")
    p.add_argument(
        "--full", action="store_true", help="re-embed everything instead of only new or changed images"
    )
    _json(p, "print the summary as one JSON object")


def run_index(args: argparse.Namespace) -> int:
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


def embed_arguments(p: argparse.ArgumentParser) -> None:
    _data(p)
    _model(p, "a trained model")
    p.add_argument("--out", required=True, metavar="PATH", help="Parquet folder to write (local or s3://)")
    p.add_argument(
        "--concurrency", type=positive_int, default=DEFAULTS.index.concurrency, help="embedding actors"
    )
    p.add_argument("--gpu", action="store_true", help="one GPU per embedding actor")


def run_embed(args: argparse.Namespace) -> int:
    from pipelines.embed import write_embeddings

    write_embeddings(args.data, args.model, args.out, concurrency=args.concurrency, use_gpu=args.gpu)
    print(f"embeddings written to {args.out}")
    return 0


def query_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE_OR_URL", help="query image: path, s3:// URI or http(s) URL")
    _model(p)
    _k(p, "number of results")
    p.add_argument("--plot", metavar="OUT.png", help="draw the query beside its results")
    p.add_argument(
        "--within-cluster",
        action="store_true",
        help="search only the query's predicted cluster (the original design; faster, lower recall)",
    )
    _json(p)


def run_query(args: argparse.Namespace) -> int:
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


def eval_arguments(p: argparse.ArgumentParser) -> None:
    _model(p)
    p.add_argument(
        "--queries", metavar="QDATA", default=None, help="labelled folder or s3:// prefix of query images"
    )
    _k(p, "cut-off k")
    p.add_argument(
        "--within-cluster", action="store_true", help="evaluate search restricted to the predicted cluster"
    )
    _json(p)


def run_eval(args: argparse.Namespace) -> int:
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


def tsne_arguments(p: argparse.ArgumentParser) -> None:
    _model(p, "an index")
    p.add_argument("--out", required=True, metavar="OUT.png", help="PNG to write")
    p.add_argument("--max-points", type=positive_int, default=10_000, help="sample size")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling and t-SNE")


def run_tsne(args: argparse.Namespace) -> int:
    from imgsim.plots import plot_tsne_run

    info = plot_tsne_run(args.model, args.out, max_points=args.max_points, seed=args.seed)
    print(f"t-SNE of {info['points']} embeddings written to {args.out}")
    return 0


def serve_arguments(p: argparse.ArgumentParser) -> None:
    s = DEFAULTS.serve
    _model(p)
    p.add_argument("--host", default=s.host, help="address to listen on")
    p.add_argument("--port", type=positive_int, default=s.port, help="port to listen on")
    p.add_argument("--replicas", type=positive_int, default=s.replicas, help="Serve replicas")
    p.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="let URL queries reach private, loopback and link-local addresses (off: SSRF protection)",
    )
    p.add_argument(
        "--ingress",
        choices=INGRESS_CHOICES,
        default=s.ingress,
        help="HTTP front end: 'haproxy' (HAProxy in front of the replicas: several times the throughput, "
        "docs/serving.md), 'proxy' (Ray Serve's Python HTTP proxy), 'auto' (haproxy when installed)",
    )


def run_serve(args: argparse.Namespace) -> int:
    from serve.launch import serve_forever

    serve_forever(
        args.model,
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        allow_private_urls=args.allow_private_urls,
        ingress=args.ingress,
    )
    return 0


def import_encoder_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model_file",
        metavar="MODEL_FILE",
        help="a TorchScript file (torch.jit.save) or a torch.export file (.pt2, torch.export.save)",
    )
    p.add_argument("--out", required=True, metavar="RUN", help="run directory to create")
    p.add_argument(
        "--image-size", required=True, type=positive_int, help="the model's input side S: images become SxS"
    )
    p.add_argument(
        "--channels",
        type=channels,
        default=None,
        help="1 (greyscale), 3 (RGB) or auto (what a .pt2 was exported for, else 3)",
    )
    p.add_argument(
        "--mean",
        type=float,
        nargs="+",
        metavar="M",
        default=None,
        help="subtracted from the [0, 1] pixels: one value, or one per channel (none: 0)",
    )
    p.add_argument(
        "--std",
        type=float,
        nargs="+",
        metavar="S",
        default=None,
        help="then divided by: one value, or one per channel (none: 1)",
    )
    p.add_argument("--force", action="store_true", help="replace a model RUN already holds")
    _json(p, "print the summary as one JSON object")


def run_import_encoder(args: argparse.Namespace) -> int:
    from imgsim.encoders import import_encoder

    summary = import_encoder(
        args.model_file,
        args.out,
        image_size=args.image_size,
        channels=args.channels,
        mean=args.mean,
        std=args.std,
        force=args.force,
    )
    if args.json:
        _print_json(summary)
        return 0
    s = summary
    batch = f"; fixed batch {s['batch_size']} (run in chunks)" if s["batch_size"] else ""
    print(
        f"imported {s['file']} ({s['format']}: {s['channels']}x{s['image_size']}x{s['image_size']} -> "
        f"{s['dim']}-d embeddings{batch}) into {s['model_dir']}\n"
        f"next: imgsim index DATA --model {args.out}"
    )
    return 0


def demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work", default="demo-run", metavar="DIR", help="folder for the data and the run")
    p.add_argument("--limit", type=positive_int, default=None, help="images per split (default: all 60K/10K)")
    p.add_argument(
        "--epochs", type=positive_int, default=None, help="training epochs (default: train's default)"
    )


def run_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import demo

    demo(args.work, limit=args.limit, epochs=args.epochs)
    return 0


@dataclass(frozen=True)
class Command:
    """One `imgsim` command: its help, its argument builder, what it runs, and its pipeline module
    (for `python -m pipelines.X`, which takes the same arguments)."""

    name: str
    help: str
    description: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    module: str | None = None


COMMANDS: tuple[Command, ...] = (
    Command(
        "dataset",
        "write the built-in default data set as PNG folders",
        "Write Fashion-MNIST as OUT/train/<class>/*.png and OUT/test/<class>/*.png. The IDX files come "
        "from Debian's dataset-fashion-mnist package (/usr/share/datasets/fashion-mnist) when installed, "
        "else they are downloaded from the data set's official URL.",
        dataset_arguments,
        run_dataset,
    ),
    Command(
        "ingest",
        "decode every image once and report what would be skipped (Ray Data)",
        "Read and decode every image of DATA as `imgsim index` would, and report how many are usable "
        "and why the others are skipped. Nothing is written unless --skipped names a file.",
        ingest_arguments,
        run_ingest,
        "pipelines.ingest",
    ),
    Command(
        "train",
        "train the autoencoder on a folder or s3:// prefix (Ray Train)",
        "Train the convolutional autoencoder with Ray Train's TorchTrainer (DDP across --workers). "
        "Labels are never used: the embedding is learned without supervision. Checkpoints go under "
        "RUN/checkpoints (resume with --resume); the model under RUN/model; the loss curve to "
        "RUN/plots/loss.png.",
        train_arguments,
        run_train,
        "pipelines.train",
    ),
    Command(
        "index",
        "embed every image, cluster (KMeans) and build the KNN index",
        "Embed every image of DATA with the trained encoder (a Ray Data actor pool), write "
        "RUN/index/embeddings.parquet and RUN/index/skipped.jsonl, fit KMeans and build the KNN index. "
        "Re-running on the same DATA embeds only new or changed images and drops removed ones.",
        index_arguments,
        run_index,
        "pipelines.build_index",
    ),
    Command(
        "embed",
        "embed every image into Parquet files, nothing else (Ray Data)",
        "Embed every image of DATA with RUN's encoder and write the rows (path, label, embedding, "
        "error, content_hash, width, height) as Parquet files under --out, for your own pipeline.",
        embed_arguments,
        run_embed,
        "pipelines.embed",
    ),
    Command(
        "query",
        "the N indexed images most like an image (path or URL)",
        "Embed IMAGE_OR_URL (a local path, s3:// URI or http(s) URL), predict its cluster and print the "
        "top N most similar indexed images with their distances.",
        query_arguments,
        run_query,
    ),
    Command(
        "eval",
        "retrieval quality (precision@k, mAP@k) on labelled data",
        "Without --queries every indexed image queries the rest (itself excluded); with --queries, "
        "QDATA's images query the index. A result is relevant when its label equals the query's.",
        eval_arguments,
        run_eval,
        "pipelines.evaluate",
    ),
    Command(
        "tsne",
        "t-SNE plot of the indexed embeddings",
        "Project the indexed embeddings (a stratified sample of at most --max-points) to 2-D with t-SNE "
        "and plot them coloured by cluster, and by label where labels are known.",
        tsne_arguments,
        run_tsne,
    ),
    Command(
        "serve",
        "serve search over HTTP (Ray Serve) with a web page",
        "Run the Ray Serve app until interrupted: POST /search, GET /images/{id}, GET /healthz and a "
        "web page at /. Set IMGSIM_API_KEY to require 'Authorization: Bearer <key>'.",
        serve_arguments,
        run_serve,
    ),
    Command(
        "import-encoder",
        "make a run from your own TorchScript or torch.export encoder",
        "Check MODEL_FILE (a TorchScript or torch.export .pt2 file mapping a float batch (N, C, S, S) in "
        "[0, 1], normalised by --mean/--std when given, to (N, D) vectors) on a probe batch, then store it "
        "as RUN's model: index, query, eval, serve and tsne then use it like a trained one. A file that "
        "is not such a model is refused and nothing is written. imgsim train refuses a run whose model "
        "was imported. The file's code runs when it is loaded: import only files you trust.",
        import_encoder_arguments,
        run_import_encoder,
    ),
    Command(
        "demo",
        "the whole pipeline on Fashion-MNIST",
        "Data set -> train -> index -> eval (test split as queries) -> t-SNE -> one query plot, "
        "then a summary of the figures and where every file went.",
        demo_arguments,
        run_demo,
        "pipelines.demo",
    ),
)


def _command(name: str) -> Command:
    return next(c for c in COMMANDS if c.name == name)


def _command_parser(command: Command, prog: str, **kwargs: Any) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=prog,
        description=command.description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        **kwargs,
    )


def build_parser() -> argparse.ArgumentParser:
    """The `imgsim` parser: one sub-command per entry of COMMANDS."""
    parser = argparse.ArgumentParser(
        prog="imgsim",
        description="Image-similarity search: learn a compact embedding of a folder or S3 prefix of images "
        "with a convolutional autoencoder (Ray Train), embed and cluster them (Ray Data, KMeans), "
        "and answer 'the N images most like this one' from the command line, Python or HTTP (Ray Serve).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.description,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        command.arguments(p)
        p.set_defaults(func=command.run)
    return parser


def _execute(args: argparse.Namespace) -> int:
    """Run a parsed command; expected failures end in one line on stderr and exit status 1."""
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


def main(argv: Sequence[str] | None = None) -> int:
    """`imgsim COMMAND ...`."""
    return _execute(build_parser().parse_args(argv))


def main_for(name: str, argv: Sequence[str] | None = None) -> int:
    """`python -m pipelines.X ...`: the command `name` with its own parser (same flags as `imgsim X`).

    Called from a pipeline module's `if __name__ == "__main__"` block: the command imports that
    module again under its real name, so Ray pickles its functions by reference (a function defined
    in `__main__` would be pickled by value, with every global it touches).
    """
    command = _command(name)
    parser = _command_parser(command, prog=f"python -m {command.module}")
    command.arguments(parser)
    parser.set_defaults(func=command.run)
    return _execute(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
