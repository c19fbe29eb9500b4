"""`imgsim index` at N images, end to end: throughput, driver memory, index size, re-index, serving.

    .venv/bin/python -m bench.scale                  # N = 20,000: a quick run
    .venv/bin/python -m bench.scale --n 1000000      # the real one (images generated once, cached)
    .venv/bin/python -m bench.scale --n 1000000 --json

1. Generates N distinct 32×32 greyscale PNGs once into `--cache` (default bench-cache/scale, outside
   git): `n<N>/d<folder>/<id>.png`, 1,000 per folder, written by parallel processes. Every 100th
   image is a planted near-duplicate of the one before it (a brightness shift and a few changed
   pixels); every other image is distinct (its id is written into three pixels). Another 1 % of new
   images waits in `n<N>-added/` for the re-index step.
2. A model: `--model RUN`, else one trained once (`imgsim train`, 2 epochs) on 10,000 images
   generated the same way, and cached.
3. `imgsim index` from scratch, as a subprocess: wall time, images/s, the driver's peak RSS (its
   RSS sampled with psutil every 0.2 s, children excluded: the Ray workers are measured apart),
   the size of `embeddings.parquet`.
4. `Searcher.load` in a fresh process: seconds and RSS.
5. A Serve replica (`imgsim serve`, one replica) at that size: its RSS, and the p50 of sequential
   and of 8-client uploads.
6. 1 % more images moved into DATA, `imgsim index` again: seconds, and as a share of step 3.
7. `imgsim duplicates` if this imgsim has it.

Targets on 2 cores at 1M: index >= 3,000 img/s end to end, driver peak RSS <= 2 GB, re-index after
+1 % <= 5 % of the full run, a replica <= 1.5 GB RSS with p50 <= 20 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import CACHE

REPO = Path(__file__).resolve().parent.parent
PER_FOLDER = 1000
NEAR_DUPLICATE_EVERY = 100  # image i with i % 100 == 99 is a near-copy of image i - 1
SIZE = 32
TRAIN_SAMPLE = 10_000
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TQDM_DISABLE": "1"}


# -- images ------------------------------------------------------------------------------------------
def _pattern(rng: np.random.Generator) -> np.ndarray:
    """A structured 32×32 greyscale image (stripes, rings, checks, blobs, gradients) with noise."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    kind = int(rng.integers(0, 5))
    f, phase, angle = rng.uniform(2, 8), rng.uniform(0, 1), rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    if kind == 0:
        img = np.sin((u + phase) * f * np.pi)
    elif kind == 1:
        cx, cy = rng.uniform(0.2, 0.8, 2)
        img = np.cos(np.hypot(xx - cx, yy - cy) * f * 2 * np.pi)
    elif kind == 2:
        img = np.sign(np.sin((xx + phase) * f * np.pi) * np.sin((yy + phase) * f * np.pi))
    elif kind == 3:
        img = np.zeros_like(xx)
        for _ in range(int(rng.integers(1, 4))):
            cx, cy, r = *rng.uniform(0.1, 0.9, 2), rng.uniform(0.1, 0.3)
            img += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    else:
        img = u + 0.3 * np.sin(yy * f * np.pi)
    img = img + rng.normal(0, 0.08, img.shape)
    return np.clip((img - img.min()) / (np.ptp(img) + 1e-6) * 255, 0, 255).astype(np.uint8)


def image_array(i: int, seed: int = 0) -> np.ndarray:
    """Image `i` of the generated collection (planted near-duplicates included)."""
    if i % NEAR_DUPLICATE_EVERY == NEAR_DUPLICATE_EVERY - 1:
        rng = np.random.default_rng([seed, i])
        arr = image_array(i - 1, seed).astype(np.int16) + int(rng.integers(4, 12))
        idx = rng.integers(0, SIZE, (6, 2))
        arr[idx[:, 0], idx[:, 1]] = rng.integers(0, 256, 6)
        return np.clip(arr, 0, 255).astype(np.uint8)
    arr = _pattern(np.random.default_rng([seed, i]))
    arr[0, :3] = [(i >> 16) & 255, (i >> 8) & 255, i & 255]  # distinct bytes for every id
    return arr


def image_path(root: Path, i: int) -> Path:
    return root / f"d{i // PER_FOLDER:05d}" / f"{i:07d}.png"


def _write_folder(root: str, folder: int, start: int, stop: int) -> int:
    """Images of one folder (ids start..stop-1); a marker file says the folder is complete."""
    from PIL import Image

    directory = Path(root) / f"d{folder:05d}"
    marker = directory / ".complete"
    if marker.is_file():
        return 0
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(start, stop):
        Image.fromarray(image_array(i)).save(directory / f"{i:07d}.png", format="PNG", compress_level=1)
    marker.write_text(f"{stop - start}\n")
    return stop - start


