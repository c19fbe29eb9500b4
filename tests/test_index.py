"""KMeans and KNN: exact results against brute force, IVF recall, atomic save, model checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from imgsim.errors import ModelMismatch, RunNotFound
from imgsim.index import knn as index_lib
from imgsim.index.knn import KMeansClusterer, KnnIndex
from imgsim.io.atomic import writing_dir


def clustered(n: int, dim: int = 16, centres: int = 20, seed: int = 0) -> np.ndarray:
    """A Gaussian mixture (the same centres for every seed, so queries come from the data's mixture)."""
    c = np.random.default_rng(12345).normal(size=(centres, dim)) * 3
    rng = np.random.default_rng(seed)
    return (c[rng.integers(0, centres, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def brute_force(q: np.ndarray, x: np.ndarray, metric: str) -> np.ndarray:
    """(Q, N) distances as the index documents them."""
    if metric == "cosine":
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        return 1 - qn @ xn.T
    return np.linalg.norm(q[:, None] - x[None], axis=2)


def recall(truth: np.ndarray, got: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(truth, got, strict=True)]))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_exact_search_matches_brute_force(metric: str) -> None:
    x, q = clustered(500), clustered(20, seed=1)
    dist, ids = KnnIndex(metric=metric, kind="exact").fit(x).search(q, k=5)
    brute = brute_force(q, x, metric)
    expected = np.argsort(brute, axis=1)[:, :5]
    assert dist.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (20, 5)
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(dist, np.take_along_axis(brute, expected, axis=1), atol=1e-4)
    assert (np.diff(dist, axis=1) >= -1e-6).all()


def test_distances_mean_cosine_distance_and_euclidean_distance() -> None:
    items = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]], dtype=np.float32)
    q = np.array([1.0, 0.0], dtype=np.float32)  # a single vector is one query
    dist, ids = KnnIndex(metric="cosine").fit(items).search(q, k=3)
    # same direction 1 - 1 = 0, orthogonal 1 - 0 = 1, opposite 1 - (-1) = 2 (length does not matter)
    np.testing.assert_array_equal(ids, [[0, 1, 2]])
    np.testing.assert_allclose(dist, [[0.0, 1.0, 2.0]], atol=1e-6)
    dist, ids = KnnIndex(metric="l2").fit(items).search(q, k=3)
    # |(1,0)-(2,0)| = 1, |(1,0)-(-1,0)| = 2, |(1,0)-(0,3)| = sqrt(1 + 9)
    np.testing.assert_array_equal(ids, [[0, 2, 1]])
    np.testing.assert_allclose(dist, [[1.0, 2.0, np.sqrt(10)]], atol=1e-6)


def test_ivf_recall_against_exact() -> None:
    x, q = clustered(20_000, centres=200), clustered(200, centres=200, seed=1)
    exact = KnnIndex(kind="exact").fit(x).search(q, 10)[1]
    ivf = KnnIndex(kind="ivf", nprobe=16).fit(x)
    assert ivf.kind_ == "ivf" and ivf.nlist_ == index_lib.default_nlist(20_000) > 100
    assert recall(exact, ivf.search(q, 10)[1]) >= 0.9
    assert recall(exact, ivf.search(q, 10, nprobe=ivf.nlist_)[1]) == 1.0  # every list: exact again
    assert ivf.search(q, 10, nprobe=1)[1].shape == (200, 10)


def test_ivf_never_returns_missing_ids() -> None:
    x = clustered(2000, centres=50)
    ivf = KnnIndex(kind="ivf", nlist=40, nprobe=1).fit(x)
    dist, ids = ivf.search(clustered(30, centres=50, seed=2), k=300)  # far more than one list holds
    assert ids.shape == (30, 300) and (ids >= 0).all()
    assert all(len(set(row)) == 300 for row in ids)
    assert (np.diff(dist, axis=1) >= -1e-6).all()


def test_auto_picks_ivf_only_above_the_threshold() -> None:
    assert KnnIndex(kind="auto", ivf_threshold=1000).fit(clustered(500)).kind_ == "exact"
    assert KnnIndex(kind="auto", ivf_threshold=1000).fit(clustered(2000)).kind_ == "ivf"


def test_k_larger_than_the_index_is_capped() -> None:
    dist, ids = KnnIndex().fit(clustered(3)).search(clustered(2, seed=3), k=10)
    assert ids.shape == dist.shape == (2, 3) and (ids >= 0).all()


def test_bad_input_is_a_clear_error() -> None:
    index = KnnIndex().fit(clustered(10))
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.zeros((1, 3), np.float32), 2)
    with pytest.raises(ValueError, match="NaN"):
        KnnIndex().fit(np.full((4, 2), np.nan))
    with pytest.raises(ValueError, match="metric"):
        KnnIndex(metric="dot")


