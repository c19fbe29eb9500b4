"""Search speed and recall: exact vs partitioned (IVF) vs the original design's within-cluster search.

Data: N clustered D-dimensional vectors, a Gaussian mixture of --centres components with uneven sizes
and spreads (real embeddings are clumpy, not uniform noise), plus --queries held-out vectors from the
same mixture. The spreads make components overlap the way classes do in real embeddings: the header
prints the share of each query's true top-k that comes from its own component (1.0 would be too easy:
then any partitioning finds the neighbours). Metric: cosine (imgsim's default).

Per index: build time; single-query latency (one query per call, what a user waits for) as wall-clock
p50/p99 and as CPU ms per query (robust on a shared machine where wall time includes waiting for a
core); batched throughput (all queries in one call); recall@k against exact search, |top-k ∩ exact
top-k| / k averaged over queries. Ratios are against exact search measured in the same run.

"Within predicted cluster, K=...": the original design (search only the query's KMeans cluster), run
as an IVF index whose partitions are the KMeans clusters, probing one (`KnnIndex.fit(x,
centroids=...)`, the same results as `KnnIndex.search_within`).

    .venv/bin/python -m bench.search --threads 1                      # 1M x 64, 1000 queries
    .venv/bin/python -m bench.search --n 100000 --queries 300         # quick
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from imgsim.index import knn as index_lib
from imgsim.index.knn import KMeansClusterer, KnnIndex

TARGET_MS, TARGET_RECALL = 2.0, 0.95
Search = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def mixture(
    n: int, queries: int, dim: int, centres: int, spread: tuple[float, float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(database (n, dim), queries, database components, query components) from one Gaussian mixture:
    means ~ N(0, I), each component with a log-normal weight and a per-dimension spread drawn
    uniformly from `spread`."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=(centres, dim)).astype(np.float32)
    sigma = rng.uniform(*spread, centres).astype(np.float32)
    weight = rng.lognormal(0.0, 0.75, centres)
    weight /= weight.sum()

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        which = rng.choice(centres, count, p=weight)
        out = np.empty((count, dim), np.float32)
        for start in range(0, count, 100_000):  # in blocks: bounded temporary memory
            w = which[start : start + 100_000]
            noise = rng.standard_normal((len(w), dim), dtype=np.float32)
            out[start : start + len(w)] = mean[w] + noise * sigma[w, None]
        return out, which

    (x, x_comp), (q, q_comp) = draw(n), draw(queries)
    return x, q, x_comp, q_comp


def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    """(result, wall s, CPU s of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def recall_at(truth: np.ndarray, ids: np.ndarray) -> float:
    """Mean over queries of |ids_i ∩ truth_i| / k."""
    k = truth.shape[1]
    return float(np.mean([len(np.intersect1d(t, i)) / k for t, i in zip(truth, ids, strict=True)]))


@dataclass
class Row:
    name: str
    build_s: float
    build_cpu_s: float
    p50_ms: float
    p99_ms: float
    cpu_ms: float
    batch_qps: float
    recall: float


def measure(
    name: str,
    build: tuple[float, float],
    search: Search,
    q: np.ndarray,
    truth: np.ndarray | None,
    latency_queries: int,
) -> tuple[Row, np.ndarray]:
    """Batched throughput and recall over all of `q`; single-query latency over the first ones."""
    (_, ids), wall, _ = timed(lambda: search(q))  # type: ignore[misc]
    walls, cpus = np.empty(latency_queries), np.empty(latency_queries)
    for i in range(latency_queries):
        _, walls[i], cpus[i] = timed(lambda i=i: search(q[i : i + 1]))
    rec = 1.0 if truth is None else recall_at(truth, ids)
    row = Row(
        name,
        *build,
        float(np.percentile(walls, 50) * 1000),
        float(np.percentile(walls, 99) * 1000),
        float(cpus.mean() * 1000),
        len(q) / wall,
        rec,
    )
    print(f"  {name}: p50 {row.p50_ms:.3f} ms, CPU {row.cpu_ms:.3f} ms/query, recall {rec:.3f}", flush=True)
    return row, ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="database vectors")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=1000, help="held-out queries")
    p.add_argument("--centres", type=int, default=2000, help="mixture components")
    p.add_argument("--spread", default="0.7,1.4", help="range of per-component spreads (means ~ N(0, 1))")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--nprobe", default="16,32,64,128", help="IVF nprobe values, comma-separated")
    p.add_argument(
        "--nlist",
        default="",
        help="IVF partitions, comma-separated to compare several in one run (default: imgsim's, 2*sqrt(N))",
    )
    p.add_argument("--within", default="4,16", help="within-cluster K values, comma-separated ('' skips)")
    p.add_argument("--exact-latency-queries", type=int, default=200, help="exact single-query timings")
    p.add_argument("--threads", type=int, default=None, help="faiss threads (default: imgsim's setting)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    threads = index_lib.set_threads(a.threads)
    lo, hi = (float(v) for v in a.spread.split(","))
    x, q, x_comp, q_comp = mixture(a.n, a.queries, a.dim, a.centres, (lo, hi), a.seed)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"bench/search: {a.n:,} x {a.dim}-d vectors ({a.centres} mixture components, spreads {lo}-{hi}), "
        f"{a.queries} held-out queries, k={a.k}, cosine; faiss {index_lib.faiss.__version__}, "
        f"{threads} thread(s), {os.cpu_count()} cores, load average {load:.1f}",
        flush=True,
    )
    rows: list[Row] = []
    exact_latency = min(a.exact_latency_queries, a.queries)

    exact, wall, cpu = timed(lambda: KnnIndex(kind="exact").fit(x))
    assert isinstance(exact, KnnIndex)
    row, truth = measure(
        "exact (flat, baseline)", (wall, cpu), lambda v: exact.search(v, a.k), q, None, exact_latency
    )
    rows.append(row)
    own = float((x_comp[truth] == q_comp[:, None]).mean())
    print(f"  data: {own:.1%} of the exact top-{a.k} come from the query's own mixture component", flush=True)

    for nlist in [int(v) for v in a.nlist.split(",") if v] or [None]:
        ivf, wall, cpu = timed(lambda nlist=nlist: KnnIndex(kind="ivf", nlist=nlist).fit(x))
        assert isinstance(ivf, KnnIndex)
        print(f"  IVF: nlist {ivf.nlist_}, built in {wall:.1f} s ({cpu:.1f} s CPU)", flush=True)
        for nprobe in [int(v) for v in a.nprobe.split(",") if v]:

            def search(
                v: np.ndarray, nprobe: int = nprobe, ivf: KnnIndex = ivf
            ) -> tuple[np.ndarray, np.ndarray]:
                return ivf.search(v, a.k, nprobe=nprobe)

            name = f"IVF {ivf.nlist_} lists, nprobe {nprobe}"
            rows.append(measure(name, (wall, cpu), search, q, truth, a.queries)[0])
        del ivf

    for clusters in [int(v) for v in a.within.split(",") if v]:

        def build(clusters: int = clusters) -> KnnIndex:
            km = KMeansClusterer(clusters).fit(x)
            return KnnIndex(kind="ivf", nprobe=1).fit(x, centroids=km.centroids_)

        within, wall, cpu = timed(build)
        assert isinstance(within, KnnIndex)

        def search(v: np.ndarray, index: KnnIndex = within) -> tuple[np.ndarray, np.ndarray]:
            return index.search(v, a.k)

        name = f"within predicted cluster, K={clusters}"
        rows.append(measure(name, (wall, cpu), search, q, truth, exact_latency)[0])
        del within

    report(rows, a.k)


