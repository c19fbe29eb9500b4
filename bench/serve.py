"""Load benchmark for the Serve app against a 100K-image index, with an in-process baseline.

    .venv/bin/python -m bench.serve                       # 100K images, 30 s, 8 clients
    .venv/bin/python -m bench.serve --duration 10 --clients 16 --replicas 2 --json
    .venv/bin/python -m bench.serve --ingress proxy          # Ray Serve's own HTTP proxy

1. Builds (once, cached under --work) a run directory with a real model and a 100K-row index:
   the model is an (untrained, seeded) `imgsim.models.autoencoder.AutoEncoder` saved with `imgsim.models.autoencoder.save`;
   the embeddings are random but clustered vectors of the model's dimension; KMeans and the KNN
   index are fitted and saved with `imgsim.index.knn`; `embeddings.parquet` has the contract's columns.
   Writing 100K image files would dominate the run, so the rows point at a handful of real PNGs.
2. Baseline: `Searcher.search(png_bytes, k)` in this process (decode + embed + KNN, one query at a
   time), timed in the same run.
3. Starts a local Ray instance and the Serve app on a free loopback port, then runs a closed loop:
   `--clients` concurrent clients each POST the PNG as a multipart upload, for `--duration` seconds
   after a warm-up. Prints QPS, p50/p99 latency, errors, and the ratios to the baseline.

Targets on 2 CPU cores: 0 errors, upload p50 <= 20 ms, >= 200 QPS. The load generator shares the
cores with the server, so its own cost is part of the measurement.
"""

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# Run as `python bench/serve.py`, this file's folder comes first on sys.path, and this file is
# itself named serve.py: put the repository first so `serve` is the package.
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from bench.common import CACHE  # noqa: E402  (after the path fix above)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

BOUNDARY = "imgsim-bench-boundary"


