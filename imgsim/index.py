"""KMeans clustering and KNN search over embeddings (scikit-learn's estimator convention).

    clusterer = KMeansClusterer(n_clusters=4).fit(emb);  clusterer.predict(q)
    index = KnnIndex(metric="cosine").fit(emb);          distances, ids = index.search(q, k=10)

Distances: cosine distance `1 - cos(q, x)` (0 = same direction, 2 = opposite) or Euclidean `||q - x||`.
Kinds: `exact` (faiss flat, brute force), `ivf` (faiss IVF-Flat: the KMeans idea as a coarse
quantiser, searching the `nprobe` nearest of `nlist` partitions), `auto` (IVF above
`ivf_threshold` vectors). `save(dir)` writes a whole directory beside the target and swaps it in,
so a crash never leaves a half-written index.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from imgsim.config import DEFAULTS
from imgsim.errors import ModelMismatch, RunNotFound

META_FILE = "meta.json"


def _as_float32(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    return x[None, :] if x.ndim == 1 else x


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = _as_float32(x).copy()
    faiss.normalize_L2(x)
    return x


def replace_dir(tmp: Path, target: Path) -> None:
    """Swap directory `tmp` into place at `target` (old version removed only after the swap)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def staging_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))


class KMeansClusterer:
    """KMeans on embeddings, in the search metric's space (unit vectors for cosine)."""

    def __init__(
        self,
        n_clusters: int = DEFAULTS.index.clusters,
        metric: str = "cosine",
        seed: int = 0,
        n_iter: int = 25,
        n_init: int = 3,
    ) -> None:
        self.n_clusters = n_clusters
        self.metric = metric
        self.seed = seed
        self.n_iter = n_iter
        self.n_init = n_init

    def _space(self, x: np.ndarray) -> np.ndarray:
        return normalise(x) if self.metric == "cosine" else _as_float32(x)

    def fit(self, emb: np.ndarray) -> KMeansClusterer:
        x = self._space(emb)
        k = max(1, min(self.n_clusters, len(x)))
        km = faiss.Kmeans(
            x.shape[1],
            k,
            niter=self.n_iter,
            nredo=self.n_init,
            seed=self.seed,
            spherical=self.metric == "cosine",
            verbose=False,
            max_points_per_centroid=100_000,
        )
        km.train(x)
        self.centroids_ = km.centroids.copy()
        self.labels_ = self.predict(emb)
        return self

    def predict(self, q: np.ndarray) -> np.ndarray:
        """The nearest centroid of each row."""
        x = self._space(q)
        index = faiss.IndexFlatIP(x.shape[1]) if self.metric == "cosine" else faiss.IndexFlatL2(x.shape[1])
        index.add(self.centroids_)
        _, ids = index.search(x, 1)
        return ids[:, 0].astype(np.int64)

    def save(self, directory: str | os.PathLike[str]) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / "centroids.npy", self.centroids_)
        (d / "kmeans.json").write_text(
            json.dumps({"n_clusters": self.n_clusters, "metric": self.metric, "seed": self.seed})
        )

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> KMeansClusterer:
        d = Path(directory)
        meta = json.loads((d / "kmeans.json").read_text())
        obj = cls(n_clusters=meta["n_clusters"], metric=meta["metric"], seed=meta["seed"])
        obj.centroids_ = np.load(d / "centroids.npy")
        return obj