def generate(root: Path, start: int, stop: int, workers: int) -> float:
    """Images start..stop-1 under `root` (those already there are kept); seconds taken."""
    marker = root / f".complete-{start}-{stop}"
    if marker.is_file():
        return 0.0
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        jobs = [
            pool.submit(
                _write_folder, str(root), f, max(start, f * PER_FOLDER), min(stop, (f + 1) * PER_FOLDER)
            )
            for f in range(start // PER_FOLDER, -(-stop // PER_FOLDER))
        ]
        done = sum(job.result() for job in jobs)
    marker.write_text(f"{stop - start}\n")
    took = time.perf_counter() - t0
    print(f"[scale] generated {done:,} images in {took:.0f} s under {root}", flush=True)
    return took


# -- measuring -----------------------------------------------------------------------------------------
def imgsim(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "imgsim"), *args]


def run_measured(cmd: list[str], log: Path) -> dict[str, float]:
    """Run `cmd`; wall seconds and the peak RSS of its own process (sampled every 0.2 s), in MB."""
    import psutil

    with log.open("w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=REPO)
        ps = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, ps.memory_info().rss)
            time.sleep(0.2)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {log.read_text()[-2000:]}")
    return {"seconds": round(wall, 1), "peak_rss_mb": round(peak / 2**20)}


def ensure_model(cache: Path, model: str | None) -> Path:
    """`--model`, else a model trained once (2 epochs) on the first TRAIN_SAMPLE generated images."""
    if model:
        return Path(model)
    run = cache / "trained"  # (a run directory named "model" would be taken for its model/ folder)
    if (run / "model" / "model.pt").is_file():
        return run
    sample = cache / "train-sample"
    generate(sample, 0, TRAIN_SAMPLE, 2)
    took = run_measured(imgsim("train", str(sample), "--out", str(run), "--epochs", "2"), cache / "train.log")
    print(f"[scale] trained the model on {TRAIN_SAMPLE:,} images in {took['seconds']:.0f} s", flush=True)
    return run


def fresh_run(model: Path, run: Path) -> Path:
    """A run directory holding only `model`'s model (no index, no staging)."""
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(model / "model", run / "model")
    return run


