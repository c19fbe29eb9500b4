"""Exact and near-duplicate groups over an indexed collection (one image against it:
`imgsim.duplicates.lookup`).

    from imgsim.duplicates.groups import find_duplicates
    report = find_duplicates("runs/photos")        # calibrated threshold, incremental
    for group in report.groups: group.keep, group.reason, [m.path for m in group.members]

- **Exact duplicates**: rows with the same `content_hash` (byte-identical files) are one node.
- **Near duplicates**: every node's neighbours within the threshold, by range search on the run's
  KNN index (`KnnIndex.range_search`, exact or IVF): memory and time follow the matches, never an
  N x N matrix. At most `max_neighbours` per node are kept (the nearest).
- **Geometric verification** (`imgsim.duplicates.verify`, on by default): for images of 64 px or more,
  candidates reach out to the calibration's `candidate_radius` (where 99 % of its `mix` copies lie
  from their originals), among each image's `verify_neighbours` nearest, and each candidate pair is
  checked with local features that must agree on one crop/scale/rotation/mirror. A verified pair is
  a duplicate at any such distance; a rejected one (both images textured, no common geometry) is not,
  even within the threshold; an unverifiable one (a small or flat image) is one within the threshold,
  as without verification. This is what separates an edited copy from the look-alike neighbours a
  collection of similar photos is full of (docs/results.md: pair precision 0.80 -> 0.97, recall 0.16 -> 0.87-0.91).
- **No chaining**: complete linkage. Pairs are taken nearest first, and two groups merge only if
  every pair across them is linked (verified, or within the threshold on the embeddings and not
  rejected), so A~B~C with A far from C never becomes one group.
- **Keep**: the member with the most pixels, then the largest file, then the oldest (mtime, ns), then
  the first path; `reason` names the rule that decided. Members' distances are to the kept image.
- **Threshold**: `threshold=` overrides; by default it is calibrated from edited copies
  (`imgsim.evaluation.copies`) for a target precision and stored in `RUN/duplicates/calibration.json`, reused
  while the model and the target stay the same (`recalibrate=True` forces a new one).
- **Incremental**: `RUN/duplicates/state/` keeps the pairs found and which nodes (content hashes)
  were searched; a rerun searches only new or changed images, keeping the pairs among the others,
  unless the model, the metric or the neighbour cap changed or the threshold grew past the one
  the pairs were found at.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgsim.config import DEFAULTS
from imgsim.data.rows import embedding_matrix
from imgsim.duplicates import verify as verification
from imgsim.index.knn import KnnIndex, metric_space, pair_distances
from imgsim.io.atomic import atomic_write_json, writing_dir
from imgsim.io.runs import RunPaths

if TYPE_CHECKING:
    from imgsim.evaluation.copies import ChunkRunner
    from imgsim.index.search import Searcher

#: Slack on "within the threshold" for float rounding (the same as the index's range search).
TOLERANCE = 1e-6
STATE_VERSION = 2  # 2: pairs carry their verification status
#: Bumped whenever `imgsim.evaluation.copies.calibrate_threshold` changes: a stored threshold of another version is redone.
CALIBRATION_VERSION = 3


# -- groups ------------------------------------------------------------------------------------------
@dataclass
class Member:
    """One image of a group: its row id, path, distance to the kept image, and whether a byte-identical
    file is in the group too."""

    id: int
    path: str
    distance: float
    exact: bool

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "distance": self.distance, "exact": self.exact, "id": self.id}


@dataclass
class Group:
    """A group of duplicates: `members[0]` is the one to keep."""

    group: int
    keep: str
    reason: str
    members: list[Member]

    @property
    def exact(self) -> bool:
        """All members are byte-identical."""
        return all(m.exact for m in self.members)

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "keep": self.keep,
            "reason": self.reason,
            "exact": self.exact,
            "members": [m.to_json() for m in self.members],
        }


# -- the pieces, on arrays -----------------------------------------------------------------------------
def node_keys(paths: Sequence[str], hashes: Sequence[str | None] | None) -> np.ndarray:
    """A key per row, equal for byte-identical files: the content hash, else the path."""
    if hashes is None:
        return np.array([f"path:{p}" for p in paths], dtype=object)
    return np.array([h if isinstance(h, str) and h else f"path:{p}" for p, h in zip(paths, hashes, strict=True)],
                    dtype=object)  # fmt: skip


def nodes_of(keys: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(node of each row, first row of each node): rows with equal keys share a node."""
    if keys is None:
        return np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64)
    _, first, node = np.unique(keys, return_index=True, return_inverse=True)
    # number the nodes by their first row, so that node order follows row order
    order = np.argsort(first, kind="stable")
    renumber = np.empty_like(order)
    renumber[order] = np.arange(len(order))
    return renumber[node.reshape(-1)].astype(np.int64), first[order].astype(np.int64)


