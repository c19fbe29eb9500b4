"""Index: embed (incrementally) → Parquet → KMeans → KNN, written as one atomic directory swap.

Incremental: every row records its input's size and modification time, and `manifest.json` the
model's fingerprint. A re-run embeds only new or changed images, drops removed ones and reuses the
stored embeddings (and stored skip reasons); a different model means a full re-embed. Resumable:
embeddings stream into part files under `RUN/.index-staging-<model>/` as batches finish, so a
killed run picks up where it stopped. The new `RUN/index/` is built beside the old one and swapped
in whole (`imgsim.atomic`), so readers never see a half-written index.

Rows are Arrow tables of `imgsim.rows.FILE_SCHEMA` throughout (no Python object per image).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgsim import model as model_lib
from imgsim.config import DEFAULTS
from imgsim.errors import ImgsimError
from imgsim.index import KMeansClusterer, KnnIndex
from imgsim.progress import bar, log, stage
from imgsim.rows import FILE_SCHEMA, INDEX_COLUMNS, embedding_array, embedding_matrix, text_array
from imgsim.runs import RunPaths
from imgsim.sources import ImageRef
from pipelines.embed import StageTimes, embed_images
from pipelines.ingest import list_inputs
from pipelines.runtime import ensure_ray, gpu_or_cpu

STAGING_ROWS = 4096  # rows per staged part file


# -- rows ----------------------------------------------------------------------------------------
def listing_table(refs: list[ImageRef]) -> pa.Table:
    """The listed inputs as columns: path, label, size, mtime."""
    return pa.table(
        {
            "path": pa.array([r.path for r in refs], pa.string()),
            "label": pa.array([r.label for r in refs], pa.string()),
            "size": pa.array([r.size for r in refs], pa.int64()),
            "mtime": pa.array([r.mtime for r in refs], pa.int64()),
        }
    )


def as_file_rows(table: pa.Table) -> pa.Table:
    """`table` with exactly FILE_SCHEMA's columns: missing ones become nulls, types are cast."""
    columns = []
    for f in FILE_SCHEMA:
        if f.name in table.column_names:
            columns.append(table[f.name].cast(f.type))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=FILE_SCHEMA)


def file_rows_from_batch(batch: dict[str, np.ndarray], listing: pa.Table) -> pa.Table:
    """A batch of embedding rows (Ray Data, numpy) as file rows, with size and mtime from `listing`."""
    paths = pa.array([str(p) for p in batch["path"]], pa.string())
    at = pc.index_in(paths, value_set=listing["path"])
    return pa.table(
        {
            "path": paths,
            "label": text_array(batch["label"]),
            "size": listing["size"].take(at),
            "mtime": listing["mtime"].take(at),
            "error": text_array(batch["error"]),
            "content_hash": text_array(batch["content_hash"]),
            "width": pa.array(batch["width"], pa.int32()),
            "height": pa.array(batch["height"], pa.int32()),
            "embedding": embedding_array(batch["embedding"]),
        },
        schema=FILE_SCHEMA,
    )


def _empty_rows() -> pa.Table:
    return FILE_SCHEMA.empty_table()


def _read_previous(paths: RunPaths, fingerprint: str) -> pa.Table:
    """File rows of the last completed run with this model (good rows and skipped ones)."""
    if not paths.manifest.is_file() or not paths.files.is_file():
        return _empty_rows()
    if json.loads(paths.manifest.read_text()).get("model_fingerprint") != fingerprint:
        return _empty_rows()
    good = pq.read_table(paths.embeddings)
    if "size" not in good.column_names:  # an index written before rows recorded size and mtime
        log("index: the index was written by an older imgsim: every image is embedded again")
        return _empty_rows()
    files = pq.read_table(paths.files)
    bad = files.filter(pc.is_valid(files["error"]))
    return pa.concat_tables([as_file_rows(good), as_file_rows(bad)])


