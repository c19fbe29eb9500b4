"""Duplicates at scale and on real photos, each figure measured in this run.

- scale: N (default 1M) 64-d embeddings with planted duplicate groups, grouped by
  `imgsim.duplicates.groups.group_embeddings` on an IVF `KnnIndex` (range search, complete linkage): seconds
  (index build and grouping), the process's peak RSS, and pair precision / recall against the planted
  groups. The background is clustered (a mixture of 2,000 directions), so the index partitions are
  uneven and neighbours are near, as in real collections; every planted group's members lie within a
  quarter of the threshold of its base vector, and the threshold is fixed (this part measures scale).
- photos: textured 256 px tiles of real photos (the wallpapers and sample photos bench/generality.py
  finds offline), non-overlapping, so no tile is a crop of another; a share of them gets planted edited copies (`imgsim.evaluation.edits`: `mix` and single trained
  edits). The real pipeline runs with defaults: `imgsim train`, `imgsim index`, then `imgsim
  duplicates` with its default calibrated threshold; pair precision / recall of the groups against
  the planted pairs (a pair of byte-identical tiles, should any exist, counts as planted too).

    nice -n 10 .venv/bin/python -m bench.duplicates --part scale            # ~2-3 min, 1M vectors
    nice -n 10 .venv/bin/python -m bench.duplicates --part photos           # ~10 min: trains a model
    nice -n 10 .venv/bin/python -m bench.duplicates --part photos --model RUN   # an existing model
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import CACHE
from imgsim.duplicates.groups import group_embeddings
from imgsim.index.knn import KnnIndex


# -- pair scoring ------------------------------------------------------------------------------------
def pair_codes(groups: list[np.ndarray]) -> np.ndarray:
    """Every within-group pair as one int64 (lo << 32 | hi), sorted."""
    codes = []
    for g in groups:
        g = np.sort(np.asarray(g, np.int64))
        i, j = np.triu_indices(len(g), k=1)
        codes.append((g[i] << 32) | g[j])
    return np.unique(np.concatenate(codes)) if codes else np.zeros(0, np.int64)


def pair_scores(found: list[np.ndarray], planted: list[np.ndarray]) -> dict[str, float | int]:
    got, want = pair_codes(found), pair_codes(planted)
    hit = len(np.intersect1d(got, want, assume_unique=True))
    return {
        "pairs_found": len(got),
        "pairs_planted": len(want),
        "pair_precision": round(hit / max(len(got), 1), 4),
        "pair_recall": round(hit / max(len(want), 1), 4),
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


# -- part 1: scale -------------------------------------------------------------------------------------
def planted_embeddings(
    n: int, dim: int, groups: int, threshold: float, seed: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(N x dim unit vectors, planted groups of row numbers): clustered background plus `groups`
    groups of 2-5 near-copies, each member within threshold/4 (cosine) of its group's base."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    emb = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):  # background: a centre plus noise (cosine ~0.1 from it)
        stop = min(n, start + 100_000)
        part = centres[rng.integers(0, len(centres), stop - start)]
        part += 0.05 * rng.standard_normal((stop - start, dim)).astype(np.float32)
        emb[start:stop] = part / np.linalg.norm(part, axis=1, keepdims=True)
    sizes = rng.integers(2, 6, groups)
    rows = rng.permutation(n)[: int(sizes.sum())]
    planted, at = [], 0
    # a member m = normalise(base + e) with |e| = r has cosine distance ~ r^2 / 2 from the base
    radius = float(np.sqrt(2 * threshold / 4))
    for size in sizes:
        members = rows[at : at + size]
        at += size
        base = emb[members[0]]
        for m in members[1:]:
            e = rng.standard_normal(dim).astype(np.float32)
            e -= e.dot(base) * base
            v = base + e / np.linalg.norm(e) * radius * rng.uniform(0.3, 1.0)
            emb[m] = v / np.linalg.norm(v)
        planted.append(members)
    return emb, planted


def scale_part(
    n: int, groups: int, threshold: float, seed: int, nprobe: int | None, nlist: int | None
) -> dict:
    t0 = time.perf_counter()
    emb, planted = planted_embeddings(n, 64, groups, threshold, seed)
    generate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = KnnIndex(metric="cosine", kind="ivf", nlist=nlist).fit(emb)
    index_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    found = group_embeddings(emb, threshold, index=index, nprobe=nprobe)
    group_s = time.perf_counter() - t0
    return {
        "part": "scale",
        "vectors": n,
        "dim": 64,
        "planted_groups": groups,
        "planted_images": int(sum(len(g) for g in planted)),
        "threshold": threshold,
        "index": f"ivf nlist={index.nlist_} nprobe={nprobe or index.nprobe}",
        "groups_found": len(found),
        **pair_scores(found, planted),
        "generate_s": round(generate_s, 1),
        "index_s": round(index_s, 1),
        "group_s": round(group_s, 1),
        "total_s": round(index_s + group_s, 1),
        "cpu_s": round(time.process_time(), 1),
        "peak_rss_mb": round(peak_rss_mb()),
    }


# -- part 2: real photos ------------------------------------------------------------------------------
def photo_tiles(out: Path, tile: int, seed: int) -> list[Path]:
    """Textured `tile` px JPEG tiles of every photo bench.generality finds: each photo scaled to a
    longer side of 2048 px and cut into non-overlapping tiles (no tile is a crop of another, so the
    only duplicates are the planted ones); flat tiles (sky, blur) are left out."""
    from PIL import Image

    from bench.generality import photo_sources

    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("*.jpg"))
    if existing:
        return existing
    files = []
    for name, path in sorted(photo_sources(CACHE / "skdata" / "skimage" / "data").items()):
        with Image.open(path) as src:
            src.draft("RGB", (4096, 4096))
            img = src.convert("RGB")
        scale = 2048 / max(img.size)
        if scale < 1:
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
        for y in range(0, img.height - tile + 1, tile):
            for x in range(0, img.width - tile + 1, tile):
                piece = img.crop((x, y, x + tile, y + tile))
                grey = np.asarray(piece.convert("L").resize((64, 64)), np.float32)
                texture = float(np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean())
                if texture >= 3.0:
                    file = out / f"{name}_{x}_{y}.jpg"
                    piece.save(file, quality=90)
                    files.append(file)
    return sorted(files)


def plant_copies(tiles: list[Path], out: Path, share: float, seed: int) -> list[list[Path]]:
    """Copies of a `share` of the tiles into `out`: a `mix` copy each, and for a third of them a second
    copy under one single trained edit; the planted groups (original first)."""
    from imgsim.evaluation.edits import TRAINED_EDITS, edit_bytes

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    chosen = rng.permutation(len(tiles))[: round(share * len(tiles))]
    groups = []
    for n, i in enumerate(sorted(chosen)):
        original = tiles[i]
        edits = ["mix"] + ([str(rng.choice([e for e in TRAINED_EDITS if e != "mix"]))] if n % 3 == 0 else [])
        members = [original]
        for j, edit in enumerate(edits):
            data = edit_bytes(original.read_bytes(), edit, np.random.default_rng([seed, int(i), j]))
            ext = {b"\xff\xd8": ".jpg", b"\x89P": ".png"}.get(data[:2], ".img")
            copy = out / f"{original.stem}-{edit}{ext}"
            copy.write_bytes(data)
            members.append(copy)
        groups.append(members)
    return groups


def imgsim(*args: str) -> dict:
    """The real `imgsim` command with --json: its summary (stderr shown only on failure)."""
    cmd = [str(Path(sys.executable).parent / "imgsim"), *args, "--json"]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if "INFO" not in line]
        sys.exit(f"{' '.join(cmd)} failed (exit {done.returncode}):\n" + "\n".join(lines[-25:]))
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["_wall_s"] = round(time.perf_counter() - started, 1)
    return result


def photos_part(
    work: Path, share: float, seed: int, model: Path | None, epochs: int | None, keep_model: bool = False
) -> dict:
    data = work / "data"
    tiles = photo_tiles(data / "tiles", 256, seed)
    shutil.rmtree(data / "copies", ignore_errors=True)
    planted_files = plant_copies(tiles, data / "copies", share, seed)
    run = work / "run"
    train_s = None
    if model is None:
        if not keep_model:  # train with this imgsim's defaults, not whatever an earlier run left
            shutil.rmtree(run, ignore_errors=True)
        if not (run / "model" / "model.pt").is_file():
            args = ["train", str(data), "--out", str(run)] + (["--epochs", str(epochs)] if epochs else [])
            train_s = imgsim(*args)["_wall_s"]
    else:
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(Path(model) / "model", run / "model")
    index = imgsim("index", str(data), "--model", str(run))
    shutil.rmtree(run / "duplicates", ignore_errors=True)  # calibrate afresh for this collection
    summary = imgsim("duplicates", "--model", str(run))
    groups = [json.loads(line) for line in Path(summary["files"]["jsonl"]).read_text().splitlines()]
    ids = {str(p): i for i, p in enumerate(sorted({str(p) for p in data.rglob("*") if p.is_file()}))}
    found = [np.array([ids[m["path"]] for m in g["members"]]) for g in groups]
    planted = [np.array([ids[str(p)] for p in g]) for g in planted_files]
    cal = summary["calibration"] or {}
    sweep = threshold_sweep(run, ids, planted)
    return {
        "part": "photos",
        "tiles": len(tiles),
        "planted_groups": len(planted),
        "images": summary["images"],
        "threshold": summary["threshold"],
        "threshold_source": summary["threshold_source"],
        "calibration": {
            k: cal.get(k) for k in ("precision_target", "precision", "recall", "queries", "set_aside")
        },
        "groups_found": summary["groups"],
        **pair_scores(found, planted),
        "any_threshold": sweep,
        "train_s": train_s,
        "index_s": index["_wall_s"],
        "duplicates_s": summary["_wall_s"],
        "stage_seconds": summary.get("stage_seconds"),
        "verification": summary.get("verification"),
        "model": str(model) if model else f"imgsim train defaults{f', --epochs {epochs}' if epochs else ''}",
    }


def threshold_sweep(run: Path, ids: dict[str, int], planted: list[np.ndarray]) -> dict:
    """What the run's embedding allows at any threshold: the same grouping (exact index over the
    run's embeddings, byte-identical files together) at 60 thresholds; the best recall with pair
    precision >= 0.95 and the best precision with recall >= 0.90."""
    from imgsim.duplicates.groups import Collection

    collection = Collection.read(run)
    rows = np.array([ids[p] for p in collection.paths])
    index = KnnIndex(metric="cosine", kind="exact").fit(collection.emb)
    points = []
    for t in np.geomspace(1e-4, 0.5, 60):
        found = group_embeddings(collection.emb, float(t), index=index, content_hashes=collection.hashes)
        scores = pair_scores([rows[g] for g in found], planted)
        points.append((float(t), scores["pair_precision"], scores["pair_recall"]))
    precise = [p for p in points if p[1] >= 0.95]
    recalled = [p for p in points if p[2] >= 0.90]
    best_recall = max(precise, key=lambda p: p[2]) if precise else None
    best_precision = max(recalled, key=lambda p: p[1]) if recalled else None
    return {
        "recall_at_precision_0.95": None
        if best_recall is None
        else {"threshold": round(best_recall[0], 5), "recall": best_recall[2]},
        "precision_at_recall_0.90": None
        if best_precision is None
        else {"threshold": round(best_precision[0], 5), "precision": best_precision[1]},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["scale", "photos", "both"], default="both")
    p.add_argument("--n", type=int, default=1_000_000, help="scale: vectors")
    p.add_argument("--groups", type=int, default=20_000, help="scale: planted groups (2-5 vectors each)")
    p.add_argument("--threshold", type=float, default=0.02, help="scale: cosine distance threshold")
    p.add_argument(
        "--nprobe", type=int, default=None, help="scale: IVF partitions searched (default the index's)"
    )
    p.add_argument(
        "--nlist", type=int, default=None, help="scale: IVF partitions (default the index's, 2 sqrt(N))"
    )
    p.add_argument("--work", type=Path, default=CACHE / "duplicates", help="photos: working folder")
    p.add_argument("--share", type=float, default=0.25, help="photos: share of tiles given planted copies")
    p.add_argument(
        "--model", type=Path, default=None, help="photos: use this run's model instead of training"
    )
    p.add_argument("--epochs", type=int, default=None, help="photos: training epochs (default: train's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--keep-model", action="store_true", help="photos: reuse the model an earlier run of --work trained"
    )
    a = p.parse_args()
    results = []
    if a.part in ("scale", "both"):
        results.append(scale_part(a.n, a.groups, a.threshold, a.seed, a.nprobe, a.nlist))
        print(json.dumps(results[-1]), flush=True)
    if a.part in ("photos", "both"):
        results.append(photos_part(a.work, a.share, a.seed, a.model, a.epochs, a.keep_model))
        print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
