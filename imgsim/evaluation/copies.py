"""Label-free evaluation with edited copies, and the duplicate threshold calibrated from them.

No labels needed: a *copy* is an indexed image after an edit of `imgsim.evaluation.edits` (crop, rescale,
colour, mirror, greyscale, JPEG, `mix`, and the held-out edits), made in memory from the file's
bytes and preprocessed like any query (`imgsim.data.decode.prepare_image`). Each copy queries the index;
its one relevant result is its original (or a byte-identical file of it: same `content_hash`).

Metrics at cut-off k (default 10), each the mean over copies:
- `precision_at_1`: the first result is the original;
- `recall_at_{k}`: the original is in the top k;
- `map_at_{k}`: 1 / rank of the original, 0 beyond k (average precision with one relevant item).
The headline figures and `per_edit` cover the trained edits and `mix`; held-out edits (never
trained with) are reported apart under `held_out`, to measure generalisation.

Distances: each copy's distance to its original (`copy`) and to its nearest result that is not a
copy (`nearest_non_copy`), as percentiles.

Threshold (what `imgsim duplicates` calls a duplicate): over the copies of the trained edits and
`mix`, a true match is a copy's original within t of it, a false match a non-copy result in its top
k within t of it; precision(t) = true(t) / (true(t) + false(t)), and the suggested threshold is the
largest copy distance whose precision reaches the target (default 0.99). A collection often holds
duplicates already (that is why `imgsim duplicates` is run), and a copy then also finds the
original's own duplicates, which would count as false and drag the threshold far below the
copies' distances. So a result within t of the *original* too is set aside (neither true nor
false: at t the collection pairs it with the original anyway, copy or not), as long as the copy
has at most `GROUP_CAP` such results: a duplicate group is small, and an original with more
look-alikes within t sits in a crowd of similar images, where every one of them counts as false.
The report says how many results were set aside.

Determinism: originals are drawn with `numpy.random.default_rng(seed)`; each copy's edit has its own
generator seeded by (seed, image id, edit name), and copies are embedded in fixed chunks of
originals, so the same seed gives the same report whether chunks run in-process or as Ray tasks
(`pipelines.evaluate`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imgsim.config import DEFAULTS
from imgsim.data.decode import DecodeError, open_image, prepare_image
from imgsim.data.sources import read_bytes
from imgsim.evaluation.edits import EDITS, HELD_OUT_EDITS, TRAINED_EDITS, apply_edit, edits_table
from imgsim.index.knn import KnnIndex, pair_distances
from imgsim.models.encoders import Encoder

#: Originals per chunk: the unit of work of one task, and the batch the encoder sees.
CHUNK = 8
#: Distance percentiles reported.
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
DEFAULT_EDITS: tuple[str, ...] = TRAINED_EDITS + HELD_OUT_EDITS

#: One chunk of work: (image id, path) of each original.
Chunk = list[tuple[int, str]]


@dataclass
class CopyEmbeddings:
    """Embedded copies: row i is a copy of indexed image `original[i]` under edit `edits[edit[i]]`."""

    edits: tuple[str, ...]
    original: np.ndarray  # (M,) int64
    edit: np.ndarray  # (M,) int64, index into `edits`
    emb: np.ndarray  # (M, D) float32
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"path", "edit", "reason"}

    @classmethod
    def concat(cls, edits: tuple[str, ...], parts: Iterable[CopyEmbeddings]) -> CopyEmbeddings:
        """Chunks in any order → one set sorted by (original, edit): the order never depends on
        which chunk finished first."""
        parts = list(parts)
        if not parts or not any(len(p.original) for p in parts):
            return cls(edits, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0), np.float32),
                       [s for p in parts for s in p.skipped])  # fmt: skip
        original = np.concatenate([p.original for p in parts])
        edit = np.concatenate([p.edit for p in parts])
        emb = np.concatenate([p.emb for p in parts if len(p.original)])
        order = np.lexsort((edit, original))
        skipped = sorted((s for p in parts for s in p.skipped), key=lambda s: (s["path"], s["edit"] or ""))
        return cls(edits, original[order], edit[order], emb[order], skipped)


def sample_originals(n_indexed: int, copies: int, seed: int) -> np.ndarray:
    """`copies` distinct image ids out of `n_indexed`, drawn with `seed`, sorted."""
    n = min(max(0, copies), n_indexed)
    return np.sort(np.random.default_rng(seed).choice(n_indexed, size=n, replace=False)).astype(np.int64)


def edit_generator(seed: int, image_id: int, edit: str) -> np.random.Generator:
    """The generator of one copy: independent of how many copies there are and in which order."""
    return np.random.default_rng([seed, image_id, zlib.crc32(edit.encode())])


def chunks_of(ids: np.ndarray, paths: Sequence[str], size: int = CHUNK) -> list[Chunk]:
    """The originals in fixed chunks of `size` (the same chunks for the same ids)."""
    items = [(int(i), str(paths[int(i)])) for i in ids]
    return [items[s : s + size] for s in range(0, len(items), size)]


def make_copies(
    data: bytes, image_id: int, edits: Sequence[str], seed: int, image_size: int, channels: int
) -> tuple[list[int], list[np.ndarray], list[tuple[str, str]]]:
    """The copies of one original's bytes: (edit numbers, uint8 (C, S, S) arrays, [(edit, reason)]
    of copies that failed). Raises `DecodeError` when the original itself is not usable."""
    original = open_image(data)
    made, arrays, failed = [], [], []
    for number, name in enumerate(edits):
        try:
            copy = apply_edit(original, name, edit_generator(seed, image_id, name))
            arrays.append(prepare_image(copy, image_size, channels))
            made.append(number)
        except Exception as e:  # an edit a degenerate image cannot take (e.g. 1-pixel crops)
            failed.append((name, f"{type(e).__name__}: {e}"))
    return made, arrays, failed


def embed_copies_chunk(model: Encoder, chunk: Chunk, edits: tuple[str, ...], seed: int) -> CopyEmbeddings:
    """Read, edit, preprocess and embed the copies of one chunk of originals (one encoder batch)."""
    cfg = model.config
    originals, numbers, arrays, skipped = [], [], [], []
    for image_id, path in chunk:
        try:
            made, images, failed = make_copies(
                read_bytes(path), image_id, edits, seed, cfg.image_size, cfg.channels
            )
        except (OSError, DecodeError) as e:
            skipped.append({"path": path, "edit": None, "reason": getattr(e, "reason", None) or str(e)})
            continue
        originals += [image_id] * len(made)
        numbers += made
        arrays += images
        skipped += [{"path": path, "edit": name, "reason": reason} for name, reason in failed]
    emb = model.embed(np.stack(arrays)) if arrays else np.zeros((0, 0), np.float32)
    return CopyEmbeddings(
        edits, np.asarray(originals, np.int64), np.asarray(numbers, np.int64), emb.astype(np.float32), skipped
    )


#: Runs `embed_copies_chunk` over chunks and yields each result as it completes (in any order).
ChunkRunner = Callable[[list[Chunk], tuple[str, ...], int], Iterator[CopyEmbeddings]]


def in_process(model: Encoder) -> ChunkRunner:
    """A `ChunkRunner` that embeds each chunk here, one after the other."""

    def run(chunks: list[Chunk], edits: tuple[str, ...], seed: int) -> Iterator[CopyEmbeddings]:
        for chunk in chunks:
            yield embed_copies_chunk(model, chunk, edits, seed)

    return run


# -- scoring -------------------------------------------------------------------------------------------
@dataclass
class CopyScores:
    """Per copy: the rank of its original (0 = not in the top k), its distance to the original, the
    distances of the non-copy results in its top k (inf where a slot held a copy or nothing), and
    those results' distances to the original."""

    edits: tuple[str, ...]
    edit: np.ndarray  # (M,) index into edits
    rank: np.ndarray  # (M,) int64
    copy_distance: np.ndarray  # (M,) float32
    negatives: np.ndarray  # (M, k) float32: copy → non-copy result
    negatives_to_original: np.ndarray  # (M, k) float32: original → the same result
    k: int

    def subset(self, mask: np.ndarray) -> CopyScores:
        return CopyScores(
            self.edits, self.edit[mask], self.rank[mask], self.copy_distance[mask], self.negatives[mask],
            self.negatives_to_original[mask], self.k,
        )  # fmt: skip

    def of_edits(self, names: Iterable[str]) -> CopyScores:
        wanted = [i for i, e in enumerate(self.edits) if e in set(names)]
        return self.subset(np.isin(self.edit, wanted))

    def __len__(self) -> int:
        return len(self.rank)

    def metrics(self) -> dict[str, Any]:
        """precision_at_1, recall_at_k, map_at_k and the median copy distance over these copies."""
        k, n = self.k, len(self.rank)
        if n == 0:
            return {"queries": 0, "precision_at_1": None, f"recall_at_{k}": None, f"map_at_{k}": None}
        found = self.rank > 0
        return {
            "queries": n,
            "precision_at_1": _round(np.mean(self.rank == 1)),
            f"recall_at_{k}": _round(np.mean(found)),
            f"map_at_{k}": _round(np.mean(np.where(found, 1.0 / np.maximum(self.rank, 1), 0.0))),
            "copy_distance_median": _round(np.median(self.copy_distance)),
        }

    def per_edit(self) -> dict[str, dict[str, Any]]:
        present = set(self.edit.tolist())
        return {
            name: self.subset(self.edit == i).metrics() for i, name in enumerate(self.edits) if i in present
        }

    def nearest_non_copy(self) -> np.ndarray:
        """Each copy's distance to its nearest non-copy result (inf if its top k held none)."""
        return self.negatives.min(axis=1) if self.negatives.size else np.full(len(self.rank), np.inf)