def near_pairs(
    index: KnnIndex,
    emb: np.ndarray,
    search_nodes: np.ndarray,
    node_of_row: np.ndarray,
    first_row: np.ndarray,
    threshold: float,
    max_neighbours: int = DEFAULTS.duplicates.max_neighbours,
    nprobe: int | None = None,
    *,
    radius: float | None = None,
    nearest_beyond: int = DEFAULTS.duplicates.verify_neighbours,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, distance) node pairs with a < b within `threshold`, found by range search from each of
    `search_nodes` (its first row's embedding); a node's byte-identical rows are not its pairs.

    With a `radius` beyond `threshold` (candidates for verification), pairs between the two are
    kept too, but only among each node's `nearest_beyond` nearest results."""
    if len(search_nodes) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    queries = emb[first_row[search_nodes]]
    reach = threshold if radius is None else max(radius, threshold)
    lims, dist, ids = index.range_search(queries, reach, nprobe=nprobe, max_results=max_neighbours + 1)
    counts = np.diff(lims)
    a = np.repeat(search_nodes, counts)
    b = node_of_row[ids]
    other = a != b
    if reach > threshold:
        rank = np.arange(len(ids)) - np.repeat(lims[:-1], counts)  # 0 is the node itself, when found
        other &= (dist <= threshold + TOLERANCE) | (rank <= nearest_beyond)
    return unique_pairs(a[other], b[other], dist[other])


def pair_code(x: int, y: int) -> int:
    """One int for the unordered node pair {x, y}."""
    return (min(x, y) << 32) | max(x, y)


def pair_codes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`pair_code` of each pair (`a[i]`, `b[i]`)."""
    return (np.minimum(a, b).astype(np.int64) << 32) | np.maximum(a, b).astype(np.int64)


def unique_pairs(a: np.ndarray, b: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs as (min, max), each once (the smallest distance seen), sorted by distance then nodes."""
    lo, hi = np.minimum(a, b).astype(np.int64), np.maximum(a, b).astype(np.int64)
    code = pair_codes(lo, hi)
    order = np.lexsort((code, d))
    _, first = np.unique(code[order], return_index=True)
    chosen = order[first]
    chosen = chosen[np.lexsort((code[chosen], d[chosen]))]
    return lo[chosen], hi[chosen], d[chosen].astype(np.float32)


def complete_linkage(
    n_nodes: int,
    a: np.ndarray,
    b: np.ndarray,
    d: np.ndarray,
    vectors: np.ndarray,
    metric: str,
    threshold: float,
    *,
    verified: set[int] | None = None,
    rejected: set[int] | None = None,
) -> list[list[int]]:
    """Groups (lists of nodes, 2 or more) by complete linkage over the pairs (a, b, d), nearest first.

    Two groups merge only if every pair across them is within `threshold`: a lone pair by its own
    distance, larger groups by their members' `vectors` (in the index's metric space).

    With geometric verification (`verified` and `rejected`: sets of `pair_code`s), a pair counts as
    linked when it was verified, whatever its distance, or when it is within `threshold` and was not
    rejected; (a, b, d) are then the linked pairs.
    """
    parent = list(range(n_nodes))
    members: dict[int, list[int]] = {}
    limit = threshold + TOLERANCE
    judged = verified is not None
    verified, rejected = verified or set(), rejected or set()

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def distances(xs: list[int], ys: list[int]) -> np.ndarray:
        u, v = vectors[xs], vectors[ys]
        if metric == "cosine":
            return 1.0 - (u @ v.T)
        sq = (u * u).sum(1)[:, None] + (v * v).sum(1)[None, :] - 2.0 * (u @ v.T)
        return np.sqrt(np.maximum(sq, 0.0))

    def within(xs: list[int], ys: list[int]) -> bool:
        near = distances(xs, ys) <= limit
        if not judged:
            return bool(near.all())
        for i, x in enumerate(xs):
            for j, y in enumerate(ys):
                code = pair_code(x, y)
                if code not in verified and not (near[i, j] and code not in rejected):
                    return False
        return True

    order = np.argsort(d, kind="stable")
    for x, y, dist in zip(a[order].tolist(), b[order].tolist(), d[order].tolist(), strict=True):
        if dist > limit and not judged:
            break
        rx, ry = find(x), find(y)
        if rx == ry:
            continue
        gx, gy = members.get(rx, [rx]), members.get(ry, [ry])
        if (len(gx) > 1 or len(gy) > 1) and not within(gx, gy):
            continue
        if len(gx) < len(gy):
            rx, ry, gx, gy = ry, rx, gy, gx
        parent[ry] = rx
        members[rx] = gx + gy
        members.pop(ry, None)
    return [sorted(g) for g in members.values()]


def choose_keep(
    rows: Sequence[int],
    paths: Sequence[str],
    pixels: np.ndarray | None = None,
    sizes: np.ndarray | None = None,
    mtimes: np.ndarray | None = None,
) -> tuple[int, str]:
    """(row to keep, reason): most pixels, then the largest file, then the oldest, then the first path."""
    rows = [int(r) for r in rows]

    def value(column: np.ndarray | None, r: int) -> int:
        return int(column[r]) if column is not None and column[r] is not None else 0

    ranked = sorted(rows, key=lambda r: (-value(pixels, r), -value(sizes, r), value(mtimes, r), paths[r]))
    best, runner_up = ranked[0], ranked[1] if len(ranked) > 1 else ranked[0]
    if value(pixels, best) != value(pixels, runner_up):
        return best, f"most pixels ({value(pixels, best):,})"
    if value(sizes, best) != value(sizes, runner_up):
        return best, f"largest file ({value(sizes, best):,} bytes) among those with the most pixels"
    if value(mtimes, best) != value(mtimes, runner_up):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(value(mtimes, best) / 1e9))  # mtime: ns
        when += " UTC"
        return best, f"oldest ({when}) among those with the most pixels and the largest file"
    return best, "first path among files with the same pixels, size and age"


