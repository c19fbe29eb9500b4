"""The `imgsim` command: parses arguments and calls the library, pipelines and Serve app.

No logic lives here. Each command is one `Command`: an argument builder and a `run` function that
translates the parsed flags into one call and prints the outcome. The same builder serves
`imgsim X` and `python -m pipelines.X` (`main_for`), so both accept the same flags with the same
validation. Heavy modules (torch, Ray) are imported inside `run` so `imgsim --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from imgsim.config import DEFAULTS, INDEX_KINDS, INGRESS_CHOICES, METRICS, PATHS_CHOICES
from imgsim.console import output as console
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

The console shows progress only; Ray's own driver and worker logs go to RUN/logs/<command>-<time>/
(-v/--verbose or IMGSIM_LOG=debug shows them live). Set IMGSIM_DEBUG=1 to see full tracebacks.
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


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
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


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help; text is wrapped, except lines indented by two spaces (lists), kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out, paragraph = [], []
        for line in text.splitlines():
            if line.startswith("  ") or not line.strip():
                if paragraph:
                    out.append(super()._fill_text(" ".join(paragraph), width, indent))
                    paragraph = []
                out.append(indent + line)
            else:
                paragraph.append(line)
        if paragraph:
            out.append(super()._fill_text(" ".join(paragraph), width, indent))
        return "\n".join(out)


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
    from imgsim.data.datasets import write_fashion_mnist

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
    from imgsim.models.autoencoder import ARCHS
    from imgsim.training.recipes import RECIPES, SMALL_IMAGE_SIDE

    t = DEFAULTS.train
    _data(p)
    p.add_argument("--out", required=True, metavar="RUN", help="run directory to create or resume")
    choice = p.add_argument_group(
        "what to train (default: chosen from a sample of DATA and the hardware, and printed)",
        f"Small images (median shorter side <= {SMALL_IMAGE_SIDE} px, e.g. Fashion-MNIST) get the small "
        "32 px autoencoder trained as a denoising autoencoder whose embedding also learns which images "
        "histograms of oriented gradients find close (recipe 'denoise-hog'; 'denoise' leaves that out). "
        "Larger images (photos) get the residual "
        "encoder at 64 px on a CPU (96 px on a GPU) trained with the 'copy' recipe: the decoder "
        "reconstructs each image from edited views (crops, mirror, greyscale, colour, blur) while an "
        "invariance term pulls the views' embeddings together, so an edited copy finds its original; "
        "its embedding is mirror-symmetric. Each flag below overrides its part of that choice. On a GPU, "
        "and on a CPU that computes bf16 natively (AVX-512 BF16 / AMX), training and embedding run in "
        "bf16 autocast, and the 'copy' recipe takes more steps in the same minutes; IMGSIM_CPU_BF16=0 "
        "keeps a CPU in float32.",
    )
    choice.add_argument(
        "--arch", choices=ARCHS, default=None, help="small: 32 px conv AE; resnet: residual, GeM"
    )
    choice.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default=None,
        help="training objective: denoise-hog (small images), denoise (pixels only), copy (photos)",
    )
    choice.add_argument("--image-size", type=positive_int, default=None, help="images are resized to SxS")
    choice.add_argument(
        "--channels",
        type=channels,
        default=None,
        help="1 (greyscale), 3 (RGB) or auto (greyscale if a sample of DATA is)",
    )
    choice.add_argument("--dim", type=positive_int, default=None, help="embedding (bottleneck) size")
    length = p.add_argument_group("how long")
    length.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help=f"exactly E passes over the data (default: the recipe's length: 'copy' {RECIPES['copy'].steps} "
        f"steps of {RECIPES['copy'].batch_size} images on a CPU, 4x on a GPU; 'denoise' and 'denoise-hog' {t.epochs} passes, a "
        f"small data set repeated up to {t.min_steps} steps)",
    )
    length.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"about N optimiser steps in all, in {t.epochs} epochs",
    )
    length.add_argument(
        "--batch-size", type=positive_int, default=None, help="global batch size (default: the recipe's)"
    )
    length.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (AdamW, one-cycle; default: the recipe's)"
    )
    length.add_argument(
        "--contrastive",
        type=non_negative_float,
        default=None,
        metavar="W",
        help="weight of the invariance (InfoNCE) term between two edited views (default: the recipe's, "
        f"'copy' {RECIPES['copy'].nce_weight:g}, 'denoise' {RECIPES['denoise'].nce_weight:g}: README, how the defaults were chosen)",
    )
    where = p.add_argument_group("where")
    where.add_argument("--workers", type=positive_int, default=t.workers, help="Ray Train workers (DDP)")
    where.add_argument("--gpu", action="store_true", help="train on GPUs (bf16 autocast)")
    where.add_argument(
        "--gpus-per-worker",
        type=positive_float,
        default=1.0,
        metavar="F",
        help="GPUs per worker; below 1 packs several workers on one GPU (they then use gloo)",
    )
    where.add_argument(
        "--backend",
        choices=("nccl", "gloo"),
        default=None,
        help="torch.distributed backend (default: nccl with a whole GPU per worker, else gloo)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in RUN")
    _json(p, "print the summary as one JSON object")


def run_train(args: argparse.Namespace) -> int:
    from pipelines.train import train

    summary = train(
        args.data,
        args.out,
        epochs=args.epochs,
        steps=args.steps,
        image_size=args.image_size,
        channels=args.channels,
        dim=args.dim,
        batch_size=args.batch_size,
        lr=args.lr,
        workers=args.workers,
        use_gpu=args.gpu,
        gpus_per_worker=args.gpus_per_worker,
        backend=args.backend,
        resume=args.resume,
        nce_weight=args.contrastive,
        arch=args.arch,
        recipe=args.recipe,
    )
    if args.json:
        _print_json(summary)
    else:
        print(
            f"trained {summary['epochs']} epochs ({summary['steps']:,} steps, {summary['arch']} "
            f"{summary['image_size']} px, recipe {summary['recipe']}) on {summary['images']} images "
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
    p.add_argument(
        "--concurrency",
        type=positive_int,
        default=None,
        help=f"embedding actors (default {d.concurrency}; with --gpu, one per GPU of the cluster)",
    )
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
        "--concurrency",
        type=positive_int,
        default=None,
        help=f"embedding actors (default {DEFAULTS.index.concurrency}; with --gpu, one per GPU of the cluster)",
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
        help="with --duplicates: this distance",
    )
    _json(p)


def run_query(args: argparse.Namespace) -> int:
    from imgsim.index.search import Searcher

    if args.duplicates:
        return _run_query_duplicates(args)
    searcher = Searcher.load(args.model)
    result = searcher.search(args.image, k=args.k, within_cluster=args.within_cluster)
    if args.plot:
        from imgsim.evaluation.plots import plot_results

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


def _precision(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--precision",
        type=probability,
        default=DEFAULTS.duplicates.precision,
        metavar="P",
        help=f"target precision of the {what} distance threshold, calibrated from edited copies",
    )


def _run_query_duplicates(args: argparse.Namespace) -> int:
    from imgsim.index.search import Searcher

    if args.plot or args.within_cluster:
        raise ImgsimError("--duplicates answers with the matches only: drop --plot and --within-cluster")
    answer = Searcher.load(args.model).duplicates_of(args.image, threshold=args.threshold)
    if args.json:
        _print_json(answer)
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


def duplicates_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS.duplicates
    _model(p)
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--threshold",
        type=non_negative_float,
        default=None,
        metavar="D",
        help="near-duplicate distance (default: calibrated from edited copies for --precision, stored in RUN)",
    )
    how.add_argument(
        "--precision",
        type=probability,
        default=d.precision,
        metavar="P",
        help="target precision of the calibrated threshold (imgsim eval --copies measures the same)",
    )
    p.add_argument(
        "--out", metavar="DIR", default=None, help="where to write the reports (default RUN/duplicates)"
    )
    p.add_argument(
        "--copies",
        type=positive_int,
        default=d.calibration_copies,
        help="indexed images whose copies calibrate",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="which images the calibration draws")
    p.add_argument(
        "--recalibrate", action="store_true", help="calibrate again even if the run has a threshold"
    )
    p.add_argument(
        "--full", action="store_true", help="search every image, not only those new since the last run"
    )
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="decide by the embedding's threshold alone: no geometric check of candidate pairs (by "
        "default, pairs of images of 64 px or more are checked with local features that must agree on "
        "one crop/scale/rotation/mirror, out to the calibration's candidate_radius)",
    )
    p.add_argument(
        "--html-groups", type=positive_int, default=d.html_groups, help="groups drawn in duplicates.html"
    )
    p.add_argument(
        "--nprobe",
        type=positive_int,
        default=None,
        help="IVF partitions each image's range search scans (default: the index's); fewer is faster and "
        "may miss a pair across a partition boundary (at 1M images, 4 found the same groups as 16 in "
        "a third of the time: README)",
    )
    _json(p, "print the summary as one JSON object")


def run_duplicates(args: argparse.Namespace) -> int:
    from pipelines.duplicates import duplicates

    summary = duplicates(
        args.model,
        threshold=args.threshold,
        precision=args.precision,
        out=args.out,
        full=args.full,
        verify=args.verify,
        recalibrate=args.recalibrate,
        copies=args.copies,
        seed=args.seed,
        html_groups=args.html_groups,
        nprobe=args.nprobe,
    )
    if args.json:
        _print_json(summary)
        return 0
    cal = summary["calibration"]
    how = summary["threshold_source"]
    if cal and cal.get("met"):
        how += f": precision {cal['precision']} at recall {cal['recall']} on {cal['queries']} copies"
    print(
        f"{summary['groups']} groups ({summary['exact_groups']} of byte-identical files), "
        f"{summary['images_in_groups']} of {summary['images']} images; threshold {summary['threshold']:.6g} ({how})"
    )
    for kind, path in summary["files"].items():
        print(f"  {kind:<5} {path}")
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
    p.add_argument(
        "--copies",
        type=positive_int,
        default=None,
        metavar="N",
        help="label-free instead: edited copies of N randomly chosen indexed images query the index "
        "(the edits are listed above)",
    )
    p.add_argument("--seed", type=int, default=DEFAULTS.duplicates.seed, help="which images --copies draws")
    _precision(p, "suggested")
    p.add_argument(
        "--edits",
        type=_edit_list,
        default=None,
        metavar="E1,E2",
        help="with --copies: only these edits (default: all; held-out ones are reported apart)",
    )
    _json(p)


def _edit_list(text: str) -> tuple[str, ...]:
    from imgsim.evaluation.edits import EDITS

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in EDITS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown edit {', '.join(unknown)}; choose from {', '.join(EDITS)}")
    return names


def run_eval(args: argparse.Namespace) -> int:
    if args.copies is not None:
        return _run_eval_copies(args)
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


def _run_eval_copies(args: argparse.Namespace) -> int:
    from imgsim.evaluation.copies import DEFAULT_EDITS
    from pipelines.evaluate import evaluate_copies_run

    if args.queries or args.within_cluster:
        raise ImgsimError(
            "--copies is label-free and uses the whole index: drop --queries and --within-cluster"
        )
    report = evaluate_copies_run(
        args.model,
        args.copies,
        seed=args.seed,
        k=args.k,
        precision=args.precision,
        edits=args.edits or DEFAULT_EDITS,
    )
    if args.json:
        _print_json(report)
        return 0
    k = report["k"]

    def row(name: str, m: dict[str, Any]) -> str:
        cells = [m["precision_at_1"], m[f"recall_at_{k}"], m[f"map_at_{k}"], m.get("copy_distance_median")]
        return f"  {name:<20}{m['queries']:>7}" + "".join(
            f"{c:>10.4f}" if c is not None else f"{'-':>10}" for c in cells
        )

    header = f"  {'edit':<20}{'copies':>7}{'P@1':>10}{f'R@{k}':>10}{f'mAP@{k}':>10}{'dist p50':>10}"
    print(
        f"{report['copies']} images, their edited copies against {report['database']} indexed (k={k}, seed {report['seed']})"
    )
    print(header)
    print(row("trained edits + mix", report))
    for name, m in report["per_edit"].items():
        print(row(name, m))
    if report["held_out"]["queries"]:
        print(row("held-out edits", report["held_out"]))
        for name, m in report["held_out"]["per_edit"].items():
            print(row(name, m))
    d = report["distances"]
    print(
        f"distance to the original p50 {d['copy']['p50']}, p95 {d['copy']['p95']}; "
        f"to the nearest non-copy p5 {d['nearest_non_copy']['p5']}, p50 {d['nearest_non_copy']['p50']}"
    )
    t = report["threshold"]
    if t["met"]:
        print(
            f"suggested threshold {report['suggested_threshold']}: precision {t['precision']} "
            f"(target {t['precision_target']}), recall {t['recall']}"
        )
    else:
        print(
            f"no distance reaches precision {t['precision_target']}: suggested threshold 0 (exact copies only)"
        )
    if report["skipped"]:
        print(f"{len(report['skipped'])} originals or copies skipped (see --json)")
    return 0


def tsne_arguments(p: argparse.ArgumentParser) -> None:
    _model(p, "an index")
    p.add_argument("--out", required=True, metavar="OUT.png", help="PNG to write")
    p.add_argument("--max-points", type=positive_int, default=10_000, help="sample size")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling and t-SNE")


def run_tsne(args: argparse.Namespace) -> int:
    from imgsim.evaluation.plots import plot_tsne_run

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
    p.add_argument("--access-log", action="store_true", help="print a line per HTTP request")
    p.add_argument("--paths", choices=PATHS_CHOICES, default=s.paths, help="how results show an image's path: "
                   "relative to the indexed folder, the server's absolute path, or none")  # fmt: skip


def run_serve(args: argparse.Namespace) -> int:
    from serve.launch import serve_forever

    serve_forever(
        args.model,
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        allow_private_urls=args.allow_private_urls,
        ingress=args.ingress,
        access_log=args.access_log,
        paths=args.paths,
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
    from imgsim.models.encoders import import_encoder

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


def _edits_help() -> str:
    from imgsim.evaluation.edits import HELD_OUT_EDITS, TRAINED_EDITS, describe_edits

    trained = "\n".join(f"  {line}" for line in describe_edits(TRAINED_EDITS).splitlines())
    held = "\n".join(f"  {line}" for line in describe_edits(HELD_OUT_EDITS).splitlines())
    return f"{trained}\nheld out (never trained with):\n{held}"


EDITS_HELP = _edits_help()


def _existing(folder: str | None) -> str | None:
    """`folder` if it is a local directory that exists (logs never create a mistyped run)."""
    return folder if folder and "://" not in folder and os.path.isdir(folder) else None


def _new_run(folder: str | None) -> str | None:
    return folder if folder and "://" not in folder else None


@dataclass(frozen=True)
class Command:
    """One `imgsim` command: its help, its argument builder, what it runs, its pipeline module
    (for `python -m pipelines.X`, which takes the same arguments) and where Ray's logs go.

    `run_dir` is None for a command that runs no Ray job. For one that does, `run_dir(args)` is the
    run directory whose `logs/` keeps Ray's logs, or None (no run, or none that exists yet): a
    temporary folder then."""

    name: str
    help: str
    description: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    module: str | None = None
    run_dir: Callable[[argparse.Namespace], str | None] | None = None


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
        run_dir=lambda a: None,
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
        run_dir=lambda a: _new_run(a.out),
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
        run_dir=lambda a: _existing(a.model),
    ),
    Command(
        "embed",
        "embed every image into Parquet files, nothing else (Ray Data)",
        "Embed every image of DATA with RUN's encoder and write the rows (path, label, embedding, "
        "error, content_hash, width, height) as Parquet files under --out, for your own pipeline.",
        embed_arguments,
        run_embed,
        "pipelines.embed",
        run_dir=lambda a: _existing(a.model),
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
        "retrieval quality (precision@k, mAP@k) on labelled data, or label-free with --copies",
        "Without --queries every indexed image queries the rest (itself excluded); with --queries, "
        "QDATA's images query the index. A result is relevant when its label equals the query's.\n\n"
        "With --copies N (no labels needed): N randomly drawn indexed images are edited in memory, one "
        "copy per edit, and each copy must find its original: precision@1, recall@k, mAP@k, per edit; "
        "distances to the original against the nearest non-copy; and the largest distance threshold "
        "whose matches are at least --precision originals (the one `imgsim duplicates` calibrates). "
        "Trained edits and mix make the headline figures; held-out edits are reported apart:\n" + EDITS_HELP,
        eval_arguments,
        run_eval,
        "pipelines.evaluate",
        run_dir=lambda a: _existing(a.model),
    ),
    Command(
        "duplicates",
        "exact and near-duplicate groups over the indexed images",
        "Group the indexed images that are duplicates: byte-identical files (same content hash), then "
        "near-duplicates by range search on the KNN index within a distance threshold, by complete "
        "linkage (every pair in a group is linked: no chains of look-alikes). Images of 64 px or more "
        "are also checked geometrically: candidates out to the calibration's candidate radius must share "
        "one crop/scale/rotation/mirror of local features to be duplicates, and look-alikes that do not "
        "are left out even within the threshold (--no-verify: the threshold alone). Each group "
        "suggests which image to keep (most pixels, then largest file, then oldest) and why. The "
        "threshold is calibrated from edited copies of indexed images for --precision unless "
        "--threshold is given, and stored in RUN. Reruns search only images added since. DIR gets "
        "duplicates.jsonl, duplicates.csv and duplicates.html (thumbnails inline: opens offline).",
        duplicates_arguments,
        run_duplicates,
        "pipelines.duplicates",
        run_dir=lambda a: _existing(a.model),
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
        run_dir=lambda a: _existing(a.model),
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
        run_dir=lambda a: _new_run(os.path.join(a.work, "run")),
    ),
)


def _command(name: str) -> Command:
    return next(c for c in COMMANDS if c.name == name)


def _command_parser(command: Command, prog: str, **kwargs: Any) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=prog,
        description=command.description,
        formatter_class=HelpFormatter,
        **kwargs,
    )


def _add_arguments(p: argparse.ArgumentParser, command: Command) -> None:
    """The command's own arguments, then those every command takes."""
    command.arguments(p)
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show Ray's own driver and worker logs live (always kept in RUN/logs/); "
        f"same as {console.LOG_ENV}=debug",
    )
    p.set_defaults(func=command.run, command=command.name)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `imgsim` parser: one sub-command per entry of COMMANDS, each with its arguments (`only`:
    just that command's, which is all a command line naming it needs: building them all imports
    torch for `train`'s defaults, 1.5 s before any command could start)."""
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
            formatter_class=HelpFormatter,
        )
        if only is None or command.name == only:
            _add_arguments(p, command)
    return parser


