"""`imgsim duplicates` and `python -m pipelines.duplicates`: duplicate groups over the index."""

from __future__ import annotations

import argparse

from imgsim.config import DEFAULTS
from imgsim.console.arguments import (
    add_json,
    add_model,
    non_negative_float,
    positive_int,
    print_json,
    probability,
)
from imgsim.console.command import Command, existing_run


def arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS.duplicates
    add_model(p)
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
        help="share of matches that must be true copies at the calibrated threshold (imgsim eval --copies measures the same)",
    )
    p.add_argument(
        "--out", metavar="DIR", default=None, help="where to write the reports (default: RUN/duplicates)"
    )
    p.add_argument(
        "--copies",
        type=positive_int,
        default=d.calibration_copies,
        help="indexed images whose edited copies calibrate the threshold",
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
        help="trust the distance threshold alone: skip the check that two images show the same picture "
        "(without this flag, pairs of images of 64 px or more must also match by their local details, "
        "under one crop, scale, rotation or mirror)",
    )
    p.add_argument(
        "--html-groups", type=positive_int, default=d.html_groups, help="groups drawn in duplicates.html"
    )
    p.add_argument(
        "--nprobe",
        type=positive_int,
        default=None,
        help="with an ivf index: partitions each image's search scans (default: the index's); fewer is "
        "faster and may miss a pair across partitions",
    )
    add_json(p, "print the summary as one JSON object")


def run(args: argparse.Namespace) -> int:
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
        print_json(summary)
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


COMMAND = Command(
    "duplicates",
    "exact and near-duplicate groups over the indexed images",
    "Group the indexed images that are duplicates: byte-identical files (same content hash), then "
    "near-duplicates within a distance threshold, where every pair in a group is within it (no "
    "chains of look-alikes). Images of 64 px or more must also match by their local details, under "
    "one crop, scale, rotation or mirror; look-alikes that do not are left out even within the "
    "threshold (--no-verify: the threshold alone). Each group "
    "suggests which image to keep (most pixels, then largest file, then oldest) and why. The "
    "threshold is calibrated from edited copies of indexed images for --precision unless "
    "--threshold is given, and stored in RUN. Reruns search only images added since. DIR gets "
    "duplicates.jsonl, duplicates.csv and duplicates.html (thumbnails inline: opens offline).",
    arguments,
    run,
    "pipelines.duplicates",
    run_dir=lambda a: existing_run(a.model),
)
