"""Index: embed (incrementally) → Parquet → KMeans → KNN, written as one atomic directory swap.

Incremental: every row records its input's size and modification time, and `manifest.json` the
model's fingerprint. A re-run embeds only new or changed images (and tries again the files that
could not be read), drops removed ones and reuses the stored embeddings and skip reasons; a
different model means a full re-embed. While less than `REFIT_SHARE` of the index has changed
since it was fitted (same model, metric, clusters and index kind), a re-run *updates* the previous
index instead of fitting it again: removed rows leave the KNN index, new rows are assigned to the
existing KMeans centroids and IVF lists and appended, so unchanged images keep their order and
their cluster (when nothing was removed, the previous embeddings.parquet is copied as bytes and the
new rows appended: `imgsim.io.parquet_append`). `--full` fits everything again. Resumable: embeddings stream into part files under
`RUN/.index-staging-<model>/` as batches finish, so a killed run picks up where it stopped. The
new `RUN/index/` is built beside the old one and swapped in whole (`imgsim.io.atomic`), so readers
never see a half-written index; a full disk ends the run with a one-line `DiskFull` error and the
previous index in place.

Memory: rows are Arrow tables of `imgsim.data.rows.FILE_SCHEMA`, read from the staging parts and the
previous index in batches; the driver holds the listing as Arrow columns, the float32 (N, D)
matrix while fitting, and the faiss index — no Python object per image.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgsim.config import DEFAULTS
from imgsim.console.progress import bar, log, stage
from imgsim.data.rows import (
    FILE_SCHEMA,
    INDEX_COLUMNS,
    READ_FAILURES,
    embedding_array,
    embedding_matrix,
    text_array,
)
from imgsim.errors import DiskFull, ImgsimError, disk_full
from imgsim.index.knn import KMeansClusterer, KnnIndex
from imgsim.io.atomic import writing_dir
from imgsim.io.parquet_append import append_rows
from imgsim.io.runs import RunPaths
from imgsim.models import autoencoder as model_lib
from pipelines.embed import StageTimes, embed_images, embed_in_process
from pipelines.ingest import list_inputs_table
from pipelines.runtime import ensure_ray, gpu_or_cpu, initialised_ray

STAGING_ROWS = 4096  # rows per staged part file
READ_ROWS = 65_536  # rows per batch read back from the staged parts and the previous index
#: Refit KMeans and the KNN index from scratch once this share of the rows has changed (added or
#: removed) since they were fitted; below it a re-run updates them (see the module docstring).
REFIT_SHARE = 0.2
#: embeddings.parquet's dictionary-encoded columns: where values repeat (not paths, not float vectors).
EMBEDDINGS_DICTIONARY = ["label", "cluster"]
FILE_COLUMNS = ["path", "label", "size", "mtime", "error", "content_hash", "width", "height"]


# -- rows ----------------------------------------------------------------------------------------
def as_file_rows(table: pa.Table) -> pa.Table:
    """`table` with exactly FILE_SCHEMA's columns: missing ones become nulls, types are cast."""
    columns = []
    for f in FILE_SCHEMA:
        if f.name in table.column_names:
            columns.append(table[f.name].cast(f.type))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=FILE_SCHEMA)


def file_rows_from_batch(batch: dict[str, np.ndarray]) -> pa.Table:
    """A batch of embedding rows (Ray Data, numpy; `size` and `mtime` carried from the listing)."""
    return pa.table(
        {
            "path": pa.array([str(p) for p in batch["path"]], pa.string()),
            "label": text_array(batch["label"]),
            "size": pa.array(batch["size"], pa.int64()),
            "mtime": pa.array(batch["mtime"], pa.int64()),
            "error": text_array(batch["error"]),
            "content_hash": text_array(batch["content_hash"]),
            "width": pa.array(batch["width"], pa.int32()),
            "height": pa.array(batch["height"], pa.int32()),
            "embedding": embedding_array(batch["embedding"]),
        },
        schema=FILE_SCHEMA,
    )


def _good(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_null(table["error"]))