def _run_logs(args: argparse.Namespace) -> Any:
    """Where a command that runs Ray jobs keeps Ray's logs (`imgsim.console.output.RunLogs`), or None for
    commands without Ray, and when Ray already runs in this process (its host owns the console)."""
    command = _command(args.command)
    if command.run_dir is None:
        return None
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return None
    from imgsim.io.runs import RunPaths

    run = command.run_dir(args)
    if run:
        root = RunPaths(run).logs_dir
    else:
        import tempfile

        root = os.path.join(tempfile.gettempdir(), "imgsim-logs")
    return console.RunLogs(
        console.log_folder(root, command.name), access_log=getattr(args, "access_log", False)
    )


def _execute(args: argparse.Namespace) -> int:
    """Run a parsed command; a failure ends in one line on stderr (naming the folder of Ray's logs
    when Ray ran) and a non-zero exit status."""
    if getattr(args, "verbose", False):
        console.set_verbose(True)
    logs = _run_logs(args)
    with logs if logs is not None else contextlib.nullcontext():
        code, failure = _run(args)
    if failure:
        where = f" — Ray's logs: {logs.where()}" if logs is not None and logs.used() else ""
        print(f"imgsim: {failure}{where}", file=console.stream(), flush=True)
    return code


def _run(args: argparse.Namespace) -> tuple[int, str | None]:
    """(exit status, the failure's one-line reason or None)."""
    try:
        return int(args.func(args) or 0), None
    except KeyboardInterrupt:
        return 130, "interrupted"
    except ImgsimError as e:
        return 1, f"error: {e}"
    except Exception as e:  # anything unexpected still ends in one line, unless debugging
        if os.environ.get("IMGSIM_DEBUG"):
            raise
        reason = (str(e).strip().splitlines() or [""])[0]
        if console.active_logs() is not None:  # stderr is the run's driver.log: keep the traceback there
            traceback.print_exc()
            hint = "the traceback is in driver.log"
        else:
            hint = "set IMGSIM_DEBUG=1 for the traceback"
        return 1, f"error: {type(e).__name__}: {reason} ({hint})"


