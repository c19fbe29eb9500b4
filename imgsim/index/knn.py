"""KMeans clustering and KNN search over embeddings (scikit-learn's estimator convention).

    clusterer = KMeansClusterer(n_clusters=4).fit(emb);  clusterer.predict(q)
    index = KnnIndex(metric="cosine").fit(emb);          distances, ids = index.search(q, k=10)

Distances, as users see them:
- cosine: `1 - cos(q, x)`, from 0 (same direction) through 1 (orthogonal) to 2 (opposite). Vectors
  are L2-normalised at fit and at query time; the index holds unit vectors, searched by inner product.
- l2: the Euclidean distance `||q - x||` (faiss works with squares; we return the root).

Kinds:
- exact: a faiss flat index (brute force): always the true neighbours, cost linear in N per query.
- ivf: faiss IVF-Flat. KMeans in the search metric splits the vectors into `nlist` partitions
  (default 2·sqrt(N)); a query scans only its `nprobe` nearest partitions.
- auto: ivf from `ivf_threshold` vectors up, exact below.

`range_search(q, max_distance)` returns every indexed item within a distance (faiss range search,
in chunks of queries, nearest first, optionally capped per query): what duplicate finding uses
instead of an N x N matrix (`imgsim.duplicates.groups`).

The original design searched only within the query's predicted cluster: `search_within`. It is exact
inside the cluster but misses neighbours across a cluster boundary; bench/search.py measures that
recall cost against exact search.

ids are row numbers of the fitted matrix and never -1: k is capped at the index size, and an IVF query
whose probed partitions hold fewer than k items is re-run over all partitions. The one exception is
`search_within`, whose rows are padded with id -1 / distance inf when the query's cluster has fewer
than k items.

`KnnIndex.save(dir)` writes the index's own two files into `dir` (knn.faiss, then meta.json), each
renamed into place, and nothing else; the folder around them (a run's `index/`, with the embeddings and
the KMeans centroids) is its caller's, swapped in whole with `imgsim.io.atomic.writing_dir`.
`KMeansClusterer.save(dir)` writes `dir` whole, atomically. `load(dir, expect_fingerprint=...)`
refuses an index built with another model.

Threads: faiss uses OpenMP, by default one thread per core (or $OMP_NUM_THREADS). $IMGSIM_THREADS
(read when an index or clusterer is first fitted or loaded) or `set_threads(n)` overrides that. Use 1
on an oversubscribed machine: when faiss's threads compete with other processes for the cores,
OpenMP's barriers make it many times slower (docs/scaling.md has the measurement).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from imgsim.config import DEFAULTS, METRICS
from imgsim.config import INDEX_KINDS as KINDS
from imgsim.errors import ImgsimError, ModelMismatch, RunNotFound
from imgsim.io.atomic import atomic_write_bytes, recover_dir, temp_path_beside, writing_dir

META_FILE = "meta.json"
INDEX_FILE = "knn.faiss"
IVF_TRAIN_POINTS_PER_LIST = 64  # training sample per IVF partition (faiss wants at least 39)
IVF_TRAIN_ITERATIONS = 10  # KMeans iterations for the coarse quantiser
GATHER_MIN_QUERIES = 64  # search_within on an exact index: from this many queries per cluster, use BLAS
CHUNK_ROWS = 65_536  # rows normalised and added to faiss at a time (no copy of the whole matrix)
THREADS_ENV = "IMGSIM_THREADS"
RANGE_CHUNK = 8192  # range_search queries per faiss call (bounds the memory of one call's matches)
RANGE_TOLERANCE = 1e-6  # a pair exactly at the distance limit is kept despite float rounding
_threads_chosen = False


def set_threads(n: int | None = None) -> int:
    """Let faiss use `n` threads (None: $IMGSIM_THREADS when set, else leave it); returns the count."""
    global _threads_chosen
    if n is None:
        env = os.environ.get(THREADS_ENV, "").strip()
        n = int(env) if env.isdigit() else None
    if n is not None:
        faiss.omp_set_num_threads(max(1, n))
        _threads_chosen = True
    return int(faiss.omp_get_max_threads())


def _default_threads() -> None:
    """Apply $IMGSIM_THREADS once, before the first faiss work, unless `set_threads` already chose."""
    if not _threads_chosen:
        set_threads()


def as_matrix(x: Any, what: str = "embeddings") -> np.ndarray:
    """`x` as a C-contiguous float32 (N, D) matrix (a single vector becomes one row); rejects NaN/inf."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{what} must be a (N, D) matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return np.ascontiguousarray(x)


