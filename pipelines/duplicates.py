"""Duplicates: exact and near-duplicate groups over a run's index (`imgsim duplicates`).

The threshold is calibrated from edited copies when the run has none stored for its model (the
copies are made and embedded as Ray tasks when there are many, as `imgsim eval --copies` does),
then `imgsim.duplicates.groups.find_duplicates` groups (incrementally: only images added since the last
run are searched) and the reports are written to DIR (default RUN/duplicates/).

    ray job submit --working-dir . -- python -m pipelines.duplicates --model RUN --json
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgsim.config import DEFAULTS
from imgsim.console.progress import bar, log
from imgsim.duplicates.groups import PairVerifier, find_duplicates, verify_here
from imgsim.duplicates.report import write_reports
from imgsim.evaluation.edits import TRAINED_EDITS
from imgsim.index.search import Searcher
from imgsim.io.runs import RunPaths
from pipelines.evaluate import copy_runner

#: More candidate pairs than this are verified as Ray tasks (10-40 ms a pair on one core: see imgsim.duplicates.verify).
IN_PROCESS_MAX_PAIRS = 20_000
#: Pairs per Ray task.
PAIRS_PER_TASK = 5_000


def _verify_chunk(paths: list[str], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One Ray task's pairs, on the one CPU it holds (OpenCV would start a thread per core)."""
    import cv2

    from imgsim.data.sources import read_bytes
    from imgsim.duplicates.verify import verify_pairs

    cv2.setNumThreads(1)
    return verify_pairs(paths, a, b, read_bytes, threads=1)[0]


def pair_verifier() -> PairVerifier:
    """A `PairVerifier` that spreads more than IN_PROCESS_MAX_PAIRS pairs over Ray tasks
    (`ray_pair_verifier`); fewer are verified here (`verify_here`)."""
    on_ray = ray_pair_verifier()

    def verify(paths: Sequence[str], a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if len(a) > IN_PROCESS_MAX_PAIRS:
            return on_ray(paths, a, b)
        return verify_here(paths, a, b)

    return verify


def ray_pair_verifier() -> PairVerifier:
    """A `PairVerifier` that verifies pairs as Ray tasks of PAIRS_PER_TASK pairs, each sent only the
    paths it needs."""

    def verify(paths: Sequence[str], a: np.ndarray, b: np.ndarray) -> np.ndarray:
        import ray

        from pipelines.runtime import ensure_ray

        ensure_ray()
        task = ray.remote(num_cpus=1, max_retries=2)(_verify_chunk)
        order = np.lexsort((b, a))  # an image's pairs together: each task reads it once
        chunks = [order[i : i + PAIRS_PER_TASK] for i in range(0, len(order), PAIRS_PER_TASK)]
        pending = []
        for chunk in chunks:
            rows, local = np.unique(np.concatenate([a[chunk], b[chunk]]), return_inverse=True)
            pending.append(
                task.remote([paths[r] for r in rows.tolist()], local[: len(chunk)], local[len(chunk) :])
            )
        status = np.empty(len(a), np.int8)
        with bar(len(a), "verify candidate pairs", "pairs") as progress:
            for chunk, ref in zip(chunks, pending, strict=True):
                status[chunk] = ray.get(ref)
                progress.update(len(chunk))
        return status

    return verify


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
    nprobe: int | None = None,
) -> dict[str, Any]:
    """Find the groups, write duplicates.jsonl/.csv/.html into `out`; the summary (`--json`)."""
    run = str(Path(run).resolve())
    searcher = Searcher.load(run)
    runner = copy_runner(run, searcher, min(copies, len(searcher)) * len(TRAINED_EDITS))
    report = find_duplicates(
        run, threshold=threshold, precision=precision, recalibrate=recalibrate, full=full, copies=copies,
        seed=seed, runner=runner, searcher=searcher, verify=verify, verifier=pair_verifier(),
        nprobe=nprobe,
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

    from imgsim.console.command import run_as_module
    from pipelines.commands.duplicates import COMMAND

    sys.exit(run_as_module(COMMAND))