def main(argv: Sequence[str] | None = None) -> int:
    """`imgsim COMMAND ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    named = argv[0] if argv and argv[0] in {c.name for c in COMMANDS} else None
    return _execute(build_parser(only=named).parse_args(argv))


def entry() -> NoReturn:
    """The `imgsim` console script: `main()`, then, where this process never imported Ray, an exit
    without the interpreter's teardown once the output is flushed. Every file is written and closed
    by then; what is left is freeing this process's memory (Arrow tables, the faiss index, torch),
    which took ~1 s after an incremental index of a million images, a tenth of its time. With Ray,
    its own exit handlers (which stop a local Ray) must run, so the exit is the usual one."""
    code = main()
    if "ray" in sys.modules:
        sys.exit(code)
    logging.shutdown()
    for stream in (console.stream(), sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def main_for(name: str, argv: Sequence[str] | None = None) -> int:
    """`python -m pipelines.X ...`: the command `name` with its own parser (same flags as `imgsim X`).

    Called from a pipeline module's `if __name__ == "__main__"` block: the command imports that
    module again under its real name, so Ray pickles its functions by reference (a function defined
    in `__main__` would be pickled by value, with every global it touches).
    """
    command = _command(name)
    parser = _command_parser(command, prog=f"python -m {command.module}")
    _add_arguments(parser, command)
    return _execute(parser.parse_args(argv))


if __name__ == "__main__":
    entry()
