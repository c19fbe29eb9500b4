"""Index: embed (incrementally) → Parquet → KMeans → KNN, written as one atomic directory swap.

Incremental: `RUN/index/files.parquet` remembers each input's size and modification time and the
model fingerprint in `manifest.json`. A re-run embeds only new or changed images, drops removed
ones and reuses the stored embeddings (and stored skip reasons); a different model means a full
re-embed. Resumable: embeddings stream into part files under `RUN/.index-staging-<model>/` as
batches finish, so an interrupted run picks up where it stopped. The new `RUN/index/` is built
beside the old one and swapped in whole, so readers never see a half-written index.

    ray job submit --working-dir . -- python -m pipelines.build_index DATA --model RUN
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgsim import model as model_lib
from imgsim.config import DEFAULTS
from imgsim.errors import ImgsimError
from imgsim.index import KMeansClusterer, KnnIndex
from imgsim.progress import bar, log
from imgsim.runs import RunPaths, embedding_matrix
from imgsim.sources import ImageRef, list_images
from pipelines.embed import StageTimes, embed_images
from pipelines.ingest import as_text, error_reason
from pipelines.runtime import ensure_ray

FILES = "files.parquet"  # path, size, mtime, error: what the last run saw
STAGING_ROWS = 4096  # rows per staged part file


def _staging_dir(paths: RunPaths, fingerprint: str) -> Path:
    return paths.root / f".index-staging-{fingerprint}"


def _read_previous(paths: RunPaths, fingerprint: str) -> dict[str, dict[str, Any]]:
    """path → {size, mtime, label, embedding | None, error | None} from the last completed run."""
    if not paths.manifest.is_file() or not (paths.index_dir / FILES).is_file():
        return {}
    if json.loads(paths.manifest.read_text()).get("model_fingerprint") != fingerprint:
        return {}
    files = pq.read_table(paths.index_dir / FILES).to_pylist()
    emb_table = pq.read_table(paths.embeddings, columns=["path", "embedding"])
    emb = dict(zip(emb_table["path"].to_pylist(), embedding_matrix(emb_table), strict=True))
    return {f["path"]: {**f, "embedding": emb.get(f["path"])} for f in files}


def _read_staged(staging: Path) -> dict[str, dict[str, Any]]:
    """Rows an interrupted run already embedded with this model."""
    rows: dict[str, dict[str, Any]] = {}
    for part in sorted(staging.glob("part-*.parquet")):
        table = pq.read_table(part)
        for row, e in zip(table.drop(["embedding"]).to_pylist(), embedding_matrix(table), strict=True):
            rows[row["path"]] = {**row, "embedding": e if row["error"] is None else None}
    return rows


def _write_part(
    staging: Path, n: int, rows: dict[str, np.ndarray], refs_by_path: dict[str, ImageRef]
) -> None:
    paths = [str(p) for p in rows["path"]]
    dim = rows["embedding"].shape[1]
    table = pa.table(
        {
            "path": paths,
            "label": [as_text(lab) for lab in rows["label"]],
            "size": [refs_by_path[p].size for p in paths],
            "mtime": [refs_by_path[p].mtime for p in paths],
            "error": [error_reason(e) for e in rows["error"]],
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(rows["embedding"].reshape(-1), pa.float32()), dim
            ),
        }
    )
    tmp = staging / f".part-{n:06d}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, staging / f"part-{n:06d}.parquet")


def _unchanged(ref: ImageRef, row: dict[str, Any] | None) -> bool:
    return row is not None and row["size"] == ref.size and row["mtime"] == ref.mtime


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
    _fail_after_parts: int | None = None,
) -> dict[str, Any]:
    """Embed every image under `data` with RUN's model, cluster, index; return a summary."""
    started = time.perf_counter()
    paths = RunPaths(Path(run).resolve())
    fingerprint = model_lib.fingerprint(paths.root)
    refs = list_images(data)
    refs_by_path = {r.path: r for r in refs}

    previous = {} if full else _read_previous(paths, fingerprint)
    staging = _staging_dir(paths, fingerprint)
    for old in paths.root.glob(".index-staging-*"):
        if old != staging:  # staging from another model is useless now
            shutil.rmtree(old, ignore_errors=True)
    if full:
        shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    staged = _read_staged(staging)

    rows: dict[str, dict[str, Any]] = {}
    todo: list[ImageRef] = []
    reused = resumed = 0
    for ref in refs:
        if _unchanged(ref, staged.get(ref.path)):
            rows[ref.path], resumed = staged[ref.path], resumed + 1
        elif _unchanged(ref, previous.get(ref.path)):
            rows[ref.path], reused = previous[ref.path], reused + 1
        else:
            todo.append(ref)
    removed = len(set(previous) - set(refs_by_path))
    log(
        f"[index] {len(refs)} images: {len(todo)} to embed, {reused} unchanged, {resumed} from an "
        f"interrupted run, {removed} removed"
    )

    times = StageTimes()
    if todo:
        ensure_ray()
        part = len(list(staging.glob("part-*.parquet")))
        ds = embed_images(data, str(paths.root), refs=todo, concurrency=concurrency, use_gpu=use_gpu)
        with bar(len(todo), desc="embedding", unit="img") as progress:
            for batch in ds.iter_batches(batch_size=STAGING_ROWS, batch_format="numpy"):
                times.add(batch)
                t0 = time.perf_counter()
                _write_part(staging, part, batch, refs_by_path)
                times.write += time.perf_counter() - t0
                part += 1
                progress.update(len(batch["path"]))
                for i, p in enumerate(batch["path"]):
                    err = error_reason(batch["error"][i])
                    rows[str(p)] = {
                        "path": str(p),
                        "label": as_text(batch["label"][i]),
                        "size": refs_by_path[str(p)].size,
                        "mtime": refs_by_path[str(p)].mtime,
                        "error": err,
                        "embedding": batch["embedding"][i] if err is None else None,
                    }
                if _fail_after_parts is not None and part >= _fail_after_parts:
                    raise RuntimeError(f"injected failure after {part} parts")
        log(f"[index] {times.summary()}")

    summary = _write_index(paths, refs, rows, fingerprint, data, clusters, metric, kind, nprobe)
    shutil.rmtree(staging, ignore_errors=True)
    summary.update(
        embedded=len(todo),
        reused=reused,
        resumed=resumed,
        removed=removed,
        seconds=round(time.perf_counter() - started, 1),
        stage_seconds={
            "read": round(times.read, 1),
            "decode": round(times.decode, 1),
            "encode": round(times.encode, 1),
            "write": round(times.write, 1),
        },
    )
    return summary


