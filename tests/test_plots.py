"""Plots: t-SNE and result grids are real, non-trivial PNGs; sampling keeps each cluster's share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgsim.evaluation.plots import (
    _sample,
    plot_loss,
    plot_result_grid,
    plot_results,
    plot_tsne,
    plot_tsne_run,
)


def open_png(path: Path, min_width: int, min_height: int) -> Image.Image:
    """The PNG at `path`, checked to be a real image of plausible size with more than one colour."""
    assert path.is_file() and path.stat().st_size > 5_000
    img = Image.open(path)
    img.load()
    assert img.format == "PNG"
    assert img.width >= min_width and img.height >= min_height, img.size
    assert len(img.convert("RGB").getcolors(maxcolors=1 << 20) or range(1 << 20)) > 50
    return img


def blobs(n: int, groups: int = 3, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    which = rng.integers(0, groups, n)
    return (rng.normal(size=(groups, dim))[which] * 4 + rng.normal(size=(n, dim))).astype(np.float32), which


def test_tsne_two_panels_when_labels_are_known(tmp_path: Path) -> None:
    emb, clusters = blobs(300)
    labels = [None if i % 10 == 0 else f"class-{c}" for i, c in enumerate(clusters)]
    info = plot_tsne(emb, clusters, labels, out=tmp_path / "tsne.png", max_points=200)
    assert info == {
        "points": 200,
        "total": 300,
        "clusters": 3,
        "labelled": True,
        "out": str(tmp_path / "tsne.png"),
    }
    img = open_png(tmp_path / "tsne.png", 1000, 500)
    assert img.width > 1.6 * img.height  # two side-by-side panels


def test_tsne_one_panel_without_labels(tmp_path: Path) -> None:
    emb, clusters = blobs(120)
    info = plot_tsne(emb, clusters, out=tmp_path / "tsne.png")
    assert info["points"] == 120 and not info["labelled"]
    img = open_png(tmp_path / "tsne.png", 500, 500)
    assert img.width < 1.6 * img.height


def test_tsne_of_a_handful_of_points(tmp_path: Path) -> None:
    emb, clusters = blobs(3)
    assert plot_tsne(emb, clusters, ["a", "b", "c"], out=tmp_path / "t.png")["points"] == 3
    assert (tmp_path / "t.png").stat().st_size > 0


def test_sample_is_stratified_by_cluster_and_exact_in_size() -> None:
    strata = np.repeat([0, 1, 2, 3], [7000, 2000, 995, 5])
    idx = _sample(strata, 1000, seed=0)
    assert len(idx) == len(set(idx.tolist())) == 1000 and (np.diff(idx) > 0).all()
    counts = np.bincount(strata[idx], minlength=4)
    assert counts.tolist() == [700, 200, 99, 1]  # each cluster its share; the tiny one still shown
    np.testing.assert_array_equal(idx, _sample(strata, 1000, seed=0))  # reproducible
    assert len(_sample(np.arange(50), 10, seed=0)) == 10  # more clusters than points
    np.testing.assert_array_equal(_sample(strata[:10], 1000, seed=0), np.arange(10))


def test_tsne_run_reads_the_run_embeddings(tmp_path: Path) -> None:
    emb, clusters = blobs(150, dim=16)
    (tmp_path / "index").mkdir()
    table = pa.table(
        {
            "path": [f"img/{i}.png" for i in range(150)],
            "label": [f"c{c}" for c in clusters],
            "cluster": pa.array(clusters, pa.int64()),
            "embedding": pa.array([list(e) for e in emb], pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, tmp_path / "index" / "embeddings.parquet")
    info = plot_tsne_run(tmp_path, tmp_path / "plots" / "tsne.png", max_points=100)
    assert info["points"] == 100 and info["total"] == 150 and info["labelled"]
    open_png(tmp_path / "plots" / "tsne.png", 1000, 500)


def pattern(seed: int, mode: str) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = (np.add.outer(np.arange(28), np.arange(28)) * rng.uniform(2, 5)) % 256
    img = Image.fromarray(arr.astype(np.uint8), mode="L")
    return img.convert(mode)


def records(n: int) -> list[dict[str, Any]]:
    return [
        {
            "rank": i + 1,
            "id": i,
            "path": f"x/{i}.png",
            "label": "ankle-boot",
            "cluster": i % 4,
            "distance": 0.01 * i,
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "RGBA"])
def test_result_grid(tmp_path: Path, mode: str) -> None:
    items = [(pattern(i, mode), rec) for i, rec in enumerate(records(8))]
    out = plot_result_grid(pattern(99, mode), items, tmp_path / "grid.png", title="query.png (cluster 1)")
    assert out == tmp_path / "grid.png"
    img = open_png(out, 800, 350)
    assert img.width > img.height  # the query beside two rows of five


def test_result_grid_without_results(tmp_path: Path) -> None:
    plot_result_grid(pattern(1, "L"), [], tmp_path / "none.png")
    assert Image.open(tmp_path / "none.png").width > 100


def test_plot_results_adapts_a_searcher(tmp_path: Path) -> None:
    class FakeSearcher:
        def display_image(self, id: int) -> Image.Image:
            return pattern(id, "RGB")

        def load_display_image(self, x: Any) -> Image.Image:
            assert x == "q.png"
            return pattern(42, "RGB")

    result = {"query": "q.png", "cluster": 2, "results": records(3)}
    open_png(plot_results(FakeSearcher(), "q.png", result, tmp_path / "q.png"), 500, 200)


def test_loss_plot(tmp_path: Path) -> None:
    open_png(plot_loss([1.0, 0.6, 0.5], tmp_path / "loss.png", val_losses=[1.1, 0.7, 0.6]), 400, 300)