def _read_staged(staging: Path) -> pa.Table:
    """File rows that a killed run already embedded with this model."""
    parts = sorted(staging.glob("part-*.parquet"))
    return pa.concat_tables([as_file_rows(pq.read_table(p)) for p in parts]) if parts else _empty_rows()


def _unchanged(listing: pa.Table, known: pa.Table) -> np.ndarray:
    """For each listed input, the row of `known` recording it with the same size and mtime, or -1."""
    if known.num_rows == 0:
        return np.full(listing.num_rows, -1, np.int64)
    at = pc.index_in(listing["path"], value_set=known["path"])
    found = pc.is_valid(at).to_numpy(zero_copy_only=False)
    rows = at.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    same = (
        found
        & (known["size"].to_numpy()[rows] == listing["size"].to_numpy())
        & (known["mtime"].to_numpy()[rows] == listing["mtime"].to_numpy())
    )
    return np.where(same, rows, -1)


@dataclass
class Plan:
    """What a run reuses and what it must embed."""

    resumed: pa.Table  # rows a killed run staged
    reused: pa.Table  # rows of the previous index
    todo: list[ImageRef]  # inputs to embed
    removed: int  # inputs of the previous index that are gone


def plan_work(refs: list[ImageRef], listing: pa.Table, staged: pa.Table, previous: pa.Table) -> Plan:
    from_staged = _unchanged(listing, staged)
    from_previous = np.where(from_staged >= 0, -1, _unchanged(listing, previous))
    todo_mask = (from_staged < 0) & (from_previous < 0)
    gone = pc.invert(pc.is_in(previous["path"], value_set=listing["path"])) if previous.num_rows else None
    return Plan(
        resumed=staged.take(from_staged[from_staged >= 0]),
        reused=previous.take(from_previous[from_previous >= 0]),
        todo=[r for r, t in zip(refs, todo_mask, strict=True) if t],
        removed=int(pc.sum(gone).as_py() or 0) if gone is not None else 0,
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


def _embed_into_staging(
    data: str,
    paths: RunPaths,
    todo: list[ImageRef],
    listing: pa.Table,
    staging: Path,
    times: StageTimes,
    concurrency: int,
    use_gpu: bool,
) -> list[pa.Table]:
    """Embed `todo` with the Ray Data job, writing each batch of rows to a staging part as it comes."""
    ensure_ray()
    use_gpu = gpu_or_cpu(use_gpu, "embedding")
    part = len(list(staging.glob("part-*.parquet")))
    tables = []
    ds = embed_images(data, str(paths.root), refs=todo, concurrency=concurrency, use_gpu=use_gpu)
    with bar(len(todo), "embed", "images") as progress:
        for batch in ds.iter_batches(batch_size=STAGING_ROWS, batch_format="numpy"):
            times.add(batch)
            t0 = time.perf_counter()
            table = file_rows_from_batch(batch, listing)
            tmp = staging / f".part-{part:06d}.tmp"
            pq.write_table(table, tmp)
            tmp.replace(staging / f"part-{part:06d}.parquet")
            times.write += time.perf_counter() - t0
            tables.append(table)
            part += 1
            progress.update(table.num_rows)
        progress.note(times.breakdown())
    times.warn_if_slow_reads(data)
    return tables


def build_index(
    data: str,
    run: str,
    *,
    clusters: int = DEFAULTS.index.clusters,
    metric: str = DEFAULTS.index.metric,
    kind: str = DEFAULTS.index.kind,
    nprobe: int = DEFAULTS.index.nprobe,
    concurrency: int = DEFAULTS.index.concurrency,
    use_gpu: bool = False,
    full: bool = False,
) -> dict[str, Any]:
    """Embed every image under `data` with RUN's model, cluster, index; return a summary."""
    started = time.perf_counter()
    paths = RunPaths(Path(run).resolve())
    fingerprint = model_lib.fingerprint(paths.root)
    refs = list_inputs(data)
    listing = listing_table(refs)
    staging = _staging(paths, fingerprint, full)
    previous = _empty_rows() if full else _read_previous(paths, fingerprint)
    plan = plan_work(refs, listing, _read_staged(staging), previous)
    if plan.reused.num_rows or plan.resumed.num_rows or plan.removed:
        log(
            f"index: {len(plan.todo):,} to embed, {plan.reused.num_rows:,} unchanged, "
            f"{plan.resumed.num_rows:,} from an interrupted run, {plan.removed:,} removed"
        )
    times = StageTimes()
    new: list[pa.Table] = []
    if plan.todo:
        new = _embed_into_staging(data, paths, plan.todo, listing, staging, times, concurrency, use_gpu)
    rows = pa.concat_tables([plan.resumed, plan.reused, *new]).sort_by("path")
    summary = write_index(
        paths, rows, fingerprint, data, clusters=clusters, metric=metric, kind=kind, nprobe=nprobe
    )
    shutil.rmtree(staging, ignore_errors=True)
    if summary["skipped"]:
        log(
            f"skipped {summary['skipped']:,} of {summary['skipped'] + summary['images']:,} files that could "
            f"not be read or decoded: list in {summary['skipped_path']}"
        )
    summary.update(
        embedded=len(plan.todo),
        reused=plan.reused.num_rows,
        resumed=plan.resumed.num_rows,
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
    """KMeans + KNN over the good file rows (`imgsim.rows.FILE_SCHEMA`); every index file written
    and swapped in as one directory."""
    ok = pc.is_null(rows["error"])
    good, bad = rows.filter(ok), rows.filter(pc.invert(ok))
    if good.num_rows == 0:
        raise ImgsimError(f"none of the {rows.num_rows} files under {data} could be used as an image")
    emb = embedding_matrix(good)
    with stage("KMeans", len(emb), "embeddings") as p:
        clusterer = KMeansClusterer(clusters, metric=metric).fit(emb)
        p.note(f"{len(clusterer.centroids_)} clusters")
    with stage("KNN", len(emb), "embeddings") as p:
        index = KnnIndex(metric=metric, kind=kind, nprobe=nprobe).fit(emb)
        p.note(f"{index.kind_} {metric} index")
    good = good.append_column("cluster", pa.array(clusterer.labels_, pa.int64()))
    table = good.select([*INDEX_COLUMNS, "embedding"])
    files = rows.select(["path", "label", "size", "mtime", "error", "content_hash", "width", "height"])
    manifest = {
        "data": data,
        "images": good.num_rows,
        "skipped": bad.num_rows,
        "model_fingerprint": fingerprint,
        "metric": metric,
        "index_kind": index.kind_,
        "clusters": int(len(clusterer.centroids_)),
        "dim": int(emb.shape[1]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    skipped_lines = "".join(
        json.dumps({"path": p, "reason": r}) + "\n"
        for p, r in zip(bad["path"].to_pylist(), bad["error"].to_pylist(), strict=True)
    )
    index.save(
        paths.index_dir,
        model_fingerprint=fingerprint,
        extra_files={
            paths.embeddings.name: lambda p: pq.write_table(table, p),
            paths.files.name: lambda p: pq.write_table(files, p),
            paths.skipped.name: lambda p: p.write_text(skipped_lines),
            paths.kmeans_dir.name: clusterer.save,
            paths.manifest.name: lambda p: p.write_text(json.dumps(manifest, indent=2)),
        },
    )
    return {
        "images": good.num_rows,
        "skipped": bad.num_rows,
        "skipped_path": str(paths.skipped),
        "clusters": manifest["clusters"],
        "index_kind": index.kind_,
        "metric": metric,
        "index_dir": str(paths.index_dir),
        "cluster_sizes": np.bincount(clusterer.labels_, minlength=manifest["clusters"]).tolist(),
    }


if __name__ == "__main__":
    import sys

    from imgsim.cli import main_for

    sys.exit(main_for("index"))
