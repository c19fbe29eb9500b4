"""KMeans and KNN: exact results against brute force, IVF recall, atomic save, model checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imgsim.errors import ModelMismatch, RunNotFound
from imgsim.index import KMeansClusterer, KnnIndex


def clustered(n: int, dim: int = 16, centres: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim)) * 3
    return (c[rng.integers(0, centres, n)] + rng.normal(size=(n, dim))).astype(np.float32)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_exact_search_matches_brute_force(metric: str) -> None:
    x, q = clustered(500), clustered(20, seed=1)
    dist, ids = KnnIndex(metric=metric, kind="exact").fit(x).search(q, k=5)
    if metric == "cosine":
        xn, qn = x / np.linalg.norm(x, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)
        brute = 1 - qn @ xn.T
    else:
        brute = np.linalg.norm(q[:, None] - x[None], axis=2)
    expected = np.argsort(brute, axis=1)[:, :5]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(dist, np.take_along_axis(brute, expected, axis=1), atol=1e-4)
    assert (np.diff(dist, axis=1) >= -1e-6).all()


def test_ivf_recall_against_exact() -> None:
    x, q = clustered(20_000, centres=200), clustered(200, centres=200, seed=1)
    exact = KnnIndex(kind="exact").fit(x).search(q, 10)[1]
    ivf = KnnIndex(kind="ivf", nprobe=16).fit(x)
    assert ivf.kind_ == "ivf" and ivf.nlist_ > 1
    got = ivf.search(q, 10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, got, strict=True)])
    assert recall >= 0.9


def test_auto_picks_ivf_only_above_the_threshold() -> None:
    assert KnnIndex(kind="auto", ivf_threshold=1000).fit(clustered(500)).kind_ == "exact"
    assert KnnIndex(kind="auto", ivf_threshold=1000).fit(clustered(2000)).kind_ == "ivf"


def test_k_larger_than_the_index_is_capped() -> None:
    dist, ids = KnnIndex().fit(clustered(3)).search(clustered(2, seed=3), k=10)
    assert ids.shape == (2, 3) and (ids >= 0).all()


def test_search_within_a_subset() -> None:
    x = clustered(300)
    index = KnnIndex().fit(x)
    allowed = np.arange(100, 200)
    _, ids = index.search_subset(x[:5], 7, allowed)
    assert np.isin(ids, allowed).all()


def test_save_load_round_trip_and_fingerprint(tmp_path: Path) -> None:
    x = clustered(1000)
    index = KnnIndex(kind="ivf", nprobe=4).fit(x)
    index.save(tmp_path / "knn", model_fingerprint="abc")
    back = KnnIndex.load(tmp_path / "knn", expect_fingerprint="abc")
    np.testing.assert_array_equal(back.search(x[:10], 5)[1], index.search(x[:10], 5)[1])
    with pytest.raises(ModelMismatch, match="re-run `imgsim index"):
        KnnIndex.load(tmp_path / "knn", expect_fingerprint="other")
    with pytest.raises(RunNotFound):
        KnnIndex.load(tmp_path / "missing")


def test_a_crash_mid_save_leaves_the_old_index_intact(tmp_path: Path) -> None:
    x = clustered(200)
    KnnIndex().fit(x).save(tmp_path / "knn", model_fingerprint="old")

    def boom(path: Path) -> None:
        path.write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        KnnIndex().fit(clustered(50, seed=5)).save(
            tmp_path / "knn", model_fingerprint="new", extra_files={"x.bin": boom}
        )
    back = KnnIndex.load(tmp_path / "knn", expect_fingerprint="old")
    assert back.n_ == 200
    assert [p.name for p in tmp_path.iterdir()] == ["knn"]  # no staging directory left behind


def test_kmeans_is_deterministic_and_predicts_its_own_labels(tmp_path: Path) -> None:
    x = clustered(2000, centres=4)
    a, b = KMeansClusterer(4, seed=0).fit(x), KMeansClusterer(4, seed=0).fit(x)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    assert len(np.unique(a.labels_)) == 4
    np.testing.assert_array_equal(a.predict(x), a.labels_)
    a.save(tmp_path)
    np.testing.assert_array_equal(KMeansClusterer.load(tmp_path).predict(x), a.labels_)