def report(rows: list[Row], k: int) -> None:
    """The table, with ratios against the first row (exact), and the verdict on the target."""
    base = rows[0]
    print(
        f"\n{'index':<34} {'build s':>8} {'(CPU s)':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/q':>9} "
        f"{'batch q/s':>10} {f'recall@{k}':>9} {'CPU/q vs exact':>15} {'q/s vs exact':>13}"
    )
    for r in rows:
        print(
            f"{r.name:<34} {r.build_s:>8.1f} {r.build_cpu_s:>8.1f} {r.p50_ms:>8.3f} {r.p99_ms:>8.3f} "
            f"{r.cpu_ms:>9.3f} {r.batch_qps:>10.0f} {r.recall:>9.3f} {base.cpu_ms / r.cpu_ms:>14.1f}x "
            f"{r.batch_qps / base.batch_qps:>12.1f}x"
        )
    target = f"target (<= {TARGET_MS} ms per query at recall@{k} >= {TARGET_RECALL})"
    ok = [r for r in rows if r.name.startswith("IVF") and r.p50_ms <= TARGET_MS and r.recall >= TARGET_RECALL]
    if ok:
        best = min(ok, key=lambda r: r.p50_ms)
        print(
            f"\n{target}: met by {best.name}: p50 {best.p50_ms:.3f} ms (p99 {best.p99_ms:.3f} ms, "
            f"CPU {best.cpu_ms:.3f} ms/query), recall@{k} {best.recall:.3f}"
        )
    else:
        print(f"\n{target}: NOT met by any IVF setting measured")


if __name__ == "__main__":
    main()