def test_exclude_self_by_id_even_with_duplicates() -> None:
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)  # 0 and 1 identical
    dist, ids = KnnIndex().fit(x).search(x, k=2, exclude_self_ids=np.arange(4))
    assert (ids != np.arange(4)[:, None]).all()
    assert ids[0, 0] == 1 and dist[0, 0] == pytest.approx(0.0)  # the duplicate stays: excluded by id
    assert ids[1, 0] == 0
    assert KnnIndex().fit(x).search(x, k=10, exclude_self_ids=np.arange(4))[1].shape == (4, 3)


@pytest.mark.parametrize("kind", ["exact", "ivf"])
@pytest.mark.parametrize("queries", [5, 100])  # few queries: faiss id selector; many: gathered BLAS
def test_search_within_the_query_cluster(kind: str, queries: int) -> None:
    x, q = clustered(3000), clustered(queries, seed=4)
    item_clusters = np.random.default_rng(0).integers(0, 3, len(x))
    query_clusters = np.random.default_rng(1).integers(0, 3, len(q))
    index = KnnIndex(kind=kind, nprobe=1000).fit(x)  # IVF probing everything: exact, to compare
    dist, ids = index.search_within(q, 6, query_clusters, item_clusters)
    brute = brute_force(q, x, "cosine")
    brute[query_clusters[:, None] != item_clusters[None, :]] = np.inf
    expected = np.argsort(brute, axis=1)[:, :6]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(dist, np.take_along_axis(brute, expected, axis=1), atol=1e-4)


def test_search_within_a_small_cluster_pads_with_minus_one() -> None:
    x = clustered(50)
    item_clusters = np.zeros(50, np.int64)
    item_clusters[:2] = 7  # cluster 7 holds two items
    dist, ids = KnnIndex().fit(x).search_within(x[:1], 4, [7], item_clusters)
    assert sorted(ids[0, :2]) == [0, 1]
    np.testing.assert_array_equal(ids[0, 2:], [-1, -1])
    assert np.isinf(dist[0, 2:]).all()