def normalise(x: Any, what: str = "embeddings") -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as a new float32 matrix."""
    x = as_matrix(x, what).copy()
    faiss.normalize_L2(x)
    return x


def metric_space(x: Any, metric: str, what: str = "embeddings") -> np.ndarray:
    """Vectors as the index compares them: unit length for cosine, as they are for l2."""
    return normalise(x, what) if metric == "cosine" else as_matrix(x, what)


def pair_distances(a: Any, b: Any, metric: str) -> np.ndarray:
    """The distance (as `KnnIndex` reports it) between row i of `a` and row i of `b`, for every i."""
    if metric == "cosine":
        x, y = normalise(a), normalise(b)
        return np.clip(1.0 - np.einsum("ij,ij->i", x, y), 0.0, 2.0).astype(np.float32)
    x, y = as_matrix(a), as_matrix(b)
    return np.sqrt(np.einsum("ij,ij->i", x - y, x - y)).astype(np.float32)


def cross_distances(a: Any, b: Any, metric: str) -> np.ndarray:
    """(len(a), len(b)) distances between every row of `a` and every row of `b` (small sets only)."""
    x, y = metric_space(a, metric), metric_space(b, metric)
    if metric == "cosine":
        return np.clip(1.0 - x @ y.T, 0.0, 2.0).astype(np.float32)
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return np.sqrt(np.maximum(sq, 0.0)).astype(np.float32)


def default_nlist(n: int) -> int:
    """IVF partitions for `n` vectors: 2·sqrt(n), at most n/39 so each has enough training points.

    At 1M × 64 on 2 cores, 2,000 lists fit and fill in 18 s against 68 s for 4·sqrt(n) = 4,000, with
    recall@10 0.998 against 0.997 at nprobe 16; a query scans twice the vectors (0.20 vs 0.13 ms),
    which the request's own overhead (~9 ms through Serve) hides. On bench.search's harder synthetic
    mixture recall@10 at nprobe 16 drops from 0.976 to 0.957 (docs/scaling.md); raise `nprobe` there."""
    return max(1, min(round(2 * math.sqrt(n)), n // 39))


def drop_ids(
    scores: np.ndarray, ids: np.ndarray, exclude: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Remove id `exclude[i]` from row i of a (N, k+1) result, keeping the best `k` (leave-one-out).

    Rows that do not contain their excluded id lose their last (worst) result instead. Exclusion is by
    id, never by distance: a collection may hold exact duplicates of the query.
    """
    keep = ids != np.asarray(exclude, dtype=np.int64)[:, None]
    keep[keep.all(axis=1), -1] = False
    rows, cols = len(ids), ids.shape[1] - 1
    return scores[keep].reshape(rows, cols)[:, :k], ids[keep].reshape(rows, cols)[:, :k]


