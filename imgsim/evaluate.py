"""Retrieval quality on labelled data: a result is relevant when its label equals the query's.

For each query with top-k results r_1..r_k and R relevant items in the database:
- precision@k = (relevant among r_1..r_k) / k, averaged over queries (precision@1 likewise);
- AP@k = (1 / min(k, R)) * sum_i precision@i * [r_i relevant]; mAP@k is its mean over queries;
- recall@k = (relevant among r_1..r_k) / R.
Queries without a label, or whose label has no relevant item in the database, are not scored.
In leave-one-out mode the database item with the query's own id is excluded from its results (by
id, not by distance, since a collection may hold exact duplicates).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from imgsim.index import KnnIndex


def _label_array(labels: Sequence[str | None] | np.ndarray) -> np.ndarray:
    return np.array([None if lab is None else str(lab) for lab in labels], dtype=object)


def scores_from_hits(hits: np.ndarray, relevant_totals: np.ndarray, k: int) -> dict[str, float]:
    """Metrics from a (Q, k) boolean matrix of relevant results and each query's R."""
    hits = hits.astype(np.float64)
    precision_at_i = np.cumsum(hits, axis=1) / np.arange(1, k + 1)
    ap = (precision_at_i * hits).sum(axis=1) / np.minimum(k, relevant_totals)
    return {
        "precision_at_1": float(hits[:, 0].mean()),
        "precision_at_k": float(hits.mean(axis=1).mean()),
        "map_at_k": float(ap.mean()),
        "recall_at_k": float((hits.sum(axis=1) / relevant_totals).mean()),
    }


def retrieval_metrics(
    query_emb: np.ndarray,
    query_labels: Sequence[str | None],
    db_emb: np.ndarray,
    db_labels: Sequence[str | None],
    k: int = 10,
    metric: str = "cosine",
    exclude_self: bool = False,
    index: KnnIndex | None = None,
    chunk: int = 4096,
) -> dict[str, float | int]:
    """precision@1, precision@k, mAP@k and recall@k of searching `query_emb` in `db_emb`.

    `exclude_self`: query i is database item i (leave-one-out). `index`: search this prebuilt index
    (over `db_emb`) instead of an exact one built here.
    """
    q_labels, d_labels = _label_array(query_labels), _label_array(db_labels)
    index = index or KnnIndex(metric=metric, kind="exact").fit(db_emb)
    values, counts = np.unique(d_labels[d_labels != None], return_counts=True)  # noqa: E711
    per_label = dict(zip(values.tolist(), counts.tolist(), strict=True))
    scored = np.array([lab is not None and per_label.get(lab, 0) - int(exclude_self) > 0 for lab in q_labels])
    all_hits, totals = [], []
    fetch = k + 1 if exclude_self else k
    for start in range(0, len(q_labels), chunk):
        ids_range = np.arange(start, min(start + chunk, len(q_labels)))
        ids_range = ids_range[scored[ids_range]]
        if len(ids_range) == 0:
            continue
        _, ids = index.search(np.asarray(query_emb)[ids_range], fetch)
        if exclude_self:
            keep = ids != ids_range[:, None]
            keep[keep.all(axis=1), -1] = False  # self not among them: drop the extra last result
            ids = ids[keep].reshape(len(ids_range), -1)[:, :k]
        hits = d_labels[ids] == q_labels[ids_range][:, None]
        if hits.shape[1] < k:  # a database smaller than k: missing results count as misses
            hits = np.pad(hits, ((0, 0), (0, k - hits.shape[1])))
        all_hits.append(hits)
        totals.append(np.array([per_label[lab] - int(exclude_self) for lab in q_labels[ids_range]]))
    result: dict[str, float | int] = {
        "k": k,
        "queries": int(scored.sum()),
        "database": len(d_labels),
        "unscored_queries": int((~scored).sum()),
        "metric": metric,  # type: ignore[dict-item]
    }
    if all_hits:
        result.update(scores_from_hits(np.concatenate(all_hits), np.concatenate(totals), k))
    else:
        result.update({"precision_at_1": 0.0, "precision_at_k": 0.0, "map_at_k": 0.0, "recall_at_k": 0.0})
    return result