def _write_index(
    paths: RunPaths,
    refs: list[ImageRef],
    rows: dict[str, dict[str, Any]],
    fingerprint: str,
    data: str,
    clusters: int,
    metric: str,
    kind: str,
    nprobe: int,
) -> dict[str, Any]:
    good = [rows[r.path] for r in refs if rows[r.path]["error"] is None]
    bad = [rows[r.path] for r in refs if rows[r.path]["error"] is not None]
    if not good:
        raise ImgsimError(f"none of the {len(refs)} files under {data} could be used as an image")
    emb = np.stack([np.asarray(r["embedding"], dtype=np.float32) for r in good])
    clusterer = KMeansClusterer(clusters, metric=metric).fit(emb)
    index = KnnIndex(metric=metric, kind=kind, nprobe=nprobe).fit(emb)
    table = pa.table(
        {
            "path": pa.array([r["path"] for r in good], pa.string()),
            "label": pa.array([None if r["label"] is None else str(r["label"]) for r in good], pa.string()),
            "cluster": pa.array(clusterer.labels_, pa.int64()),
            "embedding": pa.array([list(e) for e in emb], pa.list_(pa.float32())),
        }
    )
    files = pa.table(
        {
            "path": [rows[r.path]["path"] for r in refs],
            "size": pa.array([int(rows[r.path]["size"]) for r in refs], pa.int64()),
            "mtime": pa.array([int(rows[r.path]["mtime"]) for r in refs], pa.int64()),
            "error": pa.array(
                [None if rows[r.path]["error"] is None else str(rows[r.path]["error"]) for r in refs],
                pa.string(),
            ),
            "label": pa.array(
                [None if rows[r.path]["label"] is None else str(rows[r.path]["label"]) for r in refs],
                pa.string(),
            ),
        }
    )
    manifest = {
        "data": data,
        "images": len(good),
        "skipped": len(bad),
        "model_fingerprint": fingerprint,
        "metric": metric,
        "index_kind": index.kind_,
        "clusters": int(len(clusterer.centroids_)),
        "dim": int(emb.shape[1]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    skipped_lines = "".join(json.dumps({"path": r["path"], "reason": str(r["error"])}) + "\n" for r in bad)
    index.save(
        paths.index_dir,
        model_fingerprint=fingerprint,
        extra_files={
            "embeddings.parquet": lambda p: pq.write_table(table, p),
            FILES: lambda p: pq.write_table(files, p),
            "skipped.jsonl": lambda p: p.write_text(skipped_lines),
            "kmeans": clusterer.save,
            "manifest.json": lambda p: p.write_text(json.dumps(manifest, indent=2)),
        },
    )
    return {
        "images": len(good),
        "skipped": len(bad),
        "skipped_path": str(paths.skipped),
        "clusters": manifest["clusters"],
        "index_kind": index.kind_,
        "metric": metric,
        "index_dir": str(paths.index_dir),
        "cluster_sizes": np.bincount(clusterer.labels_, minlength=manifest["clusters"]).tolist(),
    }


def main() -> None:
    d = DEFAULTS.index
    p = argparse.ArgumentParser(
        description="Embed, cluster and index DATA with RUN's model (see `imgsim index --help`)."
    )
    p.add_argument("data", metavar="DATA")
    p.add_argument("--model", required=True, metavar="RUN")
    p.add_argument("--clusters", type=int, default=d.clusters)
    p.add_argument("--metric", choices=["cosine", "l2"], default=d.metric)
    p.add_argument("--kind", choices=["auto", "exact", "ivf"], default=d.kind)
    p.add_argument("--nprobe", type=int, default=d.nprobe)
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--full", action="store_true")
    a = p.parse_args()
    summary = build_index(
        a.data,
        a.model,
        clusters=a.clusters,
        metric=a.metric,
        kind=a.kind,
        nprobe=a.nprobe,
        concurrency=a.concurrency,
        use_gpu=a.gpu,
        full=a.full,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