@dataclass
class Collection:
    """What grouping needs of an index: embeddings, paths, content hashes and the keep columns."""

    emb: np.ndarray
    paths: list[str]
    hashes: list[str | None] | None = None
    pixels: np.ndarray | None = None
    sizes: np.ndarray | None = None
    mtimes: np.ndarray | None = None
    shorter_sides: np.ndarray | None = None

    def verifiable(self, rows: np.ndarray) -> np.ndarray:
        """Which of `rows` are large enough for geometric verification (`imgsim.duplicates.verify.MIN_SIDE`);
        none when the index has no image sizes."""
        if self.shorter_sides is None:
            return np.zeros(len(rows), bool)
        return self.shorter_sides[rows] >= verification.MIN_SIDE

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def read(cls, run: str | os.PathLike[str]) -> Collection:
        """RUN/index/embeddings.parquet (columns missing from an older index are left out)."""
        path = RunPaths(run).embeddings
        names = set(pq.read_schema(path).names)
        wanted = [c for c in ("path", "content_hash", "width", "height", "size", "mtime") if c in names]
        table = pq.read_table(path, columns=["embedding", *wanted])

        def ints(name: str) -> np.ndarray | None:
            return table[name].fill_null(0).to_numpy().astype(np.int64) if name in names else None

        width, height = ints("width"), ints("height")
        return cls(
            emb=embedding_matrix(table),
            paths=table["path"].to_pylist(),
            hashes=table["content_hash"].to_pylist() if "content_hash" in names else None,
            pixels=width * height if width is not None and height is not None else None,
            shorter_sides=np.minimum(width, height) if width is not None and height is not None else None,
            sizes=ints("size"),
            mtimes=ints("mtime"),
        )


