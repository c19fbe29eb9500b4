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

from imgsim.config import DEFAULTS
from imgsim.console.progress import log
from imgsim.console.progress import seconds as fmt_seconds
from imgsim.io.atomic import atomic_write_json
from imgsim.io.runs import RunPaths


@dataclass
class _Timer:
    """Wall time per step, printed in the summary. Each step prints its own stage lines."""

    steps: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.steps[name] = round(time.perf_counter() - start, 1)
        return out


def _first_image(folder: Path) -> Path:
    return next(p for p in sorted(folder.rglob("*.png")))


def demo(work: str = "demo-run", limit: int | None = None, epochs: int | None = None) -> dict[str, Any]:
    """Run every stage on Fashion-MNIST under `work`; return (and print) the summary."""
    from imgsim.data.datasets import write_fashion_mnist
    from imgsim.evaluation.plots import plot_results, plot_tsne_run
    from imgsim.index.search import Searcher
    from pipelines.build_index import build_index
    from pipelines.evaluate import evaluate_run
    from pipelines.train import train

    work_dir = Path(work).resolve()
    data = work_dir / "fashion-mnist"
    run = work_dir / "run"
    paths = RunPaths(run)
    timer = _Timer()
    started = time.perf_counter()
    log(f"imgsim demo: Fashion-MNIST -> train -> index -> eval -> t-SNE -> query, under {work_dir}")

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
            "ray_logs": str(paths.logs_dir),
        },
    }
    atomic_write_json(paths.demo_summary, summary)
    _print_summary(summary, run, query_image)
    return summary


def _print_summary(summary: dict[str, Any], run: Path, query_image: Path) -> None:
    """The results table, the files written and what to run next (stdout: the demo's result)."""
    m, ix, k = summary["eval"], summary["index"], summary["eval"]["k"]
    seconds = summary["seconds"]
    print(f"\nimgsim demo: done in {fmt_seconds(seconds['total'])}")
    print(
        f"retrieval: {m['queries']:,} test queries against {ix['images']:,} indexed images "
        f"({ix['skipped']} skipped; {ix['clusters']} clusters; {ix['index_kind']} {ix['metric']} index)"
    )
    print(f"  {'precision@1':>12} {f'precision@{k}':>13} {f'mAP@{k}':>9}")
    print(f"  {m['precision_at_1']:>12.3f} {m['precision_at_k']:>13.3f} {m['map_at_k']:>9.3f}")
    print("time: " + ", ".join(f"{name} {fmt_seconds(s)}" for name, s in seconds.items() if name != "total"))
    print("files:")
    for name, path in {**summary["files"], "summary": str(RunPaths(run).demo_summary)}.items():
        print(f"  {name.replace('_', ' '):<11} {path}")
    print("next:")
    print(f"  imgsim query {query_image} --model {run} -k 8 --plot query.png")
    print(f"  imgsim serve --model {run}      # then open http://127.0.0.1:{DEFAULTS.serve.port}/")


if __name__ == "__main__":
    import sys

    from imgsim.console.command import run_as_module
    from pipelines.commands.demo import COMMAND

    sys.exit(run_as_module(COMMAND))