def pattern_png(kind: int, seed: int, size: int = 32) -> bytes:
    """A small greyscale PNG: stripes, a blob or checks, with noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = [
        np.sin(xx * 6 * np.pi),
        np.sin(yy * 6 * np.pi),
        1.0 - 4 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2),
        np.sign(np.sin(xx * 4 * np.pi) * np.sin(yy * 4 * np.pi)),
    ][kind % 4] + rng.normal(0, 0.1, (size, size))
    arr = ((img - img.min()) / (np.ptp(img) + 1e-6) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def build_run(run: Path, n_images: int, n_pngs: int = 8, n_clusters: int = 4, seed: int = 0) -> Path:
    """A run directory with a real model and an `n_images`-row synthetic index (see the docstring)."""
    import pyarrow as pa
    import torch

    from imgsim.data.rows import embedding_array
    from imgsim.io.runs import RunPaths
    from imgsim.models import autoencoder as model_lib
    from pipelines.build_index import as_file_rows, write_index

    paths = RunPaths(run)
    marker = paths.index_dir / f"bench-{n_images}.ok"
    if marker.is_file():
        try:  # reuse the cached run while the current code can still load it
            from imgsim.index.search import Searcher

            Searcher.load(paths.root)
            return paths.root
        except Exception as e:
            print(f"[bench] rebuilding the cached run ({type(e).__name__}: {str(e)[:80]})")
    torch.manual_seed(seed)
    model = model_lib.AutoEncoder(model_lib.ModelConfig())
    model_lib.save(model, paths.root)
    fingerprint = model_lib.fingerprint(paths.root)
    dim = model.config.dim

    png_dir = paths.root / "bench-images"
    png_dir.mkdir(parents=True, exist_ok=True)
    pngs = []
    for i in range(n_pngs):
        file = png_dir / f"pattern-{i}.png"
        file.write_bytes(pattern_png(i % 4, seed=i))
        pngs.append(str(file))

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, dim)).astype(np.float32)
    assign = rng.integers(0, len(centres), n_images)
    emb = centres[assign] + 0.35 * rng.normal(size=(n_images, dim)).astype(np.float32)
    t0 = time.perf_counter()
    rows = as_file_rows(
        pa.table(
            {
                "path": pa.array([pngs[i % n_pngs] for i in range(n_images)], pa.string()),
                "label": pa.array([f"group-{a % 10}" for a in assign], pa.string()),
                "embedding": embedding_array(emb),
            }
        )
    )
    summary = write_index(
        paths,
        rows,
        fingerprint,
        "synthetic (bench/serve.py)",
        clusters=n_clusters,
        metric="cosine",
        kind="auto",
    )
    print(
        f"[bench] fitted KMeans + {summary['index_kind']} KNN on {n_images:,} x {dim} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    marker.write_text("ok\n")
    return paths.root


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def baseline(run: Path, png: bytes, k: int, seconds: float) -> dict[str, float]:
    """In-process `Searcher.search` on the same bytes, one query at a time."""
    import torch

    from imgsim.index.search import Searcher

    torch.set_num_threads(1)
    searcher = Searcher.load(run)
    for _ in range(20):
        searcher.search(png, k=k)
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        searcher.search(png, k=k)
        times.append((time.perf_counter() - t0) * 1000)
    return {
        "p50_ms": percentile(times, 50),
        "p99_ms": percentile(times, 99),
        "qps": 1000 / statistics.mean(times),
    }


def cpu_by_role() -> dict[str, float]:
    """CPU seconds used so far by this process (the load generator) and by the Ray processes it
    started, grouped: replica, proxy, controller, HAProxy, other Ray processes."""
    import psutil

    me = psutil.Process()
    totals = {"client": sum(me.cpu_times()[:2])}
    for child in me.children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            used = sum(child.cpu_times()[:2])
        except psutil.Error:
            continue
        role = (
            "replica"
            if "ServeReplica" in cmd
            else "proxy"
            if "ProxyActor" in cmd
            else "controller"
            if "ServeController" in cmd
            else "haproxy"
            if "haproxy" in cmd.split(" ")[0]
            else "ray-other"
        )
        totals[role] = totals.get(role, 0.0) + used
    return totals


def multipart_body(png: bytes) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="query.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


async def load(url: str, body: bytes, clients: int, warmup_s: float, duration_s: float) -> dict[str, Any]:
    """Closed loop: `clients` tasks, each with its own keep-alive connection, posting `body`."""
    import aiohttp

    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    latencies: list[float] = []
    server_ms: list[float] = []
    errors: dict[str, int] = {}
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async def client() -> None:
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            while (now := time.perf_counter()) < stop_at:
                t0 = now
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        payload = await response.read()
                        ok = response.status == 200
                        key = f"HTTP {response.status}"
                except aiohttp.ClientError as e:
                    ok, key, payload = False, type(e).__name__, b""
                t1 = time.perf_counter()
                if t0 < measure_from:
                    continue
                if ok:
                    latencies.append((t1 - t0) * 1000)
                    server_ms.append(json.loads(payload)["took_ms"])
                else:
                    errors[key] = errors.get(key, 0) + 1

    async def cpu_probe() -> None:
        nonlocal cpu_start
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        cpu_start = cpu_by_role()

    cpu_start: dict[str, float] = {}
    await asyncio.gather(cpu_probe(), *(client() for _ in range(clients)))
    cpu_end = cpu_by_role()
    n = len(latencies) + sum(errors.values())
    cpu_ms = {
        role: round((cpu_end.get(role, 0.0) - cpu_start.get(role, 0.0)) * 1000 / max(1, n), 2)
        for role in cpu_end
    }
    return {
        "requests": n,
        "qps": len(latencies) / duration_s,
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "server_p50_ms": percentile(server_ms, 50),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "cpu_ms_per_request": cpu_ms,
    }


def main() -> None:
    from imgsim.config import DEFAULTS, INGRESS_CHOICES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100_000, help="rows in the synthetic index")
    p.add_argument("--work", default=str(CACHE / "serve"), help="where the run directory is cached")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds of load")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring")
    p.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per replica")
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--batch-wait-ms", type=float, default=None)
    p.add_argument("--baseline-seconds", type=float, default=5.0)
    p.add_argument(
        "--ingress",
        choices=INGRESS_CHOICES,
        default=DEFAULTS.serve.ingress,
        help="HTTP front end, as `imgsim serve --ingress` (auto: haproxy when installed)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = p.parse_args()

    from serve import ingress

    front_end = ingress.apply(args.ingress)  # before Ray starts: its processes read the environment
    print(f"[bench] HTTP front end: {front_end}")

    import ray
    from PIL import Image
    from ray import serve

    from serve.app import BATCH_WAIT_TIMEOUT_S, MAX_BATCH_SIZE, build_app

    run = build_run(Path(args.work) / f"run-{args.images}", args.images)
    png_path = sorted((run / "bench-images").glob("*.png"))[0]
    png = png_path.read_bytes()
    assert Image.open(io.BytesIO(png)).size == (32, 32)

    base = baseline(run, png, args.k, args.baseline_seconds)
    print(
        f"[bench] in-process Searcher.search: p50 {base['p50_ms']:.2f} ms, p99 {base['p99_ms']:.2f} ms, "
        f"{base['qps']:.0f} queries/s serially"
    )

    max_batch_size = args.max_batch_size or MAX_BATCH_SIZE
    batch_wait_s = args.batch_wait_ms / 1000 if args.batch_wait_ms is not None else BATCH_WAIT_TIMEOUT_S
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    try:
        port = _free_port()
        serve.start(
            http_options={"host": "127.0.0.1", "port": port},
            logging_config={"enable_access_log": False, "log_level": "WARNING"},
        )
        serve.run(
            build_app(
                run,
                replicas=args.replicas,
                num_cpus=args.num_cpus,
                max_batch_size=max_batch_size,
                batch_wait_timeout_s=batch_wait_s,
            ),
            name="imgsim-bench",
            route_prefix="/",
            logging_config={"enable_access_log": False, "log_level": "WARNING"},
        )
        url = f"http://127.0.0.1:{port}/search?k={args.k}"
        result = asyncio.run(load(url, multipart_body(png), args.clients, args.warmup, args.duration))
    finally:
        serve.shutdown()
        ray.shutdown()

    summary = {
        "images": args.images,
        "ingress": front_end,
        "clients": args.clients,
        "duration_s": args.duration,
        "replicas": args.replicas,
        "max_batch_size": max_batch_size,
        "batch_wait_ms": batch_wait_s * 1000,
        "cpu_cores": os.cpu_count(),
        "baseline_p50_ms": round(base["p50_ms"], 3),
        "baseline_qps_serial": round(base["qps"], 1),
        **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()},
        "p50_vs_baseline": round(result["p50_ms"] / base["p50_ms"], 2),
        "qps_vs_baseline": round(result["qps"] / base["qps"], 2),
    }
    print(
        f"[bench] HTTP upload ({args.clients} clients, {args.duration:g} s, {args.images:,} images): "
        f"{result['qps']:.0f} QPS, p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
        f"{result['errors']} errors {result['error_kinds'] or ''}"
    )
    print(
        f"[bench] vs in-process Searcher.search: p50 x{summary['p50_vs_baseline']}, "
        f"throughput x{summary['qps_vs_baseline']} (server-side p50 {result['server_p50_ms']:.1f} ms)"
    )
    cpu = result["cpu_ms_per_request"]
    print(
        f"[bench] CPU per request: {sum(cpu.values()):.1f} ms in all ("
        + ", ".join(f"{role} {ms:.1f}" for role, ms in sorted(cpu.items(), key=lambda x: -x[1]))
        + f"); {os.cpu_count()} cores => at most ~{1000 * (os.cpu_count() or 1) / max(0.1, sum(cpu.values())):.0f} QPS"
    )
    targets = result["errors"] == 0 and result["p50_ms"] <= 20 and result["qps"] >= 200
    print(f"[bench] targets (0 errors, p50 <= 20 ms, >= 200 QPS): {'met' if targets else 'NOT met'}")
    if args.json:
        print(json.dumps(summary))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    main()
