"""Eval: retrieval quality of a built run (`imgsim eval`).

- Labelled: without queries every indexed image queries the rest (itself excluded); with QDATA,
  its images are embedded by the same Ray Data pipeline as the index and query it.
- Label-free (`--copies N`): edited copies of N indexed images query the index (`imgsim.evaluation.copies`).
  Small N runs in-process; larger N as Ray tasks, one per chunk of originals (read, edit, decode
  and embed in the task), so the cores work in parallel and the report is the same either way.

    ray job submit --working-dir . -- python -m pipelines.evaluate --model RUN --queries QDATA
    ray job submit --working-dir . -- python -m pipelines.evaluate --model RUN --copies 1000 --json
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgsim.config import DEFAULTS
from imgsim.console.progress import Progress, bar, log
from imgsim.data.rows import read_embeddings
from imgsim.evaluation import copies as copies_lib
from imgsim.evaluation.metrics import retrieval_metrics
from imgsim.index.search import Searcher

#: Copies (originals x edits) up to which `eval --copies` runs in-process: below this, starting Ray
#: costs more than it saves.
IN_PROCESS_MAX_COPIES = 2000


class _WithinCluster:
    """Adapter with KnnIndex's `search` that restricts each query to its predicted cluster."""

    def __init__(self, searcher: Searcher) -> None:
        self.searcher = searcher

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        _, dist, ids = self.searcher.search_embeddings(q, k, within_cluster=True)
        return dist, ids


class _Counted:
    """Any `search(q, k)` object, counting the queries it answers on a progress bar."""

    def __init__(self, index: Any, progress: Progress) -> None:
        self.index, self.progress = index, progress

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        out = self.index.search(q, k)
        self.progress.update(len(q))
        return out


def evaluate_run(
    run: str, queries: str | None = None, k: int = DEFAULTS.search.k, within_cluster: bool = False
) -> dict[str, Any]:
    """precision@1, precision@k, mAP@k, recall@k of RUN's index (see imgsim.evaluation.metrics)."""
    searcher = Searcher.load(run)
    db_emb, columns = read_embeddings(run, columns=("label",))
    db_labels = columns["label"]
    index = _WithinCluster(searcher) if within_cluster else searcher.index
    if queries is None:
        with bar(len(db_emb), "eval", "queries") as p:
            metrics = retrieval_metrics(
                db_emb, db_labels, db_emb, db_labels, k=k, exclude_self=True, index=_Counted(index, p)
            )
            p.set(len(db_emb))  # unlabelled queries are not searched
        metrics["mode"] = "leave-one-out"
    else:
        from pipelines.embed import embed_folder

        _, q_labels, q_emb, skipped = embed_folder(queries, run)
        with bar(len(q_emb), "eval", "queries") as p:
            metrics = retrieval_metrics(q_emb, q_labels, db_emb, db_labels, k=k, index=_Counted(index, p))
            p.set(len(q_emb))
        metrics["mode"] = "queries"
        metrics["skipped_queries"] = len(skipped)
        if skipped:
            log(f"eval: skipped {len(skipped):,} query files that could not be read or decoded")
    metrics["within_cluster"] = within_cluster
    metrics["metric"] = searcher.index.metric
    return metrics


# -- label-free: edited copies ---------------------------------------------------------------------
@functools.cache
def _worker_model(run: str, mtime_ns: int) -> Any:
    """The run's encoder, loaded once per Ray worker process (and again if the model file changes)."""
    import torch

    from imgsim.models import autoencoder as model_lib

    torch.set_num_threads(1)  # one task per core: more threads only oversubscribe
    return model_lib.load(run)


def _copy_chunk(
    run: str, chunk: copies_lib.Chunk, edits: tuple[str, ...], seed: int
) -> copies_lib.CopyEmbeddings:
    from imgsim.io.runs import RunPaths

    model_dir = RunPaths(run).model_dir  # trained or imported: a newer file means another model
    mtime_ns = (
        max((p.stat().st_mtime_ns for p in model_dir.iterdir()), default=0) if model_dir.is_dir() else 0
    )
    return copies_lib.embed_copies_chunk(_worker_model(run, mtime_ns), chunk, edits, seed)