def score_copies(
    copies: CopyEmbeddings,
    index: KnnIndex,
    db_emb: np.ndarray,
    content_hashes: Sequence[str | None] | None = None,
    k: int = DEFAULTS.search.k,
) -> CopyScores:
    """Query `index` with every copy and score it against its original (see the module docstring)."""
    m = len(copies.original)
    if m == 0:
        empty = np.zeros((0, k), np.float32)
        return CopyScores(
            copies.edits, copies.edit, np.zeros(0, np.int64), np.zeros(0, np.float32), empty, empty, k
        )
    dist, ids = index.search(copies.emb, k)
    codes = _hash_codes(content_hashes, len(db_emb))
    relevant = (ids == copies.original[:, None]) | (
        codes[np.maximum(ids, 0)] == codes[copies.original][:, None]
    )
    relevant &= ids >= 0
    first = np.where(relevant.any(axis=1), relevant.argmax(axis=1) + 1, 0)
    negative = ~relevant & (ids >= 0)
    negatives = np.where(negative, dist, np.inf).astype(np.float32)
    originals = np.repeat(copies.original, ids.shape[1])
    to_original = pair_distances(db_emb[originals], db_emb[np.maximum(ids, 0).reshape(-1)], index.metric)
    to_original = np.where(negative, to_original.reshape(ids.shape), np.inf).astype(np.float32)
    if negatives.shape[1] < k:  # an index smaller than k
        pad = np.full((m, k - negatives.shape[1]), np.inf, np.float32)
        negatives = np.concatenate([negatives, pad], axis=1)
        to_original = np.concatenate([to_original, pad], axis=1)
    copy_distance = pair_distances(copies.emb, db_emb[copies.original], index.metric)
    return CopyScores(
        copies.edits, copies.edit, first.astype(np.int64), copy_distance, negatives, to_original, k
    )