@dataclass
class TableRows:
    """File rows held in memory (`write_index`'s input)."""

    table: pa.Table

    def batches(self, columns: list[str]) -> Iterator[pa.Table]:
        if self.table.num_rows:
            yield self.table.select(columns)


@dataclass
class StagedRows:
    """File rows in staging part files: every row of a part, or only `keep[part]`'s rows."""

    parts: list[Path]
    keep: dict[Path, np.ndarray] = field(default_factory=dict)

    def batches(self, columns: list[str]) -> Iterator[pa.Table]:
        for part in self.parts:
            table = pq.read_table(part, columns=columns)
            if part in self.keep:
                table = table.take(self.keep[part])
            if table.num_rows:
                yield table


# -- what a run must do ----------------------------------------------------------------------------
@dataclass
class Previous:
    """The last completed index of this model: its file rows (no embeddings) and manifest."""

    files: pa.Table
    manifest: dict[str, Any]


def _no_previous() -> Previous:
    return Previous(FILE_SCHEMA.empty_table().select(FILE_COLUMNS), {})


def _read_previous(paths: RunPaths, fingerprint: str) -> Previous:
    if not paths.manifest.is_file() or not paths.files.is_file() or not paths.embeddings.is_file():
        return _no_previous()
    manifest = json.loads(paths.manifest.read_text())
    if manifest.get("model_fingerprint") != fingerprint:
        return _no_previous()
    if "size" not in pq.read_schema(paths.embeddings).names:  # written before rows had size/mtime
        log("index: the index was written by an older imgsim: every image is embedded again")
        return _no_previous()
    files = pq.read_table(paths.files, columns=FILE_COLUMNS)
    return Previous(as_file_rows(files).select(FILE_COLUMNS), manifest)


def _staged_listing(parts: list[Path]) -> pa.Table:
    """path, size, mtime, part number and row of every staged row (embeddings left on disk)."""
    tables = []
    for i, part in enumerate(parts):
        t = pq.read_table(part, columns=["path", "size", "mtime"])
        tables.append(
            t.append_column("part", pa.array(np.full(t.num_rows, i, np.int32))).append_column(
                "row", pa.array(np.arange(t.num_rows, dtype=np.int64))
            )
        )
    if not tables:
        return pa.table({"path": pa.array([], pa.string()), "size": pa.array([], pa.int64()),
                         "mtime": pa.array([], pa.int64()), "part": pa.array([], pa.int32()),
                         "row": pa.array([], pa.int64())})  # fmt: skip
    return pa.concat_tables(tables)


def _rows_of(listing: pa.Table, known: pa.Table) -> np.ndarray:
    """For each listed input, the row of `known` with its path, or -1."""
    if known.num_rows == 0:
        return np.full(listing.num_rows, -1, np.int64)
    at = pc.index_in(listing["path"], value_set=known["path"])
    return at.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def _unchanged(
    listing: pa.Table, known: pa.Table, rows: np.ndarray | None = None, usable: np.ndarray | None = None
) -> np.ndarray:
    """For each listed input, the row of `known` recording it with the same size and mtime (and where
    the mask `usable` holds, if given), or -1. `rows`: `_rows_of(listing, known)` if already known."""
    if known.num_rows == 0:
        return np.full(listing.num_rows, -1, np.int64)
    rows = _rows_of(listing, known) if rows is None else rows
    found = rows >= 0
    at = np.where(found, rows, 0)
    same = (
        found
        & (known["size"].to_numpy()[at] == listing["size"].to_numpy())
        & (known["mtime"].to_numpy()[at] == listing["mtime"].to_numpy())
    )
    if usable is not None:
        same &= usable[at]
    return np.where(same, rows, -1)


@dataclass
class Plan:
    """What a run reuses and what it must embed."""

    todo: pa.Table  # listing rows to embed
    resumed: dict[int, np.ndarray]  # staged part number -> rows of it that a killed run embedded
    reused: pa.Table  # file rows (no embeddings) of the previous index that still hold
    removed: int  # inputs of the previous index that are gone

    @property
    def resumed_rows(self) -> int:
        return int(sum(len(r) for r in self.resumed.values()))


