"""Search a built run: embed a query (path, s3:// URI, URL, bytes, PIL image or array) and return
the nearest indexed images with distances, labels and clusters.

    from imgsim import Searcher
    s = Searcher.load("runs/fm")
    s.search("photo.jpg", k=10)  # {"query", "cluster", "results": [{"rank", "id", "path", ...}]}

Every query goes through `imgsim.data.decode` exactly as training and indexing did.
"""

from __future__ import annotations

import mimetypes
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from imgsim.config import DEFAULTS, MAX_IMAGE_PIXELS
from imgsim.data.decode import DecodeError, decode_image, open_image, prepare_image
from imgsim.data.fetch import fetch_url
from imgsim.data.sources import read_bytes
from imgsim.errors import BadQuery, RunNotFound
from imgsim.index.knn import KMeansClusterer, KnnIndex
from imgsim.io.runs import RunPaths
from imgsim.models import autoencoder as model_lib
from imgsim.models.encoders import Encoder

Query = str | os.PathLike | bytes | Image.Image | np.ndarray


class TextColumn(Sequence):
    """A string column kept as one Arrow array (no Python object per row); items are str or None.

    A Serve replica holds the paths and labels of every indexed image: at 1M images, Python lists
    of them took several hundred MB per replica (docs/scaling.md).
    """

    def __init__(self, values: pa.Array | pa.ChunkedArray | Sequence[str | None]) -> None:
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        self._values = values if isinstance(values, pa.Array) else pa.array(list(values), pa.string())

    def __len__(self) -> int:
        return len(self._values)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return self._values[i].to_pylist()
        return self._values[i].as_py()


def is_url(x: object) -> bool:
    return isinstance(x, str) and x.split(":", 1)[0].lower() in ("http", "https")


