"""Retrieval metrics on cases small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from imgsim.evaluation.metrics import retrieval_metrics, scores_from_hits


def points(xs: list[float]) -> np.ndarray:
    """1-D positions as 2-D vectors (for l2 search)."""
    return np.array([[x, 0.0] for x in xs], dtype=np.float32)


def test_scores_by_hand() -> None:
    # query A: results rel, miss, rel  (R=2) -> P@1=1, P@3=2/3, AP=(1/1 + 2/3)/2 = 5/6, recall=2/2
    # query B: results miss, rel, miss (R=3) -> P@1=0, P@3=1/3, AP=(1/2)/3 = 1/6,     recall=1/3
    hits = np.array([[1, 0, 1], [0, 1, 0]], dtype=bool)
    m = scores_from_hits(hits, np.array([2, 3]), k=3)
    assert m["precision_at_1"] == pytest.approx(0.5)
    assert m["precision_at_k"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert m["map_at_k"] == pytest.approx((5 / 6 + 1 / 6) / 2)
    assert m["recall_at_k"] == pytest.approx((1 + 1 / 3) / 2)


def test_leave_one_out_by_hand() -> None:
    # Five points on a line, k=3, every point queries the other four (l2):
    #   id:     0    1    2    3    4
    #   x:      0    1   2.5  4.2  5.3
    #   label:  a    a    b    a    b        R (self excluded): a -> 2, b -> 1
    # q0 (a@0):   1 (d1, a), 2 (d2.5, b), 3 (d4.2, a)   hits 1 0 1  P@1 1  P@3 2/3  AP (1/1+2/3)/2 = 5/6  rec 2/2
    # q1 (a@1):   0 (d1, a), 2 (d1.5, b), 3 (d3.2, a)   hits 1 0 1  P@1 1  P@3 2/3  AP 5/6               rec 2/2
    # q2 (b@2.5): 1 (d1.5,a), 3 (d1.7, a), 0 (d2.5, a)  hits 0 0 0  P@1 0  P@3 0    AP 0                 rec 0/1
    # q3 (a@4.2): 4 (d1.1,b), 2 (d1.7, b), 1 (d3.2, a)  hits 0 0 1  P@1 0  P@3 1/3  AP (1/3)/2 = 1/6      rec 1/2
    # q4 (b@5.3): 3 (d1.1,a), 2 (d2.8, b), 1 (d4.3, a)  hits 0 1 0  P@1 0  P@3 1/3  AP (1/2)/min(3,1)=1/2 rec 1/1
    # P@1 = 2/5 = 0.4; P@3 = (2/3+2/3+0+1/3+1/3)/5 = 0.4; mAP = (5/6+5/6+0+1/6+1/2)/5 = 7/15;
    # recall = (1+1+0+1/2+1)/5 = 0.7
    db = points([0, 1, 2.5, 4.2, 5.3])
    labels = ["a", "a", "b", "a", "b"]
    m = retrieval_metrics(db, labels, db, labels, k=3, metric="l2", exclude_self=True)
    assert m == {
        "k": 3,
        "queries": 5,
        "database": 5,
        "precision_at_1": pytest.approx(0.4),
        "precision_at_k": pytest.approx(0.4),
        "map_at_k": pytest.approx(7 / 15),
        "recall_at_k": pytest.approx(0.7),
        "unlabelled_queries": 0,
        "no_relevant_queries": 0,
    }


def test_separate_queries_by_hand() -> None:
    # database: a@0, a@1, b@10 ; queries (not in the database), k=2:
    #   a@0.4 -> 0 (a), 1 (a): hits 1 1, R=2: P@1 1, P@2 1,   AP (1+1)/2 = 1,   recall 1
    #   b@0.9 -> 1 (a), 0 (a): hits 0 0, R=1: P@1 0, P@2 0,   AP 0,             recall 0
    #   c@5   -> label c not in the database: not scored (no_relevant_queries)
    #   None  -> not scored (unlabelled_queries)
    # P@1 = 1/2, P@2 = 1/2, mAP = 1/2, recall = 1/2
    db = points([0, 1, 10])
    q = points([0.4, 0.9, 5, 3])
    m = retrieval_metrics(q, ["a", "b", "c", None], db, ["a", "a", "b"], k=2, metric="l2")
    assert (m["queries"], m["database"], m["unlabelled_queries"], m["no_relevant_queries"]) == (2, 3, 1, 1)
    for key in ("precision_at_1", "precision_at_k", "map_at_k", "recall_at_k"):
        assert m[key] == pytest.approx(0.5), key


def test_self_excluded_by_id_even_with_exact_duplicates() -> None:
    # items 0 and 1 are the same vector (both "y"); 2 and 3 are near each other (both "x"), cosine, k=1.
    # Excluding the query by id, 0 finds its duplicate 1 and 1 finds 0: all four hit, P@1 = 1.
    # (Dropping every result at distance 0 would send 0 and 1 to an "x" item: P@1 = 0.5.)
    db = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.1, 1.0]], dtype=np.float32)
    labels = ["y", "y", "x", "x"]
    m = retrieval_metrics(db, labels, db, labels, k=1, exclude_self=True)
    assert m["queries"] == 4 and m["precision_at_1"] == 1.0


def test_a_label_held_by_the_query_alone_is_not_scored_in_leave_one_out() -> None:
    db = np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]], dtype=np.float32)
    m = retrieval_metrics(db, ["solo", "x", "x"], db, ["solo", "x", "x"], k=1, exclude_self=True)
    assert (m["queries"], m["no_relevant_queries"], m["precision_at_1"]) == (2, 1, 1.0)


def test_missing_results_count_as_misses() -> None:
    class HalfEmpty:  # e.g. a within-cluster search whose cluster is small
        def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            ids = np.full((len(q), k), -1, np.int64)
            ids[:, 0] = 0
            return np.zeros((len(q), k), np.float32), ids

    db = points([0, 1, 2])
    m = retrieval_metrics(db[:1], ["a"], db, ["a", "a", "a"], k=3, index=HalfEmpty())
    # one hit (item 0) then two missing results; R = 3: P@3 = 1/3, AP = 1/3, recall = 1/3
    assert m["precision_at_1"] == 1.0
    assert m["precision_at_k"] == pytest.approx(1 / 3)
    assert m["map_at_k"] == pytest.approx(1 / 3)
    assert m["recall_at_k"] == pytest.approx(1 / 3)


def test_a_database_smaller_than_k() -> None:
    # two items, k=5, leave-one-out: each query gets one result (the other "a"), the rest are misses.
    db = points([0, 1])
    m = retrieval_metrics(db, ["a", "a"], db, ["a", "a"], k=5, metric="l2", exclude_self=True)
    assert m["precision_at_1"] == 1.0 and m["precision_at_k"] == pytest.approx(1 / 5)
    assert m["map_at_k"] == 1.0 and m["recall_at_k"] == 1.0  # AP normalised by min(k, R) = 1


def test_chunking_does_not_change_the_result() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 8)).astype(np.float32)
    labels = [str(i % 5) for i in range(300)]
    whole = retrieval_metrics(emb, labels, emb, labels, k=7, exclude_self=True)
    chunked = retrieval_metrics(emb, labels, emb, labels, k=7, exclude_self=True, chunk=17)
    assert whole == chunked
    assert set(whole) == {
        "k",
        "queries",
        "database",
        "precision_at_1",
        "precision_at_k",
        "map_at_k",
        "recall_at_k",
        "unlabelled_queries",
        "no_relevant_queries",
    }