def _hash_codes(hashes: Sequence[str | None] | None, n: int) -> np.ndarray:
    """An integer per row, equal for rows with equal content hashes; unique for rows without one."""
    codes = -1 - np.arange(n, dtype=np.int64)
    if hashes is None:
        return codes
    seen: dict[str, int] = {}
    for i, h in enumerate(hashes):
        if isinstance(h, str) and h:
            codes[i] = seen.setdefault(h, len(seen))
    return codes


#: Distances this close count as equal (float rounding of identical embeddings).
TOLERANCE = 1e-6
#: Most results of one copy that may be set aside as its original's own duplicates (module docstring).
GROUP_CAP = 5
#: Candidate thresholds tried at most (evenly spread over the sorted copy distances).
CANDIDATES = 1024


def calibrate_threshold(scores: CopyScores, precision: float) -> dict[str, Any]:
    """The largest copy distance at which matches are at least `precision` true (module docstring).

    Returns {"threshold", "precision_target", "precision", "recall", "queries", "false_matches",
    "set_aside", "met", "method"}; with no such distance ("met": false) the threshold is 0 (exact
    copies only).
    """
    if not 0 < precision <= 1:
        raise ValueError(f"precision must be in (0, 1], got {precision}")
    pos = np.sort(scores.copy_distance.astype(np.float64))
    result: dict[str, Any] = {
        "precision_target": precision,
        "queries": len(pos),
        "method": (
            "largest distance t from a copy (trained edits and mix) to its original with "
            "true(t) / (true(t) + false(t)) >= precision_target: true(t) counts copies within t of their "
            f"original, false(t) non-copy results in the copies' top {scores.k} within t of the copy, "
            "except results within t of the original too (the collection's own duplicates of it) when "
            f"a copy has at most {GROUP_CAP} of them"
        ),
    }
    candidates = np.unique(pos)
    if len(candidates) > CANDIDATES:
        candidates = candidates[
            np.unique(np.linspace(0, len(candidates) - 1, CANDIDATES).round().astype(int))
        ]
    finite = np.isfinite(scores.negatives)
    to_copy = np.where(finite, scores.negatives, np.inf)
    to_original = np.where(finite, scores.negatives_to_original, np.inf)
    tp = np.searchsorted(pos, candidates, side="right")
    fp = np.zeros(len(candidates), np.int64)
    aside = np.zeros(len(candidates), np.int64)
    for start in range(0, len(candidates), 16):  # (16, M, k) booleans at a time
        t = candidates[start : start + 16, None, None]
        near_original = to_original <= t + TOLERANCE
        small_group = near_original.sum(axis=2, keepdims=True) <= GROUP_CAP
        set_aside = near_original & small_group
        matched = to_copy <= t
        fp[start : start + 16] = (matched & ~set_aside).sum(axis=(1, 2))
        aside[start : start + 16] = (matched & set_aside).sum(axis=(1, 2))
    ok = np.flatnonzero(tp / np.maximum(tp + fp, 1) >= precision) if len(pos) else np.zeros(0, int)
    if len(ok) == 0:
        return {**result, "threshold": 0.0, "precision": None, "recall": 0.0 if len(pos) else None,
                "false_matches": None, "set_aside": None, "met": False}  # fmt: skip
    best = int(ok[-1])
    return {
        **result,
        "threshold": _round(candidates[best]),
        "precision": _round(tp[best] / (tp[best] + fp[best])),
        "recall": _round(tp[best] / len(pos)),
        "false_matches": int(fp[best]),
        "set_aside": int(aside[best]),
        "met": True,
    }