def build_groups(
    collection: Collection,
    node_groups: list[list[int]],
    node_of_row: np.ndarray,
    first_row: np.ndarray,
    metric: str,
) -> list[Group]:
    """Groups of rows from groups of nodes, plus every node with several rows (byte-identical files);
    each with its kept image, reason and members' distances. Largest groups first, then by path."""
    rows_of_node: dict[int, list[int]] = {}
    counts = np.bincount(node_of_row, minlength=len(first_row))
    for row in np.flatnonzero(counts[node_of_row] > 1).tolist():
        rows_of_node.setdefault(int(node_of_row[row]), []).append(row)
    grouped = {n for g in node_groups for n in g}
    row_groups = [[r for n in g for r in rows_of_node.get(n, [int(first_row[n])])] for g in node_groups]
    row_groups += [rows for n, rows in rows_of_node.items() if n not in grouped]
    groups = []
    for rows in row_groups:
        keep, reason = choose_keep(
            rows, collection.paths, collection.pixels, collection.sizes, collection.mtimes
        )
        others = [r for r in rows if r != keep]
        dist = (
            pair_distances(collection.emb[others], collection.emb[[keep] * len(others)], metric)
            if others
            else []
        )
        nodes = node_of_row[rows]
        twins = {int(n) for n, c in zip(*np.unique(nodes, return_counts=True), strict=True) if c > 1}
        same = [int(node_of_row[r]) in twins for r in rows]
        exact_of = dict(zip(rows, same, strict=True))
        members = [Member(keep, collection.paths[keep], 0.0, exact_of[keep])]
        members += sorted(
            (
                Member(r, collection.paths[r], 0.0 if node_of_row[r] == node_of_row[keep] else round(float(x), 6),
                       exact_of[r])
                for r, x in zip(others, dist, strict=True)
            ),
            key=lambda m: (m.distance, m.path),
        )  # fmt: skip
        groups.append(Group(0, collection.paths[keep], reason, members))
    groups.sort(key=lambda g: (-len(g.members), g.keep))
    for number, g in enumerate(groups, start=1):
        g.group = number
    return groups


def group_embeddings(
    emb: np.ndarray,
    threshold: float,
    *,
    metric: str = DEFAULTS.index.metric,
    index: KnnIndex | None = None,
    content_hashes: Sequence[str | None] | None = None,
    max_neighbours: int = DEFAULTS.duplicates.max_neighbours,
    nprobe: int | None = None,
) -> list[np.ndarray]:
    """Duplicate groups among the rows of `emb` (each an array of 2 or more row numbers), without a run:
    byte-identical rows (equal `content_hashes`) together, then complete linkage over range-search
    pairs within `threshold`. `index`: a `KnnIndex` fitted on `emb` (default: one is built)."""
    emb = np.ascontiguousarray(emb, np.float32)
    index = index or KnnIndex(metric=metric).fit(emb)
    keys = (
        node_keys([str(i) for i in range(len(emb))], content_hashes) if content_hashes is not None else None
    )
    node_of_row, first_row = nodes_of(keys, len(emb))
    a, b, d = near_pairs(index, emb, np.arange(len(first_row)), node_of_row, first_row, threshold, max_neighbours,
                         nprobe)  # fmt: skip
    vectors = metric_space(emb[first_row], index.metric)
    node_groups = complete_linkage(len(first_row), a, b, d, vectors, index.metric, threshold)
    rows: dict[int, list[int]] = {}
    for r, n in enumerate(node_of_row.tolist()):
        rows.setdefault(n, []).append(r)
    grouped = {n for g in node_groups for n in g}
    out = [np.array([r for n in g for r in rows[n]], np.int64) for g in node_groups]
    out += [np.array(rs, np.int64) for n, rs in rows.items() if len(rs) > 1 and n not in grouped]
    return out


#: Verifies pairs of rows (`a[i]`, `b[i]`) of `paths`: their `imgsim.duplicates.verify` statuses. `pipelines.duplicates`
#: passes one that spreads many pairs over Ray tasks.
PairVerifier = Callable[[Sequence[str], np.ndarray, np.ndarray], np.ndarray]


