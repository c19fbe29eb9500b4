"""Eval: retrieval quality of a built run on labelled data (`imgsim eval`).

Without queries every indexed image queries the rest (itself excluded); with QDATA, its images
are embedded by the same Ray Data pipeline as the index and query it.

    ray job submit --working-dir . -- python -m pipelines.evaluate --model RUN --queries QDATA
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from imgsim.evaluate import retrieval_metrics
from imgsim.runs import read_embeddings
from imgsim.search import Searcher


class _WithinCluster:
    """Adapter with KnnIndex's `search` that restricts each query to its predicted cluster."""

    def __init__(self, searcher: Searcher) -> None:
        self.searcher = searcher

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.searcher
        predicted = s.clusterer.predict(q)
        dist = np.full((len(q), k), np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        for c in np.unique(predicted):
            rows = np.flatnonzero(predicted == c)
            d, i = s.index.search_subset(q[rows], k, s._members.get(int(c), np.zeros(0, np.int64)))
            dist[rows, : d.shape[1]], ids[rows, : i.shape[1]] = d, i
        return dist, ids


def evaluate_run(
    run: str, queries: str | None = None, k: int = 10, within_cluster: bool = False
) -> dict[str, Any]:
    """precision@1, precision@k, mAP@k, recall@k of RUN's index (see imgsim.evaluate)."""
    searcher = Searcher.load(run)
    db_emb, columns = read_embeddings(run, columns=("label",))
    db_labels = columns["label"]
    index = _WithinCluster(searcher) if within_cluster else searcher.index
    if queries is None:
        metrics = retrieval_metrics(db_emb, db_labels, db_emb, db_labels, k=k, exclude_self=True, index=index)
        metrics["mode"] = "leave-one-out"
    else:
        from pipelines.embed import embed_folder

        _, q_labels, q_emb, skipped = embed_folder(queries, run)
        metrics = retrieval_metrics(q_emb, q_labels, db_emb, db_labels, k=k, index=index)
        metrics["mode"] = "queries"
        metrics["skipped_queries"] = len(skipped)
    metrics["within_cluster"] = within_cluster
    metrics["metric"] = searcher.index.metric
    return metrics


def main() -> None:
    p = argparse.ArgumentParser(description="Retrieval quality of RUN's index (see `imgsim eval --help`).")
    p.add_argument("--model", required=True, metavar="RUN")
    p.add_argument("--queries", default=None, metavar="QDATA")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--within-cluster", action="store_true")
    a = p.parse_args()
    print(json.dumps(evaluate_run(a.model, a.queries, a.k, a.within_cluster)))


if __name__ == "__main__":
    main()
