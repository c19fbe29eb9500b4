"""Retrieval metrics on a case small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from imgsim.evaluate import retrieval_metrics, scores_from_hits


def test_scores_by_hand() -> None:
    # query A: results rel, miss, rel  (R=2) -> P@1=1, P@3=2/3, AP=(1/1 + 2/3)/2 = 5/6, recall=2/2
    # query B: results miss, rel, miss (R=3) -> P@1=0, P@3=1/3, AP=(1/2)/3 = 1/6,     recall=1/3
    hits = np.array([[1, 0, 1], [0, 1, 0]], dtype=bool)
    m = scores_from_hits(hits, np.array([2, 3]), k=3)
    assert m["precision_at_1"] == pytest.approx(0.5)
    assert m["precision_at_k"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert m["map_at_k"] == pytest.approx((5 / 6 + 1 / 6) / 2)
    assert m["recall_at_k"] == pytest.approx((1 + 1 / 3) / 2)


def test_leave_one_out_on_points_on_a_line() -> None:
    # 1-D points (as 2-D vectors for L2): a a a at 0,1,2 and b b at 10,11
    db = np.array([[0.0, 0], [1, 0], [2, 0], [10, 0], [11, 0]], dtype=np.float32)
    labels = ["a", "a", "a", "b", "b"]
    m = retrieval_metrics(db, labels, db, labels, k=2, metric="l2", exclude_self=True)
    # neighbours (self excluded), k=2:
    #  0 -> 1,2 (a,a)  2/2 | 1 -> 0,2 (a,a) 2/2 | 2 -> 1,0 (a,a) 2/2
    #  3 -> 4,2 (b,a)  1/2 | 4 -> 3,2 (b,a) 1/2          => P@2 = (1+1+1+.5+.5)/5 = 0.8
    # R (self excluded): a -> 2, b -> 1; AP: a rows 1.0; b rows (1/1)/min(2,1) = 1.0 => mAP 1.0
    assert m["queries"] == 5 and m["database"] == 5
    assert m["precision_at_1"] == pytest.approx(1.0)
    assert m["precision_at_k"] == pytest.approx(0.8)
    assert m["map_at_k"] == pytest.approx(1.0)
    assert m["recall_at_k"] == pytest.approx(1.0)


def test_self_excluded_by_id_even_with_exact_duplicates() -> None:
    db = np.array([[1.0, 0], [1.0, 0], [0, 1.0]], dtype=np.float32)
    m = retrieval_metrics(db, ["x", "y", "y"], db, ["x", "y", "y"], k=1, exclude_self=True)
    # item 0 ("x") has no other "x": unscored. item 1 -> its duplicate 0 ("x"): miss. item 2 -> ?
    assert m["queries"] == 2 and m["unscored_queries"] == 1
    assert m["precision_at_1"] < 1.0


def test_unlabelled_queries_are_not_scored() -> None:
    db = np.eye(3, dtype=np.float32)
    m = retrieval_metrics(db, [None, "a", "b"], db, ["a", "a", "b"], k=1)
    assert m["queries"] == 2 and m["unscored_queries"] == 1
    assert m["precision_at_1"] == pytest.approx(1.0)