def verify_here(paths: Sequence[str], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The in-process `PairVerifier` (images read with `imgsim.data.sources.read_bytes`, local or S3), with a
    progress bar."""
    from imgsim.console.progress import bar
    from imgsim.data.sources import read_bytes

    with bar(len(a), "verify candidate pairs", "pairs") as progress:
        return verification.verify_pairs(paths, a, b, read_bytes, on_chunk=progress.update)[0]


def verify_node_pairs(
    collection: Collection,
    first_row: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    verifier: PairVerifier | None = None,
) -> np.ndarray:
    """`imgsim.duplicates.verify`'s status of each node pair (`a[i]`, `b[i]`), from their first rows' files."""
    from imgsim.console.progress import log

    started = time.perf_counter()
    status = (verifier or verify_here)(collection.paths, first_row[a], first_row[b])
    log(
        f"[duplicates] verified {len(a):,} candidate pairs in {time.perf_counter() - started:.1f} s: "
        f"{int((status == verification.VERIFIED).sum()):,} hold one geometry"
    )
    return status


# -- the threshold -------------------------------------------------------------------------------------
def load_calibration(
    run: str | os.PathLike[str], model_fingerprint: str, precision: float | None = None
) -> dict[str, Any] | None:
    """The stored calibration if it was made with this model (and this target precision, when given)."""
    path = RunPaths(run).duplicates_calibration
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if stored.get("model_fingerprint") != model_fingerprint or stored.get("version") != CALIBRATION_VERSION:
        return None
    if precision is not None and stored.get("precision_target") != precision:
        return None
    return stored


def calibrate(
    run: str | os.PathLike[str],
    searcher: Searcher,
    collection: Collection,
    *,
    precision: float = DEFAULTS.duplicates.precision,
    copies: int = DEFAULTS.duplicates.calibration_copies,
    seed: int = DEFAULTS.duplicates.seed,
    runner: ChunkRunner | None = None,
) -> dict[str, Any]:
    """Calibrate the duplicate threshold from edited copies (trained edits and mix) and store it."""
    from imgsim.console.progress import log
    from imgsim.evaluation.copies import calibrate_threshold, copy_scores
    from imgsim.evaluation.edits import TRAINED_EDITS

    started = time.perf_counter()
    scores, _, originals = copy_scores(
        searcher.model, searcher.index, collection.emb, collection.paths, collection.hashes,
        copies=copies, seed=seed, edits=TRAINED_EDITS, runner=runner,
    )  # fmt: skip
    result = {
        **calibrate_threshold(scores, precision),
        "candidate_radius": candidate_radius(scores),
        "copies": int(len(originals)),
        "seed": seed,
        "version": CALIBRATION_VERSION,
        "edits": list(TRAINED_EDITS),
        "model_fingerprint": searcher.model.fingerprint,
        "metric": searcher.index.metric,
        "images": len(collection),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(RunPaths(run).duplicates_calibration, result)
    log(
        f"[duplicates] calibrated on {result['queries']} copies of {result['copies']} images in "
        f"{time.perf_counter() - started:.1f} s: threshold {result['threshold']} for precision {precision}"
    )
    return result


def candidate_radius(scores: Any, recall: float = DEFAULTS.duplicates.candidate_recall) -> float | None:
    """The distance from their originals that holds `recall` of the `mix` copies (every trained edit
    at once, the hardest): how far candidates for geometric verification reach. None without copies."""
    mix = scores.of_edits(["mix"]).copy_distance
    mix = mix[np.isfinite(mix)]
    if len(mix) == 0:
        return None
    return round(float(np.quantile(mix.astype(np.float64), recall, method="higher")), 6)


def stored_or_calibrated(
    run: str | os.PathLike[str],
    searcher: Searcher,
    collection: Collection | None = None,
    *,
    precision: float | None = None,
    recalibrate: bool = False,
    copies: int = DEFAULTS.duplicates.calibration_copies,
    seed: int = DEFAULTS.duplicates.seed,
    runner: ChunkRunner | None = None,
) -> tuple[float, str, dict[str, Any]]:
    """(threshold, source, calibration): the stored calibration for this model (and `precision`, when
    given), else a new one (at `precision` or the default), stored in the run."""
    fingerprint = searcher.model.fingerprint
    stored = None if recalibrate else load_calibration(run, fingerprint, precision)
    if stored is not None:
        return float(stored["threshold"]), "stored calibration", stored
    collection = collection or Collection.read(run)
    target = DEFAULTS.duplicates.precision if precision is None else precision
    fresh = calibrate(run, searcher, collection, precision=target, copies=copies, seed=seed, runner=runner)
    return float(fresh["threshold"]), "calibrated", fresh


# -- incremental state ---------------------------------------------------------------------------------
@dataclass
class PairState:
    """The pairs found by the last run (by node key), each with its verification status
    (`imgsim.duplicates.verify`: verified, rejected or unverifiable), and the node keys it searched."""

    settings: dict[str, Any]
    key_a: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
    key_b: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
    distance: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    searched: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
    status: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))

    @classmethod
    def read(cls, run: str | os.PathLike[str]) -> PairState | None:
        d = RunPaths(run).duplicates_state
        try:
            settings = json.loads((d / "state.json").read_text())
            pairs = pq.read_table(d / "pairs.parquet")
            searched = pq.read_table(d / "searched.parquet")
        except (OSError, ValueError, pa.ArrowException):
            return None
        if settings.get("version") != STATE_VERSION or "status" not in pairs.column_names:
            return None  # an older imgsim's state: search everything again
        return cls(
            settings,
            pairs["key_a"].combine_chunks(),
            pairs["key_b"].combine_chunks(),
            pairs["distance"].to_numpy().astype(np.float32),
            searched["key"].combine_chunks(),
            pairs["status"].to_numpy().astype(np.int8),
        )

    def write(self, run: str | os.PathLike[str]) -> None:
        pairs = pa.table(
            {
                "key_a": self.key_a,
                "key_b": self.key_b,
                "distance": pa.array(self.distance, pa.float32()),
                "status": pa.array(self.status, pa.int8()),
            }
        )
        with writing_dir(RunPaths(run).duplicates_state) as tmp:
            pq.write_table(pairs, tmp / "pairs.parquet")
            pq.write_table(pa.table({"key": self.searched}), tmp / "searched.parquet")
            (tmp / "state.json").write_text(json.dumps(self.settings, indent=2) + "\n")

    def usable(self, settings: dict[str, Any], radius: float) -> bool:
        """Pairs found under these settings, at a threshold and a radius at least these."""
        reach = ("radius", "threshold")
        same = {k: v for k, v in self.settings.items() if k not in reach} == {
            k: v for k, v in settings.items() if k not in reach
        }
        return (
            same
            and radius <= float(self.settings.get("radius", -1.0)) + TOLERANCE
            and settings["threshold"] <= float(self.settings.get("threshold", -1.0)) + TOLERANCE
        )


# -- the whole run -------------------------------------------------------------------------------------
@dataclass
class DuplicateReport:
    """What `find_duplicates` found, and how."""

    groups: list[Group]
    threshold: float
    threshold_source: str
    calibration: dict[str, Any] | None
    images: int
    searched: int
    reused_pairs: int
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The `imgsim duplicates --json` object."""
        return {
            "groups": len(self.groups),
            "images_in_groups": sum(len(g.members) for g in self.groups),
            "exact_groups": sum(1 for g in self.groups if g.exact),
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "calibration": self.calibration,
            "images": self.images,
            "searched": self.searched,
            "reused_pairs": self.reused_pairs,
            "verification": self.verification,
            "seconds": round(self.seconds, 2),
            "stage_seconds": {k: round(v, 2) for k, v in self.stage_seconds.items()},
        }


@dataclass
class ReusedPairs:
    """What the stored pair state still holds for this run (`reconcile_pairs`): its pairs in this run's
    node numbers, with their distances and verification status, and the nodes to search again."""

    a: np.ndarray
    b: np.ndarray
    distance: np.ndarray
    status: np.ndarray
    to_search: np.ndarray


def reconcile_pairs(
    previous: PairState | None, settings: dict[str, Any], radius: float, node_key: pa.Array
) -> ReusedPairs:
    """The stored pairs that stay valid, and which nodes need searching: with a usable state
    (`PairState.usable`), the pairs whose two nodes still exist (within `radius`) and the nodes not
    searched before; else no pairs, and every node."""
    everything = ReusedPairs(
        np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int8),
        np.arange(len(node_key), dtype=np.int64),
    )  # fmt: skip
    if previous is None or not previous.usable(settings, radius):
        return everything
    known = pc.is_in(node_key, value_set=previous.searched).to_numpy(zero_copy_only=False)
    a = pc.index_in(previous.key_a, value_set=node_key)
    b = pc.index_in(previous.key_b, value_set=node_key)
    keep = (pc.is_valid(a).to_numpy(zero_copy_only=False) & pc.is_valid(b).to_numpy(zero_copy_only=False)
            & (previous.distance <= radius + TOLERANCE))  # fmt: skip
    # in this run's node numbers, which a re-index may have reordered: pair_codes ignore the order
    return ReusedPairs(
        a.fill_null(0).to_numpy(zero_copy_only=False)[keep].astype(np.int64),
        b.fill_null(0).to_numpy(zero_copy_only=False)[keep].astype(np.int64),
        previous.distance[keep],
        previous.status[keep],
        np.flatnonzero(~known).astype(np.int64),
    )