class Searcher:
    """A loaded run: the encoder (trained or imported, see `imgsim.models.encoders.Encoder`), the KMeans
    centroids, the KNN index and the indexed records."""

    def __init__(
        self,
        model: Encoder,
        index: KnnIndex,
        clusterer: KMeansClusterer,
        paths: Sequence[str],
        labels: Sequence[str | None],
        clusters: np.ndarray,
        allow_private_urls: bool = DEFAULTS.search.allow_private_urls,
        max_query_bytes: int = DEFAULTS.serve.max_body_bytes,
        run: str | os.PathLike[str] | None = None,
    ) -> None:
        self.model = model
        self.index = index
        self.clusterer = clusterer
        self.paths = paths if isinstance(paths, TextColumn) else TextColumn(paths)
        self.labels = labels if isinstance(labels, TextColumn) else TextColumn(labels)
        self.clusters = clusters
        self.allow_private_urls = allow_private_urls
        self.max_query_bytes = max_query_bytes
        self.run = Path(run) if run is not None else None

    @classmethod
    def load(
        cls,
        run: str | os.PathLike[str],
        device: str = "cpu",
        allow_private_urls: bool = DEFAULTS.search.allow_private_urls,
    ) -> Searcher:
        """Load RUN's model and index; refuses an index built with another model."""
        paths = RunPaths(run)
        if not paths.root.is_dir():
            raise RunNotFound(
                f"no run directory at {paths.root} — train one with `imgsim train DATA --out {run}`"
            )
        model = model_lib.load(paths.root, device=device)
        if not paths.embeddings.is_file():
            raise RunNotFound(f"no index in {paths.root} — run `imgsim index DATA --model {run}` first")
        index = KnnIndex.load(paths.index_dir, expect_fingerprint=model.fingerprint)  # type: ignore[attr-defined]
        clusterer = KMeansClusterer.load(paths.kmeans_dir)
        # labels repeat: read as a dictionary column (one copy of each distinct label)
        table = pq.read_table(
            paths.embeddings, columns=["path", "label", "cluster"], read_dictionary=["label"]
        )
        return cls(
            model,
            index,
            clusterer,
            TextColumn(table["path"]),
            TextColumn(table["label"]),
            table["cluster"].to_numpy(),
            allow_private_urls=allow_private_urls,
            run=paths.root,
        )

    def __len__(self) -> int:
        return len(self.paths)

    # -- queries → model input --------------------------------------------------------------------
    def query_bytes(self, x: str | os.PathLike[str]) -> bytes:
        """The bytes of a query given as a path, s3:// URI or http(s) URL."""
        s = str(x)
        scheme = s.split("://", 1)[0].lower() if "://" in s else ""
        if scheme and scheme not in ("http", "https", "s3"):
            raise BadQuery("only http and https URLs, s3:// URIs and local paths are supported", s)
        if is_url(s):
            return fetch_url(s, max_bytes=self.max_query_bytes, allow_private=self.allow_private_urls)
        try:
            return read_bytes(s)
        except FileNotFoundError:
            raise BadQuery("no such file", s) from None
        except OSError as e:
            raise BadQuery(f"cannot read ({e})", s) from None

    def to_image(self, x: Query, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
        """Any query form → uint8 (C, S, S), exactly as indexed images were preprocessed; encoded
        images of more than `max_pixels` are refused."""
        cfg = self.model.config
        try:
            if isinstance(x, Image.Image):
                return prepare_image(x, cfg.image_size, cfg.channels)
            if isinstance(x, np.ndarray):
                arr = x if x.dtype == np.uint8 else np.clip(x, 0, 255).astype(np.uint8)
                if arr.shape == (cfg.channels, cfg.image_size, cfg.image_size):
                    return arr
                if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[2] not in (1, 3):
                    arr = arr.transpose(1, 2, 0)  # CHW → HWC
                return prepare_image(Image.fromarray(arr.squeeze()), cfg.image_size, cfg.channels)
            data = bytes(x) if isinstance(x, bytes | bytearray | memoryview) else self.query_bytes(x)
            return decode_image(data, cfg.image_size, cfg.channels, max_pixels=max_pixels)
        except DecodeError as e:
            raise BadQuery(e.reason, describe_query(x)) from None

    # -- search ------------------------------------------------------------------------------------
    def embed(self, images: np.ndarray) -> np.ndarray:
        return self.model.embed(images)

    def search_embeddings(
        self, emb: np.ndarray, k: int = DEFAULTS.search.k, within_cluster: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(predicted clusters, distances, ids) for query embeddings; `within_cluster` searches only
        each query's predicted cluster (the original design)."""
        clusters = self.clusterer.predict(emb)
        if within_cluster:
            dist, ids = self.index.search_within(emb, k, clusters, self.clusters)
        else:
            dist, ids = self.index.search(emb, k)
        return clusters, dist, ids

    def search_preprocessed(
        self, images: np.ndarray, k: int = DEFAULTS.search.k, within_cluster: bool = False
    ) -> list[dict[str, Any]]:
        """Search a batch of preprocessed uint8 (N, C, S, S) images: one `{cluster, results}` each."""
        clusters, dist, ids = self.search_embeddings(self.embed(images), k, within_cluster)
        return [self._answer(int(c), d, i) for c, d, i in zip(clusters, dist, ids, strict=True)]

    def search(self, x: Query, k: int = DEFAULTS.search.k, within_cluster: bool = False) -> dict[str, Any]:
        """The top `k` indexed images for one query: `{"query", "cluster", "results": [...]}`."""
        answer = self.search_preprocessed(self.to_image(x)[None], k, within_cluster)[0]
        return {"query": describe_query(x), **answer}

    def _answer(self, cluster: int, distances: np.ndarray, ids: np.ndarray) -> dict[str, Any]:
        results = [
            {**self.record(int(i)), "rank": rank, "distance": round(float(d), 6)}
            for rank, (d, i) in enumerate(zip(distances, ids, strict=True), start=1)
            if i >= 0
        ]
        return {"cluster": cluster, "results": results}

    def record(self, id: int) -> dict[str, Any]:
        """The indexed image with this id (its row in embeddings.parquet)."""
        return {"id": id, "path": self.paths[id], "label": self.labels[id], "cluster": int(self.clusters[id])}

    # -- indexed images ----------------------------------------------------------------------------
    def image_bytes(self, id: int) -> tuple[bytes, str]:
        """(bytes, content type) of indexed image `id`; KeyError if there is no such id."""
        if not 0 <= id < len(self.paths):
            raise KeyError(id)
        path = self.paths[id]
        content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return read_bytes(path), content_type

    def display_image(self, id: int) -> Image.Image:
        """Indexed image `id` as a PIL image (for plots)."""
        return _display(open_image(self.image_bytes(id)[0]))

    def load_display_image(self, x: Query) -> Image.Image:
        """A query as a PIL image (for plots)."""
        if isinstance(x, Image.Image):
            return _display(x)
        if isinstance(x, np.ndarray):
            return _display(Image.fromarray(self.to_image(x).transpose(1, 2, 0).squeeze()))
        data = bytes(x) if isinstance(x, bytes | bytearray | memoryview) else self.query_bytes(x)
        try:
            return _display(open_image(data))
        except DecodeError as e:
            raise BadQuery(e.reason, describe_query(x)) from None


def _display(img: Image.Image) -> Image.Image:
    from imgsim.data.decode import to_mode

    return to_mode(img, 3)


def describe_query(x: object) -> str:
    """A query as answers name it: its path or URL, else its kind and size."""
    if isinstance(x, str | Path):
        return str(x)
    if isinstance(x, bytes | bytearray | memoryview):
        return f"<{len(x)} bytes>"
    if isinstance(x, Image.Image):
        return f"<PIL image {x.size[0]}x{x.size[1]}>"
    if isinstance(x, np.ndarray):
        return f"<array {x.shape}>"
    return repr(x)


__all__ = ["Query", "Searcher", "TextColumn", "describe_query"]
