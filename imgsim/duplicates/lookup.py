"""One image against a run's collection: is it a duplicate of indexed images?

    from imgsim.duplicates.lookup import DuplicateLookup
    lookup = DuplicateLookup.load("runs/photos")
    lookup.duplicates_of("photo.jpg")  # {"query", "duplicate", "threshold", "threshold_source", "matches"}

- **Threshold**: the run's calibration (`imgsim.duplicates.groups.stored_or_calibrated`), read or made
  once per lookup, under a lock, so the threads of a Serve replica share one; `threshold=` overrides.
- **Matches**: every indexed image within the threshold, nearest first, byte-identical files (same
  content hash) first of all. With the query's bytes, candidates out to the calibration's
  `candidate_radius` are verified geometrically, as `imgsim duplicates` verifies pairs.

A lookup wraps a loaded `imgsim.index.search.Searcher` (the model, the index and the indexed paths):
the searcher knows nothing of duplicates.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from imgsim.config import DEFAULTS
from imgsim.data.rows import content_hash as hash_of_bytes
from imgsim.duplicates import verify as verification
from imgsim.duplicates.groups import TOLERANCE, stored_or_calibrated
from imgsim.errors import RunNotFound
from imgsim.index.search import Query, Searcher, describe_query
from imgsim.io.runs import RunPaths


class DuplicateLookup:
    """Duplicates of single images among a run's indexed ones, for `query --duplicates` and
    `POST /duplicates`; `searcher` is the loaded run."""

    def __init__(self, searcher: Searcher) -> None:
        self.searcher = searcher
        self._hash_lookup: tuple[np.ndarray, np.ndarray] | None = None
        self._threshold: tuple[float, str] | None = None
        self._candidate_radius: float | None = None  # how far duplicate candidates reach (verification)
        self._threshold_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        run: str | os.PathLike[str],
        device: str = "cpu",
        allow_private_urls: bool = DEFAULTS.search.allow_private_urls,
    ) -> DuplicateLookup:
        """A lookup over RUN (`Searcher.load`: refuses an index built with another model)."""
        return cls(Searcher.load(run, device=device, allow_private_urls=allow_private_urls))

    def duplicates_of(
        self, x: Query, threshold: float | None = None, max_matches: int = DEFAULTS.duplicates.max_matches
    ) -> dict[str, Any]:
        """Is `x` a duplicate of indexed images? `{"query", "duplicate", "threshold", "threshold_source",
        "matches": [{"id", "path", "distance", "exact"}]}`: every indexed image within the threshold
        (the run's calibrated one unless given), nearest first; `exact` when the bytes are identical
        (known for queries given as bytes, a path or a URL)."""
        data = None
        if isinstance(x, bytes | bytearray | memoryview):
            data = bytes(x)
        elif isinstance(x, str | os.PathLike):
            data = self.searcher.query_bytes(x)
        image = self.searcher.to_image(data if data is not None else x)
        answer = self.duplicates_of_preprocessed(
            image, hash_of_bytes(data) if data else None, threshold, max_matches, data=data
        )
        return {"query": describe_query(x), **answer}

    def duplicates_of_preprocessed(
        self,
        image: np.ndarray,
        content_hash: str | None = None,
        threshold: float | None = None,
        max_matches: int = DEFAULTS.duplicates.max_matches,
        *,
        data: bytes | None = None,
    ) -> dict[str, Any]:
        """`duplicates_of` for a preprocessed uint8 (C, S, S) image and its file's content hash. With the
        file's bytes (`data`), candidates are verified geometrically (`matches`); the threshold's
        calibration says how far candidates reach."""
        if threshold is not None:
            t, source, radius = float(threshold), "given", None
        else:
            t, source = self.threshold()
            radius = self._candidate_radius if DEFAULTS.duplicates.verify else None
        emb = self.searcher.embed(image[None])[0]
        matches = self.matches(emb, content_hash, t, max_matches, data=data, radius=radius)
        return {"duplicate": bool(matches), "threshold": t, "threshold_source": source, "matches": matches}

    def threshold(self) -> tuple[float, str]:
        """(threshold, source): the run's stored calibration, else one calibrated now (in-process, from
        edited copies; `imgsim duplicates` or `imgsim eval --copies` measure it beforehand)."""
        with self._threshold_lock:
            if self._threshold is None:
                run = self.searcher.run
                if run is None:
                    raise RunNotFound("this Searcher has no run directory to calibrate in: pass threshold=")
                t, source, calibration = stored_or_calibrated(run, self.searcher)
                self._threshold = (t, source)
                radius = calibration.get("candidate_radius")
                self._candidate_radius = None if radius is None else float(radius)
            return self._threshold

    def rows_with_hash(self, content_hash: str) -> list[int]:
        """Ids of the indexed images whose file bytes have this content hash (exact duplicates)."""
        if self._hash_lookup is None:
            hashes = np.zeros(0, "S32")
            run = self.searcher.run
            if run is not None and "content_hash" in pq.read_schema(RunPaths(run).embeddings).names:
                column = pq.read_table(RunPaths(run).embeddings, columns=["content_hash"])["content_hash"]
                hashes = np.array(column.fill_null("").to_pylist(), dtype="S32")
            order = np.argsort(hashes, kind="stable")
            self._hash_lookup = (hashes[order], order)
        sorted_hashes, order = self._hash_lookup
        key = np.array(content_hash, dtype="S32")
        lo, hi = np.searchsorted(sorted_hashes, key, "left"), np.searchsorted(sorted_hashes, key, "right")
        return sorted(int(i) for i in order[lo:hi])

    def matches(
        self,
        emb: np.ndarray,
        content_hash: str | None,
        threshold: float,
        max_matches: int = DEFAULTS.duplicates.max_matches,
        *,
        data: bytes | None = None,
        radius: float | None = None,
    ) -> list[dict[str, Any]]:
        """Indexed images within `threshold` of one query embedding, nearest first (byte-identical files
        first of all), as `{"id", "path", "distance", "exact"}`.

        With the query's bytes (`data`) and a candidate `radius` beyond the threshold, candidates are
        verified geometrically as `imgsim duplicates` does (`imgsim.duplicates.verify`): a verified one is
        a match out to `radius` (among the `verify_neighbours` nearest), a rejected one is not a match,
        and an unverifiable one (a small or flat image) is a match within `threshold`."""
        judged = data is not None and radius is not None and radius > threshold
        reach = max(threshold, radius) if judged else threshold
        wanted = max(max_matches, DEFAULTS.duplicates.verify_neighbours) if judged else max_matches
        _, dist, ids = self.searcher.index.range_search(emb[None], reach, max_results=wanted)
        exact_ids = set(self.rows_with_hash(content_hash)) if content_hash else set()
        found = {int(i): float(x) for i, x in zip(ids.tolist(), dist.tolist(), strict=True)}
        if judged:
            assert data is not None
            linked = self._verified(data, ids.tolist(), found, exact_ids, threshold)
            found = {i: x for i, x in found.items() if i in linked or i in exact_ids}
        for i in exact_ids:
            found.setdefault(i, 0.0)
        ranked = sorted(found.items(), key=lambda item: (item[0] not in exact_ids, item[1], item[0]))
        paths = self.searcher.paths
        return [
            {"id": i, "path": paths[i], "distance": round(d, 6), "exact": i in exact_ids}
            for i, d in ranked[:max_matches]
        ]

    def _verified(
        self, data: bytes, ids: list[int], found: dict[int, float], exact_ids: set[int], threshold: float
    ) -> set[int]:
        """The candidates (within the threshold, or among the `verify_neighbours` nearest) that the
        query's bytes link to: verified, or unverifiable and within the threshold."""
        from imgsim.data.sources import read_bytes

        ranked_ids = [i for i in ids if i not in exact_ids]
        candidates = [
            i for rank, i in enumerate(ranked_ids) if found[i] <= threshold + TOLERANCE
            or rank < DEFAULTS.duplicates.verify_neighbours
        ]  # fmt: skip
        paths = self.searcher.paths
        status = verification.verify_against(data, [paths[i] for i in candidates], read_bytes)
        distance = np.array([found[i] for i in candidates], np.float64)
        links = verification.links(status, distance, threshold, TOLERANCE)
        return {i for i, ok in zip(candidates, links, strict=True) if ok}


__all__ = ["DuplicateLookup"]