def _threshold_for(
    run: str | os.PathLike[str], searcher: Searcher, collection: Collection, threshold: float | None,
    stages: dict[str, float], **calibration_options: Any,
) -> tuple[float, str, dict[str, Any] | None]:  # fmt: skip
    """(threshold, source, calibration): the given one, else the stored or a new calibration."""
    calibration = None
    if threshold is None:
        t0 = time.perf_counter()
        threshold, source, calibration = stored_or_calibrated(
            run, searcher, collection, **calibration_options
        )
        stages["calibrate"] = time.perf_counter() - t0
    else:
        source = "--threshold"
    if threshold < 0:
        raise ValueError(f"the threshold must be at least 0, got {threshold}")
    return threshold, source, calibration


def _reach(
    run: str | os.PathLike[str], fingerprint: str, calibration: dict[str, Any] | None, threshold: float,
    checkable: np.ndarray,
) -> float:  # fmt: skip
    """How far candidates reach: the threshold, or, when some images can be verified, the
    calibration's candidate radius if larger (with --threshold, a stored calibration's, if any)."""
    radius = float(threshold)
    if checkable.any():
        measured = calibration if calibration is not None else load_calibration(run, fingerprint)
        candidate_reach = (measured or {}).get("candidate_radius")
        if candidate_reach is not None:
            radius = max(radius, float(candidate_reach))
    return radius