def ray_runner(run: str) -> copies_lib.ChunkRunner:
    """A `ChunkRunner` that embeds each chunk of originals in a Ray task, yielding them as they finish."""

    def run_chunks(
        chunks: list[copies_lib.Chunk], edits: tuple[str, ...], seed: int
    ) -> Iterator[copies_lib.CopyEmbeddings]:
        import ray

        from pipelines.runtime import ensure_ray

        ensure_ray()
        task = ray.remote(num_cpus=1, max_retries=2)(_copy_chunk)
        run_ref = str(Path(run).resolve())
        pending = [task.remote(run_ref, chunk, edits, seed) for chunk in chunks]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])

    return run_chunks


def on_ray(work: int) -> bool:
    """Whether `work` copies are made as Ray tasks: above IN_PROCESS_MAX_COPIES."""
    return work > IN_PROCESS_MAX_COPIES


def copy_runner(run: str, searcher: Searcher, work: int) -> copies_lib.ChunkRunner:
    """Ray tasks for more than IN_PROCESS_MAX_COPIES copies (`ray_runner`), else in-process."""
    return ray_runner(run) if on_ray(work) else copies_lib.in_process(searcher.model)


def index_columns(run: str) -> tuple[np.ndarray, list[str], list[str | None] | None]:
    """(embeddings, paths, content hashes or None for an index written without them) of RUN's index."""
    import pyarrow.parquet as pq

    from imgsim.io.runs import RunPaths

    names = pq.read_schema(RunPaths(run).embeddings).names
    columns = ("path", "content_hash") if "content_hash" in names else ("path",)
    emb, values = read_embeddings(run, columns=columns)
    return emb, values["path"], values.get("content_hash")


def evaluate_copies_run(
    run: str,
    copies: int,
    *,
    seed: int = DEFAULTS.duplicates.seed,
    k: int = DEFAULTS.search.k,
    precision: float = DEFAULTS.duplicates.precision,
    edits: Sequence[str] = copies_lib.DEFAULT_EDITS,
) -> dict[str, Any]:
    """`imgsim eval --copies N`: the label-free report of `imgsim.evaluation.copies` for RUN's index."""
    started = time.perf_counter()
    searcher = Searcher.load(run)
    db_emb, paths, hashes = index_columns(run)
    n = min(copies, len(paths))
    runner = copy_runner(run, searcher, n * len(edits))
    loaded = time.perf_counter()
    made: list[float] = []

    def timed(
        chunks: list[copies_lib.Chunk], edits: tuple[str, ...], seed: int
    ) -> Iterator[copies_lib.CopyEmbeddings]:
        yield from runner(chunks, edits, seed)
        made.append(time.perf_counter())

    with bar(n, desc="copies", unit="img") as progress:
        report = copies_lib.evaluate_copies(
            searcher.model, searcher.index, db_emb, paths, hashes, copies=copies, seed=seed, k=k,
            precision=precision, edits=edits, runner=timed, on_chunk=progress.update,
        )  # fmt: skip
    done = time.perf_counter()
    queries = report["queries"] + report["held_out"]["queries"]
    log(
        f"[eval] {queries} copies of {report['copies']} images queried {len(paths)} in {done - started:.1f} s: "
        f"load {loaded - started:.1f} s, copies read, edited, decoded and embedded {made[0] - loaded:.1f} s "
        f"({'Ray tasks' if on_ray(n * len(edits)) else 'in-process'}), search and scoring "
        f"{done - made[0]:.1f} s"
    )
    return report


if __name__ == "__main__":
    import sys

    from imgsim.console.command import run_as_module
    from pipelines.commands.evaluate import COMMAND

    sys.exit(run_as_module(COMMAND))