def plan_work(listing: pa.Table, staged: pa.Table, previous: pa.Table) -> Plan:
    """Split the listing (in any order) into reused (previous index), resumed (staging) and to-embed
    inputs (sorted by path: new rows are indexed in that order).

    A previous row whose file could not be read is not reused: the file is tried again."""
    from_staged = _unchanged(listing, staged)
    errors = pc.fill_null(previous["error"], "")
    retry = pc.starts_with(errors, READ_FAILURES[0])
    for prefix in READ_FAILURES[1:]:
        retry = pc.or_(retry, pc.starts_with(errors, prefix))
    usable = ~retry.to_numpy(zero_copy_only=False)
    in_previous = _rows_of(listing, previous)
    from_previous = np.where(from_staged >= 0, -1, _unchanged(listing, previous, in_previous, usable))
    todo_mask = (from_staged < 0) & (from_previous < 0)
    hits = from_staged[from_staged >= 0]
    resumed: dict[int, np.ndarray] = {}
    if len(hits):
        part = staged["part"].to_numpy()[hits]
        row = staged["row"].to_numpy()[hits]
        for p in np.unique(part):
            resumed[int(p)] = np.sort(row[part == p])
    kept = np.sort(from_previous[from_previous >= 0])  # previous rows are unique: all of them = arange
    return Plan(
        todo=listing.filter(pa.array(todo_mask)).sort_by("path"),
        resumed=resumed,
        # in the previous file's order: when every row stays, files.parquet is appended to, not rewritten
        reused=previous if len(kept) == previous.num_rows else previous.take(kept),
        # paths are unique on both sides: a previous path the listing did not find is gone
        removed=previous.num_rows - int((in_previous >= 0).sum()),
    )