# -- KMeans ------------------------------------------------------------------------------------------
class KMeansClusterer:
    """KMeans (faiss) on embeddings, in the search metric's space: spherical KMeans on unit vectors for
    cosine, so a cluster groups what search finds similar. Deterministic for a given seed and data.

    Fitted: `centroids_` (K, D) float32 (unit length for cosine), `labels_` (N,) int64, `n_clusters_`
    (K, fewer than asked when there are fewer vectors).
    """

    def __init__(
        self,
        n_clusters: int = DEFAULTS.index.clusters,
        metric: str = DEFAULTS.index.metric,
        seed: int = 0,
        n_iter: int = 25,
        n_init: int = 3,
        max_points_per_centroid: int = 100_000,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if n_clusters < 1:
            raise ValueError(f"n_clusters must be at least 1, got {n_clusters}")
        self.n_clusters = n_clusters
        self.metric = metric
        self.seed = seed
        self.n_iter = n_iter
        self.n_init = n_init
        self.max_points_per_centroid = max_points_per_centroid

    def _space(self, x: Any) -> np.ndarray:
        return metric_space(x, self.metric)

    def fit(self, emb: np.ndarray) -> KMeansClusterer:
        """Learn the centroids (best of `n_init` runs) and each embedding's cluster.

        The centroids are learnt on at most `max_points_per_centroid` rows per cluster, picked at
        random with `seed` (all of them below that): a copy of that sample, not of `emb`, is made.
        """
        _default_threads()
        n = len(emb)
        if n == 0:
            raise ValueError("cannot cluster an empty set of embeddings")
        k = min(self.n_clusters, n)
        x = self._space(_sample(emb, k * self.max_points_per_centroid, self.seed))
        km = faiss.Kmeans(
            x.shape[1],
            k,
            niter=self.n_iter,
            nredo=self.n_init,
            seed=self.seed,
            spherical=self.metric == "cosine",
            max_points_per_centroid=self.max_points_per_centroid,
            min_points_per_centroid=1,  # small collections are fine; no faiss warning
            verbose=False,
        )
        km.train(x)
        del x
        self.centroids_ = np.ascontiguousarray(km.centroids, dtype=np.float32)
        self.n_clusters_ = k
        self._centroid_index = None
        self.labels_ = np.concatenate(
            [self.predict(emb[i : i + CHUNK_ROWS]) for i in range(0, n, CHUNK_ROWS)]
        )
        return self

    def predict(self, q: np.ndarray) -> np.ndarray:
        """The nearest centroid (cluster number) of each row of `q`, as int64."""
        if self._centroid_index is None:
            index = faiss.IndexFlat(self.centroids_.shape[1], _faiss_metric(self.metric))
            index.add(self.centroids_)
            self._centroid_index = index
        _, ids = self._centroid_index.search(self._space(q), 1)
        return ids[:, 0].astype(np.int64)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write centroids.npy and kmeans.json to `directory`, atomically."""
        with writing_dir(directory) as tmp:
            np.save(tmp / "centroids.npy", self.centroids_)
            meta = {"n_clusters": self.n_clusters_, "metric": self.metric, "seed": self.seed}
            (tmp / "kmeans.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> KMeansClusterer:
        """The clusterer saved in `directory`."""
        d = Path(directory)
        recover_dir(d)
        if not (d / "kmeans.json").is_file():
            raise RunNotFound(f"no clusters at {d} — run `imgsim index DATA --model RUN` first")
        meta = json.loads((d / "kmeans.json").read_text())
        obj = cls(n_clusters=meta["n_clusters"], metric=meta["metric"], seed=meta["seed"])
        obj.centroids_ = np.load(d / "centroids.npy").astype(np.float32)
        obj.n_clusters_ = len(obj.centroids_)
        obj._centroid_index = None
        return obj


def _sample(emb: np.ndarray, at_most: int, seed: int) -> np.ndarray:
    """`emb` itself when it has at most `at_most` rows, else that many of its rows picked at random."""
    if len(emb) <= at_most:
        return emb
    rows = np.sort(np.random.default_rng(seed).choice(len(emb), at_most, replace=False))
    return emb[rows]


def _faiss_metric(metric: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


# -- KNN ---------------------------------------------------------------------------------------------
class KnnIndex:
    """K nearest neighbours over embeddings, exact or partitioned (IVF); see the module docstring.

    Fitted: `kind_` ("exact" or "ivf"), `n_`, `dim_`, `nlist_` (None for exact), `index_` (faiss).
    Searching is thread-safe (no per-call state is stored on the index).
    """

    def __init__(
        self,
        metric: str = DEFAULTS.index.metric,
        kind: str = DEFAULTS.index.kind,
        nprobe: int = DEFAULTS.index.nprobe,
        nlist: int | None = None,
        ivf_threshold: int = DEFAULTS.index.ivf_threshold,
        seed: int = 0,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if nprobe < 1:
            raise ValueError(f"nprobe must be at least 1, got {nprobe}")
        self.metric = metric
        self.kind = kind
        self.nprobe = nprobe
        self.nlist = nlist
        self.ivf_threshold = ivf_threshold
        self.seed = seed

    # -- fit -----------------------------------------------------------------------------------------
    def _space(self, x: Any, what: str = "embeddings") -> np.ndarray:
        return metric_space(x, self.metric, what)

    def fit(self, emb: np.ndarray, centroids: np.ndarray | None = None) -> KnnIndex:
        """Index the rows of `emb` (N, D); their row numbers are the ids `search` returns.

        `centroids` (K, D), e.g. `KMeansClusterer.centroids_` fitted in the same metric: build an IVF
        index whose partitions are exactly those clusters instead of learning its own. With nprobe=1 a
        query then scans only its predicted cluster: the original design, at a cost proportional to
        the cluster's size (`search_within` gives the same results on any index, but scans all N).
        """
        _default_threads()
        emb = as_matrix(emb)
        n, d = emb.shape
        if n == 0:
            raise ValueError("cannot index an empty set of embeddings")
        ivf = centroids is not None or self.kind == "ivf" or (self.kind == "auto" and n >= self.ivf_threshold)
        metric = _faiss_metric(self.metric)
        self.nlist_: int | None = None
        if centroids is not None:
            c = self._space(centroids, "centroids")
            if c.shape[1] != d:
                raise ValueError(f"centroids have dimension {c.shape[1]}, the embeddings {d}")
            self.nlist_ = len(c)
            quantiser = faiss.IndexFlat(d, metric)
            quantiser.add(c)
            index: Any = faiss.IndexIVFFlat(quantiser, d, self.nlist_, metric)
            index.is_trained = True
            index.nprobe = min(self.nprobe, self.nlist_)
            self._quantiser = quantiser
        elif ivf:
            self.nlist_ = max(1, min(self.nlist or default_nlist(n), n))
            quantiser = faiss.IndexFlat(d, metric)
            index = faiss.IndexIVFFlat(quantiser, d, self.nlist_, metric)
            index.cp.seed = self.seed
            index.cp.niter = IVF_TRAIN_ITERATIONS
            index.cp.spherical = self.metric == "cosine"
            index.cp.max_points_per_centroid = IVF_TRAIN_POINTS_PER_LIST
            index.cp.min_points_per_centroid = 1
            # faiss would sample this many itself, from a normalised copy of everything
            index.train(self._space(_sample(emb, self.nlist_ * IVF_TRAIN_POINTS_PER_LIST, self.seed)))
            index.nprobe = min(self.nprobe, self.nlist_)
            self._quantiser = quantiser  # the IVF index does not own it from Python
        else:
            index = faiss.IndexFlat(d, metric)
        self.index_ = index
        self.kind_ = "ivf" if ivf else "exact"
        self.n_, self.dim_ = 0, d
        self._within_cache: tuple[Any, dict[int, tuple[np.ndarray, int]]] | None = None
        return self.add(emb)

    def add(self, emb: np.ndarray) -> KnnIndex:
        """Append the rows of `emb`: they get the ids n, n+1, ... (n: the size before)."""
        emb = as_matrix(emb)
        if emb.shape[1] != self.dim_:
            raise ValueError(f"embeddings have dimension {emb.shape[1]}, the index {self.dim_}")
        for i in range(0, len(emb), CHUNK_ROWS):
            self.index_.add(self._space(emb[i : i + CHUNK_ROWS]))
        self.n_ = int(self.index_.ntotal)
        self._within_cache = None
        return self

    def remove(self, ids: np.ndarray) -> KnnIndex:
        """Drop the items `ids`; the others' ids shift down so that ids stay row numbers (as when
        the same rows are filtered out of embeddings.parquet)."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if len(ids) == 0:
            return self
        if ids[0] < 0 or ids[-1] >= self.n_:
            raise ValueError(f"ids to remove must be in 0..{self.n_ - 1}")
        self.index_.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids)))
        if self.kind_ == "ivf":  # IVF keeps explicit ids: renumber them (a flat index compacts itself)
            new_id = np.arange(self.n_, dtype=np.int64) - np.searchsorted(ids, np.arange(self.n_))
            invlists = self.index_.invlists
            for list_no in range(self.index_.nlist):
                size = invlists.list_size(list_no)
                if size:
                    stored = faiss.rev_swig_ptr(invlists.get_ids(list_no), size)
                    stored[:] = new_id[stored]
        self.n_ = int(self.index_.ntotal)
        self._within_cache = None
        return self

    def __len__(self) -> int:
        return int(self.n_)

    # -- search --------------------------------------------------------------------------------------
    def _queries(self, q: Any) -> np.ndarray:
        if not hasattr(self, "index_"):
            raise RuntimeError("this KnnIndex is not fitted: call fit(emb) or KnnIndex.load(dir) first")
        x = self._space(q, "queries")
        if x.shape[1] != self.dim_:
            raise ValueError(f"queries have dimension {x.shape[1]}, the index {self.dim_}")
        return x

    def _to_distance(self, scores: np.ndarray) -> np.ndarray:
        if self.metric == "cosine":
            return np.clip(1.0 - scores, 0.0, 2.0).astype(np.float32)
        return np.sqrt(np.maximum(scores, 0.0)).astype(np.float32)

    def _search(
        self, x: np.ndarray, k: int, nprobe: int | None = None, sel: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """faiss scores and ids; for IVF, rows left short of k results are re-run over every list."""
        if self.kind_ == "ivf":
            assert self.nlist_ is not None
            probe = min(nprobe or self.nprobe, self.nlist_)
            scores, ids = self.index_.search(x, k, params=faiss.SearchParametersIVF(nprobe=probe, sel=sel))
            short = (ids < 0).any(axis=1)
            if short.any() and probe < self.nlist_:
                everything = faiss.SearchParametersIVF(nprobe=self.nlist_, sel=sel)
                scores[short], ids[short] = self.index_.search(x[short], k, params=everything)
        else:
            params = None if sel is None else faiss.SearchParameters(sel=sel)
            scores, ids = self.index_.search(x, k, params=params)
        return scores, ids.astype(np.int64)

    def search(
        self,
        q: np.ndarray,
        k: int = 10,
        *,
        nprobe: int | None = None,
        exclude_self_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The `k` nearest indexed items of each query row: (distances float32, ids int64), each (N, k'),
        nearest first, with k' = min(k, size of the index).

        `nprobe`: partitions to scan (IVF only; default the index's). `exclude_self_ids[i]`: an id to
        leave out of row i's results (leave-one-out evaluation); then k' = min(k, size - 1).
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        x = self._queries(q)
        if exclude_self_ids is None:
            scores, ids = self._search(x, min(k, self.n_), nprobe)
            return self._to_distance(scores), ids
        exclude = np.asarray(exclude_self_ids, dtype=np.int64).reshape(-1)
        if len(exclude) != len(x):
            raise ValueError(f"exclude_self_ids has {len(exclude)} ids for {len(x)} queries")
        want = min(k, self.n_ - 1)
        if want == 0:
            return np.zeros((len(x), 0), np.float32), np.zeros((len(x), 0), np.int64)
        scores, ids = drop_ids(*self._search(x, want + 1, nprobe), exclude, want)
        return self._to_distance(scores), ids

    def range_search(
        self,
        q: np.ndarray,
        max_distance: float,
        *,
        nprobe: int | None = None,
        max_results: int | None = None,
        chunk: int = RANGE_CHUNK,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every indexed item within `max_distance` (inclusive) of each query row, nearest first.

        Returns (lims (N+1,) int64, distances float32, ids int64) in faiss's CSR layout: row i's
        results are `distances[lims[i]:lims[i+1]]`, `ids[lims[i]:lims[i+1]]`. `max_results` keeps
        only the nearest that many per row. Queries go to faiss in chunks of `chunk` rows, so memory
        follows the number of matches, never N x N. On an IVF index only the `nprobe` nearest
        partitions are scanned (an item across a partition boundary may be missed, as in `search`).
        """
        if max_distance < 0:
            raise ValueError(f"max_distance must be at least 0, got {max_distance}")
        x = self._queries(q)
        if self.metric == "cosine":  # faiss keeps inner products above the threshold
            threshold = 1.0 - float(max_distance) - RANGE_TOLERANCE
        else:  # faiss keeps squared distances below the threshold
            threshold = (float(max_distance) + RANGE_TOLERANCE) ** 2
        params = None
        if self.kind_ == "ivf":
            assert self.nlist_ is not None
            params = faiss.SearchParametersIVF(nprobe=min(nprobe or self.nprobe, self.nlist_))
        counts, dists, ids = [], [], []
        for start in range(0, len(x), max(1, chunk)):
            lims, scores, found = self.index_.range_search(x[start : start + chunk], threshold, params=params)
            per_row = np.diff(lims).astype(np.int64)
            row = np.repeat(np.arange(len(per_row)), per_row)
            dist = self._to_distance(scores)
            order = np.lexsort((found, dist, row))  # by row, then distance, then id (deterministic)
            row, dist, found = row[order], dist[order], found[order].astype(np.int64)
            if max_results is not None:
                rank = np.arange(len(row)) - np.repeat(lims[:-1].astype(np.int64), per_row)
                keep = rank < max_results
                row, dist, found = row[keep], dist[keep], found[keep]
                per_row = np.minimum(per_row, max_results)
            counts.append(per_row)
            dists.append(dist)
            ids.append(found)
        per_query = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        lims_all = np.concatenate([[0], np.cumsum(per_query)]).astype(np.int64)
        return (
            lims_all,
            np.concatenate(dists) if dists else np.zeros(0, np.float32),
            np.concatenate(ids) if ids else np.zeros(0, np.int64),
        )

    def _cluster_members(self, item_clusters: Any, cluster: int) -> tuple[np.ndarray, int]:
        """(bitmap for faiss.IDSelectorBitmap, member count) of one cluster; cached per array object."""
        if self._within_cache is None or self._within_cache[0] is not item_clusters:
            self._within_cache = (item_clusters, {})
        cache = self._within_cache[1]
        if cluster not in cache:
            mask = np.asarray(item_clusters).reshape(-1) == cluster
            cache[cluster] = (np.packbits(mask, bitorder="little"), int(mask.sum()))
        return cache[cluster]

    def search_within(
        self,
        q: np.ndarray,
        k: int,
        query_clusters: np.ndarray,
        item_clusters: np.ndarray,
        *,
        nprobe: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like `search`, but row i only among the items whose cluster is `query_clusters[i]` (the
        original design). `item_clusters` (N,) is every indexed item's cluster; pass the same array
        object on each call (its per-cluster masks are cached) and do not modify it in place.

        Rows of a cluster with fewer than k items end with id -1 and distance inf.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        x = self._queries(q)
        qc = np.asarray(query_clusters, dtype=np.int64).reshape(-1)
        if len(qc) != len(x):
            raise ValueError(f"query_clusters has {len(qc)} entries for {len(x)} queries")
        if np.asarray(item_clusters).size != self.n_:
            raise ValueError(f"item_clusters has {np.asarray(item_clusters).size} entries, index {self.n_}")
        k = min(k, self.n_)
        dist = np.full((len(x), k), np.inf, np.float32)
        ids = np.full((len(x), k), -1, np.int64)
        for c in np.unique(qc):
            rows = np.flatnonzero(qc == c)
            bitmap, count = self._cluster_members(item_clusters, int(c))
            kc = min(k, count)
            if kc == 0:
                continue
            if self.kind_ == "exact" and len(rows) >= GATHER_MIN_QUERIES:
                members = np.flatnonzero(np.unpackbits(bitmap, count=self.n_, bitorder="little"))
                scores, local = faiss.knn(
                    x[rows], self._vectors()[members], kc, metric=_faiss_metric(self.metric)
                )
                found = members[local]
            else:
                sel = faiss.IDSelectorBitmap(self.n_, faiss.swig_ptr(bitmap))
                scores, found = self._search(x[rows], kc, nprobe, sel=sel)
            dist[rows, :kc], ids[rows, :kc] = self._to_distance(scores), found
        return dist, ids

    def _vectors(self) -> np.ndarray:
        """The stored (N, D) vectors of an exact index, without a copy."""
        return faiss.rev_swig_ptr(self.index_.get_xb(), self.n_ * self.dim_).reshape(self.n_, self.dim_)

    # -- save / load ---------------------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        """What `save` records in meta.json (besides the model fingerprint)."""
        return {
            "metric": self.metric,
            "kind": self.kind_,
            "n": int(self.n_),
            "dim": int(self.dim_),
            "nprobe": int(self.nprobe),
            "nlist": self.nlist_,
            "faiss_version": faiss.__version__,
        }

    def save(self, directory: str | os.PathLike[str], model_fingerprint: str = "") -> None:
        """Write knn.faiss, then meta.json, into `directory` (created if missing); other files there
        are left alone. Each file is written beside its target and renamed into place, so a crash
        leaves the previous files; to replace a whole folder at once, save into
        `imgsim.io.atomic.writing_dir(folder)`.

        `model_fingerprint` is opaque: `load(expect_fingerprint=...)` compares it.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = temp_path_beside(d / INDEX_FILE)
        try:
            faiss.write_index(self.index_, str(tmp))
            os.replace(tmp, d / INDEX_FILE)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        meta = {**self.meta, "model_fingerprint": model_fingerprint}
        atomic_write_bytes(d / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
        self.model_fingerprint_ = model_fingerprint

    @classmethod
    def load(cls, directory: str | os.PathLike[str], expect_fingerprint: str | None = None) -> KnnIndex:
        """The index saved in `directory`; `ModelMismatch` if it was built with another model."""
        _default_threads()
        d = Path(directory)
        recover_dir(d)
        if not (d / META_FILE).is_file():
            raise RunNotFound(f"no index at {d} — run `imgsim index DATA --model RUN` first")
        meta = json.loads((d / META_FILE).read_text())
        built_with = meta.get("model_fingerprint", "")
        if expect_fingerprint is not None and built_with != expect_fingerprint:
            raise ModelMismatch(
                f"the index in {d} was built with another model (fingerprint {built_with or 'none'}, "
                f"loaded model {expect_fingerprint}) — re-run `imgsim index DATA --model RUN`"
            )
        try:
            index = faiss.read_index(str(d / INDEX_FILE))
        except RuntimeError as e:
            raise ImgsimError(
                f"cannot read the index {d / INDEX_FILE} ({str(e).strip().splitlines()[-1]}) — "
                "re-run `imgsim index DATA --model RUN`"
            ) from None
        if index.ntotal != meta["n"] or index.d != meta["dim"]:
            raise ImgsimError(
                f"{d}: knn.faiss does not match meta.json — re-run `imgsim index DATA --model RUN`"
            )
        obj = cls(metric=meta["metric"], kind=meta["kind"], nprobe=meta["nprobe"], nlist=meta.get("nlist"))
        obj.index_, obj.kind_, obj.n_, obj.dim_ = index, meta["kind"], int(meta["n"]), int(meta["dim"])
        obj.nlist_ = meta.get("nlist")
        obj.model_fingerprint_ = built_with
        obj._within_cache = None
        return obj