def searcher_load(run: Path) -> dict[str, float]:
    """`Searcher.load(run)` in a fresh process: seconds, and its RSS before and after, in MB."""
    code = (
        "import json, time, psutil; from imgsim import Searcher; p = psutil.Process(); "
        f"before = p.memory_info().rss; t0 = time.perf_counter(); s = Searcher.load({str(run)!r}); "
        "took = time.perf_counter() - t0; s.search(s.paths[0], k=10); "
        "print(json.dumps({'seconds': round(took, 2), 'rss_mb': round(p.memory_info().rss / 2**20), "
        "'rss_added_mb': round((p.memory_info().rss - before) / 2**20), 'images': len(s)}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def serve_figures(run: Path, work: Path, query: Path, clients: int, duration: float) -> dict[str, Any]:
    """One replica of `imgsim serve` on `run`: its RSS and the p50 of sequential and concurrent uploads."""
    import asyncio

    import psutil
    import requests

    from bench.serve import load, multipart_body

    port = _free_port()
    log = (work / "serve.log").open("w")
    proc = subprocess.Popen(
        imgsim("serve", "--model", str(run), "--port", str(port), "--replicas", "1"),
        stdout=log, stderr=subprocess.STDOUT, env={k: v for k, v in ENV.items() if k != "RAY_ADDRESS"},
        start_new_session=True, cwd=REPO,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    tree: list[psutil.Process] = []
    try:
        t0 = time.perf_counter()
        while True:
            if proc.poll() is not None:
                raise RuntimeError((work / "serve.log").read_text()[-2000:])
            try:
                if requests.get(base + "/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        ready = time.perf_counter() - t0
        body = query.read_bytes()
        url = base + "/search?k=10"
        for _ in range(20):  # warm-up (HAProxy picks up the replica, first batches)
            requests.post(url, files={"image": ("q.png", body)}, timeout=60)
        sequential = []
        for _ in range(200):
            t1 = time.perf_counter()
            r = requests.post(url, files={"image": ("q.png", body)}, timeout=60)
            sequential.append((time.perf_counter() - t1) * 1000)
            assert r.status_code == 200, r.text
        loaded = asyncio.run(load(url, multipart_body(body), clients, 2.0, duration))
        replicas = [
            p
            for p in psutil.Process(proc.pid).children(recursive=True)
            if "ServeReplica" in " ".join(p.cmdline()[:1])
        ]
        rss = max(p.memory_info().rss for p in replicas) if replicas else 0
        return {
            "ready_seconds": round(ready, 1),
            "replica_rss_mb": round(rss / 2**20),
            "p50_ms_sequential": round(float(np.percentile(sequential, 50)), 1),
            "p50_ms_loaded": round(loaded["p50_ms"], 1),
            "qps_loaded": round(loaded["qps"], 1),
            "clients": clients,
            "errors": loaded["errors"],
        }
    finally:
        import signal

        with contextlib.suppress(psutil.Error):  # Ray's processes, to wait for below
            tree = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        # the next step (re-index) is timed: Ray's raylet, GCS and workers must be gone, not still
        # shutting down on the same two cores
        _, alive = psutil.wait_procs(tree, timeout=60)
        for leftover in alive:
            with contextlib.suppress(psutil.Error):
                leftover.kill()
        log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def has_duplicates_command() -> bool:
    done = subprocess.run(imgsim("duplicates", "--help"), capture_output=True, env=ENV, cwd=REPO)
    return done.returncode == 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20_000, help="images to index")
    p.add_argument("--cache", default=str(CACHE / "scale"), help="where images, model and runs are kept")
    p.add_argument("--model", default=None, help="a run directory with a trained model (default: train one)")
    p.add_argument("--writers", type=int, default=3, help="processes writing the images")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients for the loaded p50")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of concurrent load")
    p.add_argument("--skip-serve", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = p.parse_args()

    import psutil

    cache = Path(args.cache)
    data, added = cache / f"n{args.n}", cache / f"n{args.n}-added"
    extra = max(1, args.n // 100)
    for folder in sorted(data.glob("d*")):  # a run interrupted during step 6 left them in DATA
        if int(folder.name[1:]) * PER_FOLDER >= args.n:
            added.mkdir(parents=True, exist_ok=True)
            folder.rename(added / folder.name)
    generate(data, 0, args.n, args.writers)
    generate(added, args.n, args.n + extra, args.writers)
    model = ensure_model(cache, args.model)
    work = cache / f"run-{args.n}"
    run = fresh_run(model, work / "run")
    load_before = os.getloadavg()
    print(
        f"[scale] {args.n:,} images, load average {load_before[0]:.1f} on {os.cpu_count()} cores", flush=True
    )

    full = run_measured(imgsim("index", str(data), "--model", str(run)), work / "index.log")
    full["images_per_s"] = round(args.n / full["seconds"])
    full["parquet_mb"] = round((run / "index" / "embeddings.parquet").stat().st_size / 2**20, 1)
    full["index_dir_mb"] = round(
        sum(f.stat().st_size for f in (run / "index").rglob("*") if f.is_file()) / 2**20, 1
    )
    print(f"[scale] imgsim index: {full}", flush=True)

    loaded = searcher_load(run)
    print(f"[scale] Searcher.load: {loaded}", flush=True)
    served: dict[str, Any] = {}
    if not args.skip_serve:
        served = serve_figures(run, work, image_path(data, 0), args.clients, args.duration)
        print(f"[scale] serve: {served}", flush=True)

    moved = []
    try:
        for folder in sorted(added.glob("d*")):
            folder.rename(data / folder.name)
            moved.append(folder.name)
        again = run_measured(imgsim("index", str(data), "--model", str(run)), work / "reindex.log")
    finally:
        for name in moved:
            (data / name).rename(added / name)
    again["added"] = extra
    again["share_of_full"] = round(again["seconds"] / full["seconds"], 3)
    print(f"[scale] re-index after +{extra:,} images: {again}", flush=True)

    duplicates: dict[str, Any] = {}
    if has_duplicates_command():
        duplicates = run_measured(
            imgsim("duplicates", "--model", str(run), "--out", str(work / "duplicates")),
            work / "duplicates.log",
        )
        print(f"[scale] imgsim duplicates: {duplicates}", flush=True)

    summary = {
        "n": args.n,
        "date": time.strftime("%Y-%m-%d"),
        "cpu_cores": os.cpu_count(),
        "load_average_start": round(load_before[0], 1),
        "load_average_end": round(os.getloadavg()[0], 1),
        "memory_gb": round(psutil.virtual_memory().total / 2**30),
        "index": full,
        "searcher_load": loaded,
        "serve": served,
        "reindex": again,
        "duplicates": duplicates or None,
    }
    targets = {
        "index >= 3000 img/s": full["images_per_s"] >= 3000,
        "driver peak RSS <= 2 GB": full["peak_rss_mb"] <= 2048,
        "re-index +1% <= 5% of full": again["share_of_full"] <= 0.05,
    }
    if served:
        targets["replica RSS <= 1.5 GB"] = served["replica_rss_mb"] <= 1536
        targets["p50 <= 20 ms"] = served["p50_ms_sequential"] <= 20
    summary["targets"] = targets
    for name, ok in targets.items():
        print(f"[scale] target {name}: {'met' if ok else 'NOT met'}")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