def _new_pairs(
    index: KnnIndex, collection: Collection, reused: ReusedPairs, checkable: np.ndarray, node_of_row: np.ndarray,
    first_row: np.ndarray, threshold: float, radius: float, max_neighbours: int, nprobe: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(a, b, distance) of the pairs found from the nodes to search, not already among the reused
    ones; verifiable nodes search out to `radius`, the others to the threshold."""
    to_search = reused.to_search
    wide = to_search[checkable[to_search]]
    found = [
        near_pairs(index, collection.emb, to_search[~checkable[to_search]], node_of_row, first_row, threshold,
                   max_neighbours, nprobe),
        near_pairs(index, collection.emb, wide, node_of_row, first_row, threshold, max_neighbours, nprobe,
                   radius=radius),
    ]  # fmt: skip
    new_a, new_b, new_d = unique_pairs(*(np.concatenate(part) for part in zip(*found, strict=True)))
    if len(reused.a):  # a pair already judged keeps its status (found again from a new node's side)
        fresh = ~np.isin(pair_codes(new_a, new_b), pair_codes(reused.a, reused.b))
        new_a, new_b, new_d = new_a[fresh], new_b[fresh], new_d[fresh]
    return new_a, new_b, new_d


def _link_groups(
    collection: Collection, node_of_row: np.ndarray, first_row: np.ndarray, pairs: tuple[np.ndarray, ...],
    metric: str, threshold: float,
) -> list[Group]:  # fmt: skip
    """The groups by complete linkage over the linked pairs (a, b, distance, status)."""
    a, b, d, status = pairs
    vectors = metric_space(collection.emb[first_row], metric)
    linked = verification.links(status, d, threshold, TOLERANCE)
    codes = pair_codes(a, b)
    node_groups = complete_linkage(
        len(first_row), a[linked], b[linked], d[linked], vectors, metric, threshold,
        verified=set(codes[status == verification.VERIFIED].tolist()),
        rejected=set(codes[status == verification.REJECTED].tolist()),
    )  # fmt: skip
    return build_groups(collection, node_groups, node_of_row, first_row, metric)


def find_duplicates(
    run: str | os.PathLike[str],
    *,
    threshold: float | None = None,
    precision: float = DEFAULTS.duplicates.precision,
    recalibrate: bool = False,
    full: bool = False,
    copies: int = DEFAULTS.duplicates.calibration_copies,
    seed: int = DEFAULTS.duplicates.seed,
    max_neighbours: int = DEFAULTS.duplicates.max_neighbours,
    runner: ChunkRunner | None = None,
    searcher: Searcher | None = None,
    verify: bool = DEFAULTS.duplicates.verify,
    verifier: PairVerifier | None = None,
    nprobe: int | None = None,
) -> DuplicateReport:
    """Exact and near-duplicate groups over RUN's index (module docstring); updates the stored state.

    `runner` runs the calibration's copy chunks (default in-process; `pipelines.duplicates` passes Ray
    tasks). `full` ignores the stored pairs and searches every image. `verify`: check candidate pairs
    of images large enough geometrically (`imgsim.duplicates.verify`), with `verifier` (default in-process).
    `nprobe`: IVF partitions the range search scans per image (default the index's; an exact index
    ignores it). Fewer is faster and may miss a pair across a partition boundary.
    """
    from imgsim.index.search import Searcher

    started = time.perf_counter()
    stages: dict[str, float] = {}
    searcher = searcher or Searcher.load(run)
    collection = Collection.read(run)
    stages["load"] = time.perf_counter() - started
    threshold, source, calibration = _threshold_for(
        run, searcher, collection, threshold, stages,
        precision=precision, recalibrate=recalibrate, copies=copies, seed=seed, runner=runner,
    )  # fmt: skip

    t0 = time.perf_counter()
    keys = node_keys(collection.paths, collection.hashes)
    node_of_row, first_row = nodes_of(keys, len(collection))
    node_key = pa.array(keys[first_row].tolist(), pa.string())
    index = searcher.index
    # images large enough for keypoints are verified, so their candidates reach further
    checkable = collection.verifiable(first_row) if verify else np.zeros(len(first_row), bool)
    radius = _reach(run, searcher.model.fingerprint, calibration, threshold, checkable)
    settings = {
        "version": STATE_VERSION,
        "model_fingerprint": searcher.model.fingerprint,
        "metric": index.metric,
        "max_neighbours": max_neighbours,
        "verify": verification.settings() if verify else None,
        "verify_neighbours": DEFAULTS.duplicates.verify_neighbours,
        "threshold": float(threshold),
        "radius": radius,
    }
    reused = reconcile_pairs(None if full else PairState.read(run), settings, radius, node_key)
    new_a, new_b, new_d = _new_pairs(
        index,
        collection,
        reused,
        checkable,
        node_of_row,
        first_row,
        threshold,
        radius,
        max_neighbours,
        nprobe,
    )
    stages["search"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    new_s = np.full(len(new_a), verification.UNVERIFIABLE, np.int8)
    judge = checkable[new_a] & checkable[new_b]
    if judge.any():
        new_s[judge] = verify_node_pairs(collection, first_row, new_a[judge], new_b[judge], verifier)
    stages["verify"] = time.perf_counter() - t0
    a = np.concatenate([reused.a, new_a])
    b = np.concatenate([reused.b, new_b])
    d = np.concatenate([reused.distance, new_d]).astype(np.float32)
    status = np.concatenate([reused.status, new_s]).astype(np.int8)

    t0 = time.perf_counter()
    groups = _link_groups(collection, node_of_row, first_row, (a, b, d, status), index.metric, threshold)
    stages["group"] = time.perf_counter() - t0

    PairState(settings, node_key.take(pa.array(a)), node_key.take(pa.array(b)), d, node_key, status).write(
        run
    )
    return DuplicateReport(
        groups=groups,
        threshold=float(threshold),
        threshold_source=source,
        calibration=calibration,
        images=len(collection),
        searched=int(len(reused.to_search)),
        reused_pairs=int(len(reused.a)),
        seconds=time.perf_counter() - started,
        stage_seconds=stages,
        verification={
            "verified": int((status == verification.VERIFIED).sum()),
            "rejected": int((status == verification.REJECTED).sum()),
            "unverifiable": int((status == verification.UNVERIFIABLE).sum()),
            "checked_now": int(judge.sum()),
            "radius": radius,
            **(verification.settings() if verify else {"version": None}),
        },
    )