class KnnIndex:
    """K nearest neighbours over embeddings, exact or partitioned (IVF)."""

    def __init__(
        self,
        metric: str = DEFAULTS.index.metric,
        kind: str = DEFAULTS.index.kind,
        nprobe: int = DEFAULTS.index.nprobe,
        nlist: int | None = None,
        ivf_threshold: int = DEFAULTS.index.ivf_threshold,
        seed: int = 0,
    ) -> None:
        if metric not in ("cosine", "l2"):
            raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")
        if kind not in ("auto", "exact", "ivf"):
            raise ValueError(f"kind must be 'auto', 'exact' or 'ivf', got {kind!r}")
        self.metric = metric
        self.kind = kind
        self.nprobe = nprobe
        self.nlist = nlist
        self.ivf_threshold = ivf_threshold
        self.seed = seed

    def _space(self, x: np.ndarray) -> np.ndarray:
        return normalise(x) if self.metric == "cosine" else _as_float32(x)

    def fit(self, emb: np.ndarray) -> KnnIndex:
        x = self._space(emb)
        n, d = x.shape
        self.kind_ = (
            "ivf" if self.kind == "ivf" or (self.kind == "auto" and n >= self.ivf_threshold) else "exact"
        )
        faiss_metric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        if self.kind_ == "exact":
            index = faiss.IndexFlat(d, faiss_metric)
        else:
            self.nlist_ = self.nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
            quantiser = faiss.IndexFlat(d, faiss_metric)
            index = faiss.IndexIVFFlat(quantiser, d, self.nlist_, faiss_metric)
            index.cp.seed = self.seed
            sample = (
                x
                if n <= self.nlist_ * 64
                else x[np.random.default_rng(self.seed).choice(n, self.nlist_ * 64, replace=False)]
            )
            index.train(sample)
            index.nprobe = min(self.nprobe, self.nlist_)
        index.add(x)
        self.index_ = index
        self.n_, self.dim_ = n, d
        return self

    def _to_distance(self, scores: np.ndarray) -> np.ndarray:
        if self.metric == "cosine":
            return np.clip(1.0 - scores, 0.0, 2.0).astype(np.float32)
        return np.sqrt(np.maximum(scores, 0.0)).astype(np.float32)

    def search(self, q: np.ndarray, k: int = 10, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(distances (N, k'), ids (N, k')) nearest first, with k' = min(k, size of the index)."""
        x = self._space(q)
        k = max(1, min(k, self.n_))
        if self.kind_ == "ivf":
            self.index_.nprobe = min(nprobe or self.nprobe, self.nlist_)
        scores, ids = self.index_.search(x, k)
        return self._to_distance(scores), ids.astype(np.int64)

    def search_subset(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Search only among the ids in `allowed` (e.g. the query's cluster), brute force."""
        allowed = np.asarray(allowed, dtype=np.int64)
        if len(allowed) == 0:
            return np.zeros((len(_as_float32(q)), 0), np.float32), np.zeros(
                (len(_as_float32(q)), 0), np.int64
            )
        k = max(1, min(k, len(allowed)))
        sel = faiss.IDSelectorBatch(allowed)
        params = (
            faiss.SearchParametersIVF(sel=sel, nprobe=self.nlist_)
            if self.kind_ == "ivf"
            else faiss.SearchParameters(sel=sel)
        )
        scores, ids = self.index_.search(self._space(q), k, params=params)
        return self._to_distance(scores), ids.astype(np.int64)

    @property
    def meta(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "kind": self.kind_,
            "n": self.n_,
            "dim": self.dim_,
            "nprobe": self.nprobe,
            "nlist": getattr(self, "nlist_", None),
        }

    def save(
        self,
        directory: str | os.PathLike[str],
        model_fingerprint: str = "",
        extra_files: dict[str, Any] | None = None,
    ) -> None:
        """Write the index (and `extra_files`: name → callable(path)) to `directory` atomically."""
        target = Path(directory)
        tmp = staging_dir(target)
        try:
            faiss.write_index(self.index_, str(tmp / "knn.faiss"))
            for name, writer in (extra_files or {}).items():
                writer(tmp / name)
            (tmp / META_FILE).write_text(
                json.dumps({**self.meta, "model_fingerprint": model_fingerprint}, indent=2)
            )
            replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: str | os.PathLike[str], expect_fingerprint: str | None = None) -> KnnIndex:
        d = Path(directory)
        if not (d / META_FILE).is_file():
            raise RunNotFound(f"no index at {d} — run `imgsim index DATA --model RUN` first")
        meta = json.loads((d / META_FILE).read_text())
        if expect_fingerprint is not None and meta.get("model_fingerprint") != expect_fingerprint:
            raise ModelMismatch(
                f"the index in {d} was built with another model ({meta.get('model_fingerprint')}, "
                f"now {expect_fingerprint}) — re-run `imgsim index DATA --model RUN`"
            )
        obj = cls(metric=meta["metric"], kind=meta["kind"], nprobe=meta["nprobe"], nlist=meta.get("nlist"))
        obj.index_ = faiss.read_index(str(d / "knn.faiss"))
        obj.kind_, obj.n_, obj.dim_ = meta["kind"], meta["n"], meta["dim"]
        if meta.get("nlist"):
            obj.nlist_ = meta["nlist"]
        obj.model_fingerprint_ = meta.get("model_fingerprint", "")
        return obj
