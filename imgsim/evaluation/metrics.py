"""Retrieval quality on labelled data: a result is relevant when its label equals the query's.

For a query whose top-k results are r_1..r_k, with R relevant items in the database (items with the
query's label; in leave-one-out mode not counting the query itself):
- precision@k = (relevant among r_1..r_k) / k; precision@1 likewise with k = 1;
- AP@k = (1 / min(k, R)) * sum over i of precision@i * [r_i relevant]; 1.0 when the first
  min(k, R) results are all relevant, whatever k is;
- recall@k = (relevant among r_1..r_k) / R (at most k / R when R > k).
Each metric is the mean over scored queries (mAP@k is the mean AP@k). A missing result (a search
that returned fewer than k, or id -1) counts as not relevant.

Not scored, and counted separately: queries without a label (`unlabelled_queries`) and labelled
queries whose label no database item carries (`no_relevant_queries`: recall and AP are undefined).
Database items without a label are never relevant.

Leave-one-out (`exclude_self=True`): query i is database item i; it is excluded from its own results
by id, not by distance 0, since a collection may hold exact duplicates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from imgsim.index.knn import KnnIndex, drop_ids


class Searchable(Protocol):
    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


def scores_from_hits(hits: np.ndarray, relevant_totals: np.ndarray, k: int) -> dict[str, float]:
    """The metrics from a (Q, k) boolean matrix of relevant results and each query's R (all R > 0)."""
    hits = np.asarray(hits, dtype=np.float64)
    totals = np.asarray(relevant_totals, dtype=np.float64)
    if len(hits) == 0:
        return {"precision_at_1": 0.0, "precision_at_k": 0.0, "map_at_k": 0.0, "recall_at_k": 0.0}
    precision_at_i = np.cumsum(hits, axis=1) / np.arange(1, k + 1)
    ap = (precision_at_i * hits).sum(axis=1) / np.minimum(k, totals)
    return {
        "precision_at_1": float(hits[:, 0].mean()),
        "precision_at_k": float(hits.mean(axis=1).mean()),
        "map_at_k": float(ap.mean()),
        "recall_at_k": float((hits.sum(axis=1) / totals).mean()),
    }


def _label_codes(
    query_labels: Sequence[str | None], db_labels: Sequence[str | None]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer codes: (query codes, database codes, items per code). No label: -1 (query), -2 (db)."""
    db = [None if lab is None else str(lab) for lab in db_labels]
    vocab = {lab: i for i, lab in enumerate(sorted({lab for lab in db if lab is not None}))}
    db_codes = np.array([-2 if lab is None else vocab[lab] for lab in db], dtype=np.int64)
    q_codes = np.array(
        [-1 if lab is None else vocab.get(str(lab), len(vocab)) for lab in query_labels], dtype=np.int64
    )
    counts = np.bincount(db_codes[db_codes >= 0], minlength=len(vocab) + 1)  # last: labels not in db
    return q_codes, db_codes, counts


def retrieval_metrics(
    query_emb: np.ndarray,
    query_labels: Sequence[str | None],
    db_emb: np.ndarray,
    db_labels: Sequence[str | None],
    k: int = 10,
    metric: str = "cosine",
    exclude_self: bool = False,
    index: KnnIndex | Searchable | None = None,
    chunk: int = 4096,
) -> dict[str, Any]:
    """precision@1, precision@k, mAP@k and recall@k of searching `query_emb` in `db_emb` (see the
    module docstring for the definitions).

    `exclude_self`: leave-one-out, query i is database item i. `index`: any object with
    `search(q, k) -> (distances, ids)` over `db_emb` (a built KnnIndex, a within-cluster adapter);
    default an exact KnnIndex built here. Queries are searched `chunk` at a time, so memory stays
    O(chunk * k) whatever the sizes.

    Returns `{"k", "queries", "database", "precision_at_1", "precision_at_k", "map_at_k",
    "recall_at_k", "unlabelled_queries", "no_relevant_queries"}`; `queries` counts scored queries.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    query_emb = np.asarray(query_emb, dtype=np.float32)
    if len(query_emb) != len(query_labels) or len(db_emb) != len(db_labels):
        raise ValueError("each embedding needs a label entry (None when unknown)")
    if exclude_self and len(query_labels) != len(db_labels):
        raise ValueError("exclude_self: the queries must be the database items, in the same order")
    q_codes, db_codes, counts = _label_codes(query_labels, db_labels)
    totals = np.where(q_codes >= 0, counts[np.maximum(q_codes, 0)] - int(exclude_self), 0)
    scored = totals > 0
    if index is None and scored.any():
        index = KnnIndex(metric=metric, kind="exact").fit(db_emb)
    fetch = k + 1 if exclude_self else k
    hits_parts, totals_parts = [], []
    for start in range(0, len(q_codes), chunk):
        rows = np.arange(start, min(start + chunk, len(q_codes)))
        rows = rows[scored[rows]]
        if len(rows) == 0:
            continue
        assert index is not None
        _, ids = index.search(query_emb[rows], fetch)
        ids = np.asarray(ids, dtype=np.int64)
        if ids.shape[1] < fetch:  # a database of k items or fewer: pad with "no result"
            ids = np.pad(ids, ((0, 0), (0, fetch - ids.shape[1])), constant_values=-1)
        if exclude_self:
            _, ids = drop_ids(ids, ids, rows, k)
        valid = ids >= 0
        hits = valid & (db_codes[np.where(valid, ids, 0)] == q_codes[rows][:, None])
        hits = hits[:, :k]
        hits_parts.append(hits)
        totals_parts.append(totals[rows])
    hits_all = np.concatenate(hits_parts) if hits_parts else np.zeros((0, k), bool)
    totals_all = np.concatenate(totals_parts) if totals_parts else np.zeros(0, np.int64)
    return {
        "k": k,
        "queries": int(scored.sum()),
        "database": len(db_codes),
        **scores_from_hits(hits_all, totals_all, k),
        "unlabelled_queries": int((q_codes < 0).sum()),
        "no_relevant_queries": int(((q_codes >= 0) & ~scored).sum()),
    }