# -- the job ---------------------------------------------------------------------------------------
def _staging(paths: RunPaths, fingerprint: str, full: bool) -> Path:
    """This model's staging folder (emptied with `full`); other models' staging is useless now."""
    staging = paths.index_staging(fingerprint)
    for old in paths.all_index_staging():
        if old != staging or full:
            shutil.rmtree(old, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    return staging


def _in_process(images: int, use_gpu: bool) -> bool:
    """Embed here rather than in a Ray Data job: a few images, on CPU, on this one machine (not a
    cluster: RAY_ADDRESS, or a Ray already connected to more than one node)."""
    if use_gpu or images > DEFAULTS.index.in_process_max or os.environ.get("RAY_ADDRESS"):
        return False
    ray = initialised_ray()
    return ray is None or sum(1 for n in ray.nodes() if n.get("Alive")) <= 1


def _embed_into_staging(
    data: str,
    paths: RunPaths,
    todo: pa.Table,
    staging: Path,
    times: StageTimes,
    concurrency: int | None,
    use_gpu: bool,
) -> list[Path]:
    """Embed `todo` with the Ray Data job, writing each batch of rows to a staging part as it comes."""
    part = len(list(staging.glob("part-*.parquet")))
    written = []
    if not _in_process(todo.num_rows, use_gpu):
        ensure_ray()
        use_gpu = gpu_or_cpu(use_gpu, "embedding")
        ds = embed_images(data, str(paths.root), refs=todo, concurrency=concurrency, use_gpu=use_gpu)
        batches = ds.iter_batches(batch_size=STAGING_ROWS, batch_format="numpy")
    else:  # a few images: cheaper here than starting the Ray Data job's actor pool
        batches = _rebatch(embed_in_process(todo, str(paths.root)), STAGING_ROWS)
    with bar(todo.num_rows, "embed", "images") as progress:
        for batch in batches:
            times.add(batch)
            t0 = time.perf_counter()
            table = file_rows_from_batch(batch)
            tmp = staging / f".part-{part:06d}.tmp"
            target = staging / f"part-{part:06d}.parquet"
            try:
                pq.write_table(table, tmp)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                if disk_full(e):
                    raise DiskFull(
                        f"no space left on the disk of {staging} while staging embeddings — free some "
                        "space and re-run `imgsim index`: what is staged is kept, the index is unchanged"
                    ) from None
                raise
            tmp.replace(target)
            written.append(target)
            times.write += time.perf_counter() - t0
            part += 1
            progress.update(table.num_rows)
        progress.note(times.breakdown())
    times.warn_if_slow_reads(data)
    return written


def _rebatch(batches: Iterator[dict[str, np.ndarray]], rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches joined into batches of `rows` (the last one shorter)."""
    pending: list[dict[str, np.ndarray]] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += len(batch["path"])
        if count >= rows:
            yield {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
            pending, count = [], 0
    if pending:
        yield {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}


def build_index(
    data: str,
    run: str,
    *,
    clusters: int = DEFAULTS.index.clusters,
    metric: str = DEFAULTS.index.metric,
    kind: str = DEFAULTS.index.kind,
    nprobe: int = DEFAULTS.index.nprobe,
    concurrency: int | None = None,
    use_gpu: bool = False,
    full: bool = False,
) -> dict[str, Any]:
    """Embed every image under `data` with RUN's model, cluster, index; return a summary."""
    started = time.perf_counter()
    paths = RunPaths(Path(run).resolve())
    fingerprint = model_lib.fingerprint(paths.root)
    listing = list_inputs_table(data, ordered=False)  # plan_work sorts the rows to embed
    staging = _staging(paths, fingerprint, full)
    previous = _no_previous() if full else _read_previous(paths, fingerprint)
    old_parts = sorted(staging.glob("part-*.parquet"))
    plan = plan_work(listing, _staged_listing(old_parts), previous.files)
    if plan.reused.num_rows or plan.resumed_rows or plan.removed:
        log(
            f"index: {plan.todo.num_rows:,} to embed, {plan.reused.num_rows:,} unchanged, "
            f"{plan.resumed_rows:,} from an interrupted run, {plan.removed:,} removed"
        )
    times = StageTimes()
    new_parts: list[Path] = []
    if plan.todo.num_rows:
        new_parts = _embed_into_staging(data, paths, plan.todo, staging, times, concurrency, use_gpu)
    new = StagedRows(
        [old_parts[i] for i in sorted(plan.resumed)] + new_parts,
        {old_parts[i]: rows for i, rows in plan.resumed.items()},
    )
    summary = _write(
        paths, fingerprint, data, previous, plan.reused, new,
        clusters=clusters, metric=metric, kind=kind, nprobe=nprobe,
    )  # fmt: skip
    shutil.rmtree(staging, ignore_errors=True)
    if summary["skipped"]:
        log(
            f"skipped {summary['skipped']:,} of {summary['skipped'] + summary['images']:,} files that could "
            f"not be read or decoded: list in {summary['skipped_path']}"
        )
    summary.update(
        embedded=plan.todo.num_rows,
        reused=plan.reused.num_rows,
        resumed=plan.resumed_rows,
        removed=plan.removed,
        seconds=round(time.perf_counter() - started, 1),
        stage_seconds={
            "read": round(times.read, 1),
            "decode": round(times.decode, 1),
            "encode": round(times.encode, 1),
            "write": round(times.write, 1),
        },
    )
    return summary


# -- writing the index -----------------------------------------------------------------------------
def write_index(
    paths: RunPaths,
    rows: pa.Table,
    fingerprint: str,
    data: str,
    *,
    clusters: int = DEFAULTS.index.clusters,
    metric: str = DEFAULTS.index.metric,
    kind: str = DEFAULTS.index.kind,
    nprobe: int = DEFAULTS.index.nprobe,
) -> dict[str, Any]:
    """KMeans + KNN fitted over the good file rows (`imgsim.data.rows.FILE_SCHEMA`) held in memory; every
    index file written and swapped in as one directory."""
    return _write(
        paths, fingerprint, data, _no_previous(), _no_previous().files, TableRows(as_file_rows(rows)),
        clusters=clusters, metric=metric, kind=kind, nprobe=nprobe,
    )  # fmt: skip


def save_index_folder(
    directory: Path, index: KnnIndex, fingerprint: str, files: dict[str, Callable[[Path], None]]
) -> None:
    """Write the run's whole index folder at once (`imgsim.io.atomic.writing_dir`): readers, and a
    rerun after a crash, see the previous folder or the new one, never half. `files` maps each name
    to the function writing that path; the KNN index saves itself meanwhile, in a thread (faiss
    writes without the GIL, while embeddings.parquet is the long write)."""
    with writing_dir(directory) as tmp, ThreadPoolExecutor(1) as pool:
        saved = pool.submit(index.save, tmp, fingerprint)
        for name, write in files.items():
            write(tmp / name)
        saved.result()


def _resolved_kind(kind: str, n: int) -> str:
    return kind if kind != "auto" else ("ivf" if n >= DEFAULTS.index.ivf_threshold else "exact")


def _can_update(
    previous: Previous, n_after: int, changed: int, clusters: int, metric: str, kind: str
) -> bool:
    """True if the previous index may be updated rather than fitted again (module docstring)."""
    m = previous.manifest
    if not m or "fitted_images" not in m or m.get("metric") != metric:
        return False
    if m.get("clusters_requested") != clusters or m.get("index_kind") != _resolved_kind(kind, n_after):
        return False
    return m.get("changed_since_fit", 0) + changed <= REFIT_SHARE * m["fitted_images"]


@dataclass
class IndexRows:
    """The good rows of the new index, in order: the previous index's rows that stay (`keep`, a mask
    over its embeddings.parquet), then the `new` rows without an error."""

    paths: RunPaths
    keep: np.ndarray
    new: TableRows | StagedRows

    @property
    def kept(self) -> int:
        return int(self.keep.sum())

    def previous(self, columns: list[str]) -> Iterator[pa.Table]:
        """The kept rows of the previous embeddings.parquet, read in batches."""
        if not self.keep.any():
            return
        start = 0
        batches = pq.ParquetFile(self.paths.embeddings).iter_batches(batch_size=READ_ROWS, columns=columns)
        for batch in batches:
            mask = self.keep[start : start + batch.num_rows]
            start += batch.num_rows
            if mask.any():
                yield pa.Table.from_batches([batch]).filter(pa.array(mask))

    def new_good(self, columns: list[str]) -> Iterator[pa.Table]:
        """The new rows that decoded (no error)."""
        for t in self.new.batches([*columns, "error"]):
            good = _good(t).select(columns)
            if good.num_rows:
                yield good


@dataclass
class Fitted:
    """KMeans and the KNN index for the new rows, fitted again or updated; `new_labels` are the new
    rows' clusters, `kept_labels` the kept rows' (None: those stored in embeddings.parquet stay)."""

    clusterer: KMeansClusterer
    index: KnnIndex
    new_labels: np.ndarray
    kept_labels: np.ndarray | None
    fitted_images: int
    changed_since_fit: int
    updated: bool
    seconds: float


def _kept_rows(paths: RunPaths, previous: Previous, reused: pa.Table) -> np.ndarray:
    """The previous index's rows that stay (in their order), as a mask over embeddings.parquet."""
    if not previous.manifest:
        return np.zeros(0, bool)
    good_reused = reused["error"].null_count  # rows without an error: those in embeddings.parquet
    if good_reused == previous.manifest.get("images", -1):  # every previous row stays
        return np.ones(good_reused, bool)
    prev_paths = pq.read_table(paths.embeddings, columns=["path"])["path"]
    return pc.is_in(prev_paths, value_set=_good(reused)["path"]).to_numpy(zero_copy_only=False)


def _update_index(rows: IndexRows, previous: Previous, fingerprint: str, nprobe: int, changed: int) -> Fitted:
    """The previous KMeans and KNN index, updated: removed rows out, new rows assigned and added."""
    t0 = time.perf_counter()
    clusterer = KMeansClusterer.load(rows.paths.kmeans_dir)
    index = KnnIndex.load(rows.paths.index_dir, expect_fingerprint=fingerprint)
    index.nprobe = nprobe
    index.remove(np.flatnonzero(~rows.keep))
    new_labels = []
    for t in rows.new_good(["embedding"]):
        emb = embedding_matrix(t)
        new_labels.append(clusterer.predict(emb))
        index.add(emb)
    return Fitted(
        clusterer, index,
        new_labels=np.concatenate(new_labels) if new_labels else np.zeros(0, np.int64),
        kept_labels=None,
        fitted_images=previous.manifest["fitted_images"],
        changed_since_fit=previous.manifest.get("changed_since_fit", 0) + changed,
        updated=True,
        seconds=time.perf_counter() - t0,
    )  # fmt: skip


def _fit_index(rows: IndexRows, n_good: int, *, clusters: int, metric: str, kind: str, nprobe: int) -> Fitted:
    """KMeans and the KNN index fitted again on every good row (the float32 matrix held meanwhile)."""
    t0 = time.perf_counter()
    emb = None
    at = 0
    for source in (rows.previous, rows.new_good):
        for t in source(["embedding"]):
            part = embedding_matrix(t)
            if emb is None:
                emb = np.empty((n_good, part.shape[1]), np.float32)
            emb[at : at + len(part)] = part
            at += len(part)
    assert emb is not None and at == n_good
    with stage("KMeans", len(emb), "embeddings") as p:
        clusterer = KMeansClusterer(clusters, metric=metric).fit(emb)
        p.note(f"{len(clusterer.centroids_)} clusters")
    with stage("KNN", len(emb), "embeddings") as p:
        index = KnnIndex(metric=metric, kind=kind, nprobe=nprobe).fit(emb)
        p.note(f"{index.kind_} {metric} index")
    del emb
    n_kept = rows.kept
    return Fitted(
        clusterer, index,
        new_labels=clusterer.labels_[n_kept:],
        kept_labels=clusterer.labels_[:n_kept],
        fitted_images=n_good,
        changed_since_fit=0,
        updated=False,
        seconds=time.perf_counter() - t0,
    )  # fmt: skip


def _with_labels(tables: Iterator[pa.Table], labels: np.ndarray) -> Iterator[pa.Table]:
    """Index rows from rows without a cluster: `labels` in order, as the cluster column."""
    at = 0
    for t in tables:
        t = t.add_column(2, "cluster", pa.array(labels[at : at + t.num_rows], pa.int64()))
        at += t.num_rows
        yield t.select([*INDEX_COLUMNS, "embedding"])


def _write_embeddings(target: Path, rows: IndexRows, fitted: Fitted, sizes: np.ndarray) -> None:
    """embeddings.parquet, streamed: the kept previous rows in their order, then the new ones; `sizes`
    counts the rows per cluster. When only rows were added, the previous file's bytes are copied and
    the new rows appended (`imgsim.io.parquet_append`), rather than a million unchanged rows decoded
    and encoded again."""

    def count(clusters: pa.ChunkedArray | pa.Array) -> None:
        sizes[:] += np.bincount(np.asarray(clusters), minlength=len(sizes))[: len(sizes)]

    without_cluster = [c for c in INDEX_COLUMNS if c != "cluster"] + ["embedding"]
    if fitted.updated and rows.kept and rows.keep.all():
        new_rows = list(_with_labels(rows.new_good(without_cluster), fitted.new_labels))
        if append_rows(rows.paths.embeddings, new_rows, target, use_dictionary=EMBEDDINGS_DICTIONARY):
            count(pq.read_table(target, columns=["cluster"])["cluster"])
            return
    writer = schema = None
    try:
        for source, labels in ((rows.previous, fitted.kept_labels), (rows.new_good, fitted.new_labels)):
            tables = (
                source([*INDEX_COLUMNS, "embedding"])
                if labels is None
                else _with_labels(source(without_cluster), labels)
            )
            for t in tables:
                count(t["cluster"])
                if writer is None:
                    schema = t.schema
                    writer = pq.ParquetWriter(target, schema, use_dictionary=EMBEDDINGS_DICTIONARY)
                writer.write_table(t.cast(schema))
    finally:
        if writer is not None:
            writer.close()


def _write_files(
    target: Path,
    paths: RunPaths,
    files: pa.Table,
    reused: pa.Table,
    previous: Previous,
    new: TableRows | StagedRows,
) -> None:
    """files.parquet: appended to when it is `reused` unchanged (every previous row kept, in order)."""
    unchanged = reused.num_rows and reused.num_rows == previous.files.num_rows
    if unchanged and append_rows(paths.files, list(new.batches(FILE_COLUMNS)), target):
        return
    pq.write_table(files, target)


def _skipped_lines(bad: pa.Table) -> str:
    """skipped.jsonl: one `{"path", "reason"}` line per file that could not be used."""
    return "".join(
        json.dumps({"path": p, "reason": r}) + "\n"
        for p, r in zip(bad["path"].to_pylist(), bad["error"].to_pylist(), strict=True)
    )


def _write(
    paths: RunPaths,
    fingerprint: str,
    data: str,
    previous: Previous,
    reused: pa.Table,
    new: TableRows | StagedRows,
    *,
    clusters: int,
    metric: str,
    kind: str,
    nprobe: int,
) -> dict[str, Any]:
    """The index from the previous index's `reused` rows plus the `new` rows: updated in place
    when `_can_update` allows, else fitted again on everything."""
    files = pa.concat_tables([reused, *new.batches(FILE_COLUMNS)])
    ok = pc.is_null(files["error"])
    n_good = int(pc.sum(ok).as_py() or 0)
    if n_good == 0:
        raise ImgsimError(f"none of the {files.num_rows} files under {data} could be used as an image")
    rows = IndexRows(paths, _kept_rows(paths, previous, reused), new)
    changed = int((~rows.keep).sum()) + n_good - rows.kept
    if _can_update(previous, n_good, changed, clusters, metric, kind):
        fitted = _update_index(rows, previous, fingerprint, nprobe, changed)
    else:
        fitted = _fit_index(rows, n_good, clusters=clusters, metric=metric, kind=kind, nprobe=nprobe)
    clusterer, index = fitted.clusterer, fitted.index
    sizes = np.zeros(len(clusterer.centroids_), np.int64)
    bad = files.filter(pc.invert(ok))
    manifest = {
        "data": data,
        "images": n_good,
        "skipped": bad.num_rows,
        "model_fingerprint": fingerprint,
        "metric": metric,
        "index_kind": index.kind_,
        "clusters": int(len(clusterer.centroids_)),
        "clusters_requested": clusters,
        "dim": int(index.dim_),
        "fitted_images": fitted.fitted_images,
        "changed_since_fit": fitted.changed_since_fit,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    skipped_lines = _skipped_lines(bad)
    try:
        save_index_folder(
            paths.index_dir,
            index,
            fingerprint,
            {
                paths.embeddings.name: lambda p: _write_embeddings(p, rows, fitted, sizes),
                paths.files.name: lambda p: _write_files(p, paths, files, reused, previous, new),
                paths.skipped.name: lambda p: p.write_text(skipped_lines),
                paths.kmeans_dir.name: clusterer.save,
                paths.manifest.name: lambda p: p.write_text(json.dumps(manifest, indent=2)),
            },
        )
    except (OSError, RuntimeError) as e:
        if disk_full(e):
            raise DiskFull(
                f"no space left on the disk of {paths.index_dir} while writing the index — free some "
                "space and re-run `imgsim index`: the previous index is unchanged and still served"
            ) from None
        raise
    if fitted.updated:  # a refit shows as the KMeans and KNN stages
        log(
            f"index: updated the KMeans + KNN index with {changed:,} changed images in {fitted.seconds:.1f} s"
        )
    return {
        "images": n_good,
        "skipped": bad.num_rows,
        "skipped_path": str(paths.skipped),
        "clusters": manifest["clusters"],
        "index_kind": index.kind_,
        "metric": metric,
        "index_dir": str(paths.index_dir),
        "cluster_sizes": sizes.tolist(),
        "updated": fitted.updated,
    }


if __name__ == "__main__":
    import sys

    from imgsim.console.command import run_as_module
    from pipelines.commands.index import COMMAND

    sys.exit(run_as_module(COMMAND))
