"""Search speed and recall: 1M clustered 64-d vectors; exact vs partitioned (IVF) vs the original
design's search within the query's cluster. Latency is one query at a time (p50/p99); recall@10 is
against exact search, all measured in this run.

    .venv/bin/python -m bench.search --n 1000000
"""

from __future__ import annotations

import argparse
import os
import time

import faiss
import numpy as np

from imgsim.index import KMeansClusterer, KnnIndex


def clustered(n: int, dim: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian mixture: real embeddings are clumpy, not uniform noise."""
    which = rng.integers(0, len(centres), n)
    spread = rng.uniform(0.5, 1.5, len(centres))[which, None]
    return (centres[which] + rng.normal(size=(n, dim)).astype(np.float32) * spread).astype(np.float32)


def latency(fn, queries: np.ndarray) -> tuple[float, float, float]:  # noqa: ANN001
    times = []
    for q in queries:
        t = time.perf_counter()
        fn(q[None])
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), float(len(queries) / (ms.sum() / 1000))


def recall(exact_ids: np.ndarray, ids: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(exact_ids, ids, strict=True)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--centres", type=int, default=2000)
    p.add_argument("--k", type=int, default=10)
    a = p.parse_args()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(a.centres, a.dim)).astype(np.float32) * 4
    x = clustered(a.n, a.dim, centres, rng)
    q = clustered(a.queries, a.dim, centres, rng)
    print(
        f"search: {a.n:,} x {a.dim}-d clustered vectors, {a.queries} held-out queries, k={a.k}, "
        f"{os.cpu_count()} cores, cosine"
    )

    t = time.perf_counter()
    exact = KnnIndex(kind="exact").fit(x)
    print(f"  build exact: {time.perf_counter() - t:.1f} s")
    exact_ids = exact.search(q, a.k)[1]
    p50, p99, qps = latency(lambda v: exact.search(v, a.k), q[: min(200, a.queries)])
    rows = [("exact (faiss flat, baseline)", p50, p99, qps, 1.0)]

    t = time.perf_counter()
    ivf = KnnIndex(kind="ivf").fit(x)
    print(f"  build IVF (nlist {ivf.nlist_}): {time.perf_counter() - t:.1f} s")
    for nprobe in (4, 8, 16, 32, 64):
        ids = ivf.search(q, a.k, nprobe=nprobe)[1]
        p50, p99, qps = latency(lambda v, n=nprobe: ivf.search(v, a.k, nprobe=n), q)
        rows.append((f"IVF nprobe={nprobe}", p50, p99, qps, recall(exact_ids, ids)))

    for clusters in (4, 64):
        t = time.perf_counter()
        km = KMeansClusterer(clusters).fit(x[: min(len(x), 200_000)])
        labels = km.predict(x)
        members = {c: np.flatnonzero(labels == c) for c in range(clusters)}
        build = time.perf_counter() - t
        qc = km.predict(q)
        ids = np.stack(
            [exact.search_subset(v[None], a.k, members[c])[1][0] for v, c in zip(q, qc, strict=True)]
        )
        p50, p99, qps = latency(
            lambda v, km=km, members=members: exact.search_subset(v, a.k, members[int(km.predict(v)[0])]),
            q[:100],
        )
        rows.append(
            (
                f"within predicted cluster, K={clusters} (build {build:.0f} s)",
                p50,
                p99,
                qps,
                recall(exact_ids, ids),
            )
        )

    base = rows[0][1]
    print(
        f"\n  {'index':<46} {'p50 ms':>8} {'p99 ms':>8} {'QPS':>8} {'recall@' + str(a.k):>10} {'p50 speed-up':>13}"
    )
    for name, p50, p99, qps, rec in rows:
        print(f"  {name:<46} {p50:>8.2f} {p99:>8.2f} {qps:>8.0f} {rec:>10.3f} {base / p50:>12.1f}x")


if __name__ == "__main__":
    main()
