"""`imgsim eval` and `python -m pipelines.evaluate`: retrieval quality, with labels or label-free (`--copies`)."""

from __future__ import annotations

import argparse
from typing import Any

from imgsim.config import DEFAULTS
from imgsim.console.arguments import add_json, add_k, add_model, positive_int, print_json, probability
from imgsim.console.command import Command, existing_run
from imgsim.errors import ImgsimError


def _precision(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--precision",
        type=probability,
        default=DEFAULTS.duplicates.precision,
        metavar="P",
        help=f"share of matches that must be true copies at the {what} distance threshold",
    )


def arguments(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument(
        "--queries", metavar="QDATA", default=None, help="labelled folder or s3:// prefix of query images"
    )
    add_k(p, "how many results of each query are judged")
    p.add_argument(
        "--within-cluster", action="store_true", help="judge search restricted to the query's cluster"
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
    add_json(p)


def _edit_list(text: str) -> tuple[str, ...]:
    from imgsim.evaluation.edits import EDITS

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in EDITS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown edit {', '.join(unknown)}; choose from {', '.join(EDITS)}")
    return names


def run(args: argparse.Namespace) -> int:
    if args.copies is not None:
        return _run_eval_copies(args)
    from pipelines.evaluate import evaluate_run

    metrics = evaluate_run(args.model, queries=args.queries, k=args.k, within_cluster=args.within_cluster)
    if args.json:
        print_json(metrics)
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
        print_json(report)
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


def _edits_help() -> str:
    from imgsim.evaluation.edits import HELD_OUT_EDITS, TRAINED_EDITS, describe_edits

    trained = "\n".join(f"  {line}" for line in describe_edits(TRAINED_EDITS).splitlines())
    held = "\n".join(f"  {line}" for line in describe_edits(HELD_OUT_EDITS).splitlines())
    return f"{trained}\nheld out (never trained with):\n{held}"


EDITS_HELP = _edits_help()


COMMAND = Command(
    "eval",
    "retrieval quality (precision@k, mAP@k) on labelled data, or label-free with --copies",
    "Without --queries every indexed image queries the rest (itself excluded); with --queries, "
    "QDATA's images query the index. A result is relevant when its label equals the query's.\n\n"
    "With --copies N (no labels needed): N randomly drawn indexed images are edited in memory, one "
    "copy per edit, and each copy must find its original: precision@1, recall@k, mAP@k, per edit; "
    "distances to the original against the nearest non-copy; and the largest distance threshold "
    "whose matches are at least --precision originals (the one `imgsim duplicates` calibrates). "
    "Trained edits and mix make the headline figures; held-out edits are reported apart:\n" + EDITS_HELP,
    arguments,
    run,
    "pipelines.evaluate",
    run_dir=lambda a: existing_run(a.model),
)