def test_ivf_on_kmeans_centroids_is_the_within_cluster_search() -> None:
    x, q = clustered(3000, centres=8), clustered(40, centres=8, seed=6)
    km = KMeansClusterer(4).fit(x)
    within = KnnIndex(kind="ivf", nprobe=1).fit(x, centroids=km.centroids_)
    assert within.nlist_ == 4
    expected = KnnIndex().fit(x).search_within(q, 5, km.predict(q), km.labels_)
    for got, want in zip(within.search(q, 5), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_save_load_round_trip_and_fingerprint(tmp_path: Path) -> None:
    x = clustered(1000)
    index = KnnIndex(kind="ivf", nprobe=4).fit(x)
    index.save(tmp_path / "knn", model_fingerprint="abc")
    meta = json.loads((tmp_path / "knn" / "meta.json").read_text())
    assert meta | {"faiss_version": None} == {
        "metric": "cosine",
        "kind": "ivf",
        "n": 1000,
        "dim": 16,
        "nprobe": 4,
        "nlist": index.nlist_,
        "model_fingerprint": "abc",
        "faiss_version": None,
    }
    back = KnnIndex.load(tmp_path / "knn", expect_fingerprint="abc")
    assert (back.kind_, back.n_, back.dim_, back.nlist_) == ("ivf", 1000, 16, index.nlist_)
    for a, b in zip(back.search(x[:10], 5), index.search(x[:10], 5), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ModelMismatch, match="another model.*re-run `imgsim index"):
        KnnIndex.load(tmp_path / "knn", expect_fingerprint="other")
    KnnIndex.load(tmp_path / "knn")  # no expectation: loads whatever model built it
    with pytest.raises(RunNotFound):
        KnnIndex.load(tmp_path / "missing")


def test_a_crash_mid_save_leaves_the_old_index_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = clustered(200)
    KnnIndex().fit(x).save(tmp_path / "knn", model_fingerprint="old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "knn").iterdir()}

    def boom(path: Path) -> None:
        path.write_bytes(b"partial")
        raise RuntimeError("disk full")

    new = KnnIndex().fit(clustered(50, seed=5))
    with pytest.raises(RuntimeError, match="disk full"), writing_dir(tmp_path / "knn") as folder:
        new.save(folder, model_fingerprint="new")  # the run's index folder: the index, then the rest
        boom(folder / "x.bin")

    def write_half(index: object, path: str) -> None:  # faiss's writer dies after writing half a file
        Path(path).write_bytes(b"\0" * 100)
        raise OSError("killed")

    monkeypatch.setattr(index_lib.faiss, "write_index", write_half)
    with pytest.raises(OSError, match="killed"):
        new.save(tmp_path / "knn", model_fingerprint="new")
    assert {p.name: p.read_bytes() for p in (tmp_path / "knn").iterdir()} == before
    back = KnnIndex.load(tmp_path / "knn", expect_fingerprint="old")
    assert back.n_ == 200 and back.search(x[:3], 1)[1][:, 0].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["knn"]  # no staging directory left behind


def test_a_crash_between_the_two_renames_is_repaired_on_load(tmp_path: Path) -> None:
    # Where no atomic exchange exists, the folder's writer (`writing_dir`) moves the old directory
    # aside, then moves the new one in. Dying in between leaves only the set-aside old version (and a
    # staging dir); load restores it.
    x = clustered(100)
    with writing_dir(tmp_path / "knn") as folder:
        KnnIndex().fit(x).save(folder, model_fingerprint="old")
    os.replace(tmp_path / "knn", tmp_path / ".knn.old-dead1234")
    (tmp_path / ".knn.abc.tmp").mkdir()
    assert KnnIndex.load(tmp_path / "knn", expect_fingerprint="old").n_ == 100
    with writing_dir(tmp_path / "knn") as folder:
        KnnIndex().fit(x[:10]).save(folder, model_fingerprint="new")
    assert KnnIndex.load(tmp_path / "knn").n_ == 10
    assert not list(tmp_path.glob(".knn.old-*"))


def test_save_writes_only_the_index_and_its_folder_is_replaced_whole(tmp_path: Path) -> None:
    x = clustered(100)
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "other.txt").write_text("not the index's")
    KnnIndex().fit(x).save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["knn.faiss", "meta.json", "other.txt"]
    for name in ("a.txt", "b.txt"):  # the folder's writer swaps it in whole: the old files go
        with writing_dir(tmp_path / "idx") as folder:
            KnnIndex().fit(x).save(folder)
            (folder / name).write_text(name)
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["b.txt", "knn.faiss", "meta.json"]


def test_kmeans_is_deterministic_and_predicts_its_own_labels(tmp_path: Path) -> None:
    x = clustered(2000, centres=4)
    a, b = KMeansClusterer(4, seed=0).fit(x), KMeansClusterer(4, seed=0).fit(x)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_array_equal(a.centroids_, b.centroids_)
    assert len(np.unique(a.labels_)) == 4 and a.labels_.dtype == np.int64
    np.testing.assert_allclose(np.linalg.norm(a.centroids_, axis=1), 1.0, atol=1e-5)  # cosine: unit
    np.testing.assert_array_equal(a.predict(x), a.labels_)
    a.save(tmp_path / "kmeans")
    np.testing.assert_array_equal(KMeansClusterer.load(tmp_path / "kmeans").predict(x), a.labels_)


def test_kmeans_finds_well_separated_groups_and_handles_tiny_inputs() -> None:
    x = clustered(400, centres=3)
    truth = KnnIndex(metric="l2").fit(np.random.default_rng(12345).normal(size=(3, 16)) * 3)
    groups = truth.search(x, 1)[1][:, 0]
    labels = KMeansClusterer(3, metric="l2").fit(x).labels_
    assert len({(g, c) for g, c in zip(groups, labels, strict=True)}) == 3  # same partition
    tiny = KMeansClusterer(4).fit(x[:2])
    assert tiny.n_clusters_ == 2 and len(tiny.centroids_) == 2


def test_set_threads() -> None:
    before = index_lib.set_threads()
    try:
        assert index_lib.set_threads(1) == 1
    finally:
        index_lib.set_threads(before)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_range_search_finds_everything_within_the_distance(metric: str, kind: str) -> None:
    from imgsim.index.knn import cross_distances

    rng = np.random.default_rng(3)
    emb = rng.standard_normal((600, 8)).astype(np.float32)
    index = KnnIndex(metric=metric, kind=kind, nlist=8, nprobe=8).fit(emb)
    q = emb[:40] + 0.05 * rng.standard_normal((40, 8)).astype(np.float32)
    full = cross_distances(q, emb, metric)
    limit = float(np.quantile(full, 0.02))
    lims, dist, ids = index.range_search(q, limit, chunk=7)  # several faiss calls
    assert len(lims) == 41 and lims[-1] == len(ids) == len(dist)
    for i in range(40):
        got, d = ids[lims[i] : lims[i + 1]], dist[lims[i] : lims[i + 1]]
        assert set(got.tolist()) == set(np.flatnonzero(full[i] <= limit).tolist())
        assert np.all(np.diff(d) >= 0)  # nearest first
        np.testing.assert_allclose(d, full[i, got], atol=1e-4)
    lims3, _, ids3 = index.range_search(q, limit, max_results=3)
    assert np.all(np.diff(lims3) <= 3)
    assert ids3[lims3[0] : lims3[1]].tolist() == ids[lims[0] : lims[0] + min(3, lims[1] - lims[0])].tolist()
    with pytest.raises(ValueError):
        index.range_search(q, -1.0)


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_remove_and_add_keep_ids_as_row_numbers(kind: str) -> None:
    # an incremental re-index drops rows from embeddings.parquet and appends new ones: the index
    # must give the same ids as the rows' new positions
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(3000, 16)).astype(np.float32)
    new = rng.normal(size=(50, 16)).astype(np.float32)
    removed = np.array([0, 7, 1500, 2999])
    index = KnnIndex(kind=kind, nlist=16, nprobe=16).fit(emb).remove(removed).add(new)
    rows = np.concatenate([np.delete(emb, removed, axis=0), new])
    assert len(index) == len(rows)
    _, ids = index.search(rows[::50], k=1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(0, len(rows), 50))
