"""Eval: retrieval quality of a built run on labelled data (`imgsim eval`).

Without queries every indexed image queries the rest (itself excluded); with QDATA, its images
are embedded by the same Ray Data pipeline as the index and query it.

    ray job submit --working-dir . -- python -m pipelines.evaluate --model RUN --queries QDATA
"""

from __future__ import annotations

from typing import Any

import numpy as np

from imgsim.config import DEFAULTS
from imgsim.evaluate import retrieval_metrics
from imgsim.progress import Progress, bar, log
from imgsim.rows import read_embeddings
from imgsim.search import Searcher


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
    """precision@1, precision@k, mAP@k, recall@k of RUN's index (see imgsim.evaluate)."""
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


if __name__ == "__main__":
    import sys

    from imgsim.cli import main_for

    sys.exit(main_for("eval"))
