"""Duplicates: exact and near-duplicate groups over a run's index (`imgsim duplicates`).

The threshold is calibrated from edited copies when the run has none stored for its model (the
copies are made and embedded as Ray tasks when there are many, as `imgsim eval --copies` does),
then `imgsim.duplicates.find_duplicates` groups (incrementally: only images added since the last
run are searched) and the reports are written to DIR (default RUN/duplicates/).

    ray job submit --working-dir . -- python -m pipelines.duplicates --model RUN --json
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from imgsim.config import DEFAULTS
from imgsim.duplicates import find_duplicates
from imgsim.duplicates_report import write_reports
from imgsim.edits import TRAINED_EDITS
from imgsim.progress import log
from imgsim.runs import RunPaths
from imgsim.search import Searcher
from pipelines.evaluate import copy_runner


def duplicates(
    run: str | os.PathLike[str],
    *,
    threshold: float | None = None,
    precision: float = DEFAULTS.duplicates.precision,
    out: str | os.PathLike[str] | None = None,
    full: bool = False,
    verify: bool = DEFAULTS.duplicates.verify,
    recalibrate: bool = False,
    copies: int = DEFAULTS.duplicates.calibration_copies,
    seed: int = DEFAULTS.duplicates.seed,
    html_groups: int = DEFAULTS.duplicates.html_groups,
    use_ray: bool | None = None,
) -> dict[str, Any]:
    """Find the groups, write duplicates.jsonl/.csv/.html into `out`; the summary (`--json`)."""
    run = str(Path(run).resolve())
    searcher = Searcher.load(run)
    runner = copy_runner(run, searcher, min(copies, len(searcher)) * len(TRAINED_EDITS), use_ray)
    report = find_duplicates(
        run, threshold=threshold, precision=precision, recalibrate=recalibrate, full=full, copies=copies,
        seed=seed, runner=runner, searcher=searcher, verify=verify,
    )  # fmt: skip
    summary = report.summary()
    files = write_reports(report.groups, summary, out or RunPaths(run).duplicates_dir, html_groups)
    log(
        f"[duplicates] {summary['images']} images, {summary['searched']} searched "
        f"({summary['reused_pairs']} pairs reused) in {summary['seconds']} s"
    )
    return {**summary, "files": files}


if __name__ == "__main__":
    import sys

    from imgsim.cli import main_for

    sys.exit(main_for("duplicates"))
