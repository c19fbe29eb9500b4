"""`imgsim ingest` and `python -m pipelines.ingest`: decode every image once, report what is skipped."""

from __future__ import annotations

import argparse

from imgsim.config import DEFAULTS
from imgsim.console.arguments import add_data, add_json, channels, positive_int, print_json
from imgsim.console.command import Command


def arguments(p: argparse.ArgumentParser) -> None:
    add_data(p)
    p.add_argument(
        "--image-size", type=positive_int, default=DEFAULTS.preprocess.image_size, help="decode to SxS"
    )
    p.add_argument("--channels", type=channels, default=None, help="1, 3 or auto (from a sample of DATA)")
    p.add_argument(
        "--concurrency",
        type=positive_int,
        default=None,
        help="most images decoded at once (default: as many as Ray schedules)",
    )
    p.add_argument("--skipped", metavar="FILE", help="also write the skipped inputs as JSON lines")
    p.add_argument("--show", type=int, default=20, help="skipped inputs to print")
    add_json(p)


def run(args: argparse.Namespace) -> int:
    from pipelines.ingest import check_images

    report = check_images(
        args.data, args.image_size, args.channels, concurrency=args.concurrency, skipped_out=args.skipped
    )
    skipped = report.pop("skipped_inputs")
    if args.json:
        print_json(report)
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


COMMAND = Command(
    "ingest",
    "decode every image once and report what would be skipped (Ray Data)",
    "Read and decode every image of DATA as `imgsim index` would, and report how many are usable "
    "and why the others are skipped. Nothing is written unless --skipped names a file.",
    arguments,
    run,
    "pipelines.ingest",
    run_dir=lambda a: None,
)
