"""`imgsim demo`: the whole pipeline on Fashion-MNIST, then a summary of figures and files.

data set -> train -> index (train split) -> eval (test split as queries) -> t-SNE -> one query plot.
Each step is the same function the matching CLI command calls; nothing here is demo-only logic.

    python -m pipelines.demo --work demo-run
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgsim.atomic import atomic_write_json
from imgsim.runs import RunPaths


@dataclass
class _Timer:
    """Wall time per step, printed in the summary."""

    steps: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        print(f"\n== {name} ==", flush=True)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.steps[name] = round(time.perf_counter() - start, 1)
        print(f"== {name}: {self.steps[name]:.1f} s ==", flush=True)
        return out


def _first_image(folder: Path) -> Path:
    return next(p for p in sorted(folder.rglob("*.png")))


def demo(work: str = "demo-run", limit: int | None = None, epochs: int | None = None) -> dict[str, Any]:
    """Run every stage on Fashion-MNIST under `work`; return (and print) the summary."""
    from imgsim.datasets import write_fashion_mnist
    from imgsim.plots import plot_results, plot_tsne_run
    from imgsim.search import Searcher
    from pipelines.build_index import build_index
    from pipelines.evaluate import evaluate_run
    from pipelines.train import train

    work_dir = Path(work).resolve()
    data = work_dir / "fashion-mnist"
    run = work_dir / "run"
    paths = RunPaths(run)
    timer = _Timer()
    started = time.perf_counter()

    written = timer.run("dataset", write_fashion_mnist, data, limit=limit)
    train_kwargs: dict[str, Any] = {} if epochs is None else {"epochs": epochs}
    trained = timer.run("train", train, str(data / "train"), str(run), resume=True, **train_kwargs)
    indexed = timer.run("index", build_index, str(data / "train"), str(run))
    metrics = timer.run("eval", evaluate_run, str(run), queries=str(data / "test"))
    tsne_png = paths.tsne_plot
    timer.run("t-SNE", plot_tsne_run, str(run), str(tsne_png), max_points=5_000)

    query_image = _first_image(data / "test" / "ankle-boot")
    query_png = paths.query_plot

    def _query() -> dict[str, Any]:
        searcher = Searcher.load(str(run))
        result = searcher.search(str(query_image), k=8)
        plot_results(searcher, str(query_image), result, str(query_png))
        return result

    result = timer.run("query", _query)

    summary: dict[str, Any] = {
        "images": written.counts,
        "train": {k: trained[k] for k in ("epochs", "final_loss") if k in trained},
        "index": {k: indexed[k] for k in ("images", "skipped", "clusters", "index_kind", "metric")},
        "eval": metrics,
        "query": {"image": str(query_image), "cluster": result["cluster"], "top": result["results"][:3]},
        "seconds": {**timer.steps, "total": round(time.perf_counter() - started, 1)},
        "files": {
            "data": str(data),
            "model": str(paths.model_dir),
            "loss_plot": str(paths.loss_plot),
            "embeddings": str(paths.embeddings),
            "skipped": str(paths.skipped),
            "tsne_plot": str(tsne_png),
            "query_plot": str(query_png),
        },
    }
    atomic_write_json(paths.demo_summary, summary)
    _print_summary(summary, run)
    return summary


def _print_summary(summary: dict[str, Any], run: Path) -> None:
    m = summary["eval"]
    print("\n================ imgsim demo: done ================")
    print(f"data:       {summary['images']}")
    print(
        f"index:      {summary['index']['images']} images, {summary['index']['skipped']} skipped, "
        f"{summary['index']['clusters']} clusters, {summary['index']['index_kind']} {summary['index']['metric']}"
    )
    print(
        f"retrieval:  {m['queries']} test queries vs {m['database']} train images: "
        f"precision@1 {m['precision_at_1']:.3f}, precision@{m['k']} {m['precision_at_k']:.3f}, "
        f"mAP@{m['k']} {m['map_at_k']:.3f}"
    )
    print("time (s):   " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()))
    print("files:")
    for name, path in summary["files"].items():
        print(f"  {name:<11} {path}")
    print(f"  {'summary':<11} {RunPaths(run).demo_summary}")
    print(f"next: imgsim query IMAGE --model {run} --plot out.png   |   imgsim serve --model {run}")


if __name__ == "__main__":
    import sys

    from imgsim.cli import main_for

    sys.exit(main_for("demo"))