def percentiles(values: np.ndarray) -> dict[str, float | None]:
    """{"p1": ..., "p50": ..., "p99": ...} of the finite values (None when there are none)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return {f"p{p}": (_round(np.percentile(v, p)) if len(v) else None) for p in PERCENTILES}


def _round(x: float) -> float:
    return round(float(x), 6)


# -- the whole evaluation ----------------------------------------------------------------------------
def copy_scores(
    model: Encoder,
    index: KnnIndex,
    db_emb: np.ndarray,
    paths: Sequence[str],
    content_hashes: Sequence[str | None] | None,
    *,
    copies: int,
    seed: int = 0,
    k: int = DEFAULTS.search.k,
    edits: Sequence[str] = DEFAULT_EDITS,
    runner: ChunkRunner | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> tuple[CopyScores, CopyEmbeddings, np.ndarray]:
    """(scores, embedded copies, originals) for `copies` randomly drawn indexed images.

    `runner` runs the chunks (default: `in_process(model)`; `pipelines.evaluate` passes Ray tasks);
    `on_chunk(n)` is called with each finished chunk's number of originals (progress).
    """
    edits = tuple(edits)
    for name in edits:
        if name not in EDITS:
            raise ValueError(f"unknown edit {name!r}; choose from {', '.join(EDITS)}")
    ids = sample_originals(len(paths), copies, seed)
    chunks = chunks_of(ids, paths)
    parts = []
    for part in (runner or in_process(model))(chunks, edits, seed):
        parts.append(part)
        if on_chunk:
            on_chunk(len({int(o) for o in part.original}) + sum(1 for s in part.skipped if s["edit"] is None))
    embedded = CopyEmbeddings.concat(edits, parts)
    return score_copies(embedded, index, db_emb, content_hashes, k), embedded, ids


def copy_report(
    scores: CopyScores,
    embedded: CopyEmbeddings,
    originals: np.ndarray,
    *,
    seed: int,
    precision: float,
    database: int,
    metric: str,
) -> dict[str, Any]:
    """The JSON report of `imgsim eval --copies` (module docstring)."""
    trained = scores.of_edits(TRAINED_EDITS)
    held_out = scores.of_edits(HELD_OUT_EDITS)
    threshold = calibrate_threshold(trained, precision)
    used = tuple(e for e in scores.edits)
    report: dict[str, Any] = {
        "mode": "copies",
        "k": scores.k,
        "copies": int(len(originals)),
        "seed": seed,
        "database": database,
        "metric": metric,
        **trained.metrics(),
        "per_edit": trained.per_edit(),
        "held_out": {**held_out.metrics(), "per_edit": held_out.per_edit()},
        "distances": {
            "copy": percentiles(trained.copy_distance),
            "nearest_non_copy": percentiles(trained.nearest_non_copy()),
            "held_out_copy": percentiles(held_out.copy_distance),
        },
        "suggested_threshold": threshold["threshold"],
        "threshold": threshold,
        "edits": edits_table(used),
        "skipped": embedded.skipped,
    }
    return report


def evaluate_copies(
    model: Encoder,
    index: KnnIndex,
    db_emb: np.ndarray,
    paths: Sequence[str],
    content_hashes: Sequence[str | None] | None,
    *,
    copies: int,
    seed: int = 0,
    k: int = DEFAULTS.search.k,
    precision: float = DEFAULTS.duplicates.precision,
    edits: Sequence[str] = DEFAULT_EDITS,
    runner: ChunkRunner | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Label-free quality of an index: the report of `imgsim eval --copies` (module docstring)."""
    scores, embedded, originals = copy_scores(
        model, index, db_emb, paths, content_hashes, copies=copies, seed=seed, k=k, edits=edits,
        runner=runner, on_chunk=on_chunk,
    )  # fmt: skip
    return copy_report(
        scores, embedded, originals, seed=seed, precision=precision, database=len(paths), metric=index.metric
    )
