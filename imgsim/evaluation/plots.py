"""Plots: loss curve, t-SNE of embeddings, a query beside its results. Files are written atomically."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from imgsim.console.progress import stage  # noqa: E402
from imgsim.io.atomic import temp_path_beside  # noqa: E402


def save_figure(fig: plt.Figure, out: str | os.PathLike[str]) -> Path:
    """Save `fig` as PNG at `out` atomically and close it."""
    out = Path(out)
    tmp = temp_path_beside(out)
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return out


def plot_loss(
    losses: Sequence[float], out: str | os.PathLike[str], val_losses: Sequence[float] | None = None
) -> Path:
    """Training loss per epoch."""
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = range(1, len(losses) + 1)
    ax.plot(epochs, losses, marker="o", label="train loss")
    if val_losses:
        ax.plot(range(1, len(val_losses) + 1), val_losses, marker="s", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("imgsim autoencoder training")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out)


def _sample(strata: np.ndarray, max_points: int, seed: int) -> np.ndarray:
    """Sorted indices of min(n, max_points) items drawn at random within each stratum (cluster), each
    stratum keeping its share of the sample (largest remainders; at least one item when room allows)."""
    n = len(strata)
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    values, inverse, counts = np.unique(strata, return_inverse=True, return_counts=True)
    quota = counts * max_points / n
    take = np.floor(quota).astype(np.int64)
    if len(values) <= max_points:
        take = np.maximum(take, 1)
    short = max_points - int(take.sum())
    if short > 0:  # hand the rest to the largest remainders
        order = np.argsort(-(quota - np.floor(quota)), kind="stable")
        take[order[:short]] += 1
    while take.sum() > max_points:  # the minimum of one per stratum overshot: trim the largest
        take[np.argmax(take)] -= 1
    picked = [
        rng.choice(np.flatnonzero(inverse == i), int(t), replace=False) for i, t in enumerate(take) if t > 0
    ]
    return np.sort(np.concatenate(picked))


def _palette(n: int) -> list[Any]:
    """n distinguishable colours (tab10/tab20, then evenly spaced hues)."""
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    if n <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(n)]
    return [plt.get_cmap("turbo")(i / max(1, n - 1)) for i in range(n)]


def _scatter_by(ax: Any, xy: np.ndarray, values: np.ndarray, name: str) -> None:
    """One colour per category of `values` (sorted naturally: 2 before 10), with a legend."""
    cats = sorted(set(values.tolist()), key=lambda v: (len(v), v))
    for colour, cat in zip(_palette(len(cats)), cats, strict=True):
        m = values == cat
        ax.scatter(xy[m, 0], xy[m, 1], s=4, alpha=0.7, color=colour, label=cat or "(none)", linewidths=0)
    ax.set_title(f"coloured by {name} ({len(cats)})")
    ax.set_xticks([])
    ax.set_yticks([])
    if len(cats) <= 30:
        ax.legend(markerscale=3, fontsize=8, loc="best", title=name, ncol=1 if len(cats) <= 12 else 2)


def plot_tsne(
    emb: np.ndarray,
    clusters: np.ndarray,
    labels: Sequence[str | None] | None = None,
    *,
    out: str | os.PathLike[str],
    max_points: int = 10_000,
    seed: int = 0,
    metric: str = "cosine",
) -> dict[str, Any]:
    """t-SNE map of embeddings, coloured by cluster and, when any label is known, by label in a
    second panel. Writes a PNG to `out`.

    At most `max_points` points are drawn: a random sample stratified by cluster, so every cluster
    keeps its share (t-SNE costs O(n log n) per iteration; 10K points take about a minute on two
    cores). For `metric="cosine"` the vectors are L2-normalised first, the geometry search uses.
    sklearn's TSNE with PCA initialisation and a fixed seed, so a run is reproducible.

    Returns `{"points", "total", "clusters", "labelled", "out"}`.
    """
    from sklearn.manifold import TSNE

    x_all = np.asarray(emb, dtype=np.float32)
    clusters = np.asarray(clusters).reshape(-1)
    if len(x_all) == 0:
        raise ValueError("no embeddings to plot")
    if len(clusters) != len(x_all) or (labels is not None and len(labels) != len(x_all)):
        raise ValueError("clusters and labels need one entry per embedding")
    idx = _sample(clusters, max_points, seed)
    x = x_all[idx].reshape(len(idx), -1)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if len(x) >= 4:
        perplexity = float(min(30.0, (len(x) - 1) / 3))
        with stage("t-SNE", len(x), "points"):
            xy = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x)
    else:  # t-SNE needs a few points; draw so few as they come
        xy = np.zeros((len(x), 2))
        xy[:, : min(2, x.shape[1])] = x[:, :2]
    lab = None if labels is None else np.array(["" if labels[i] is None else str(labels[i]) for i in idx])
    labelled = lab is not None and bool((lab != "").any())
    panels = [("cluster", clusters[idx].astype(str))] + ([("label", lab)] if labelled else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 6.5), squeeze=False)
    for ax, (name, values) in zip(axes[0], panels, strict=True):
        _scatter_by(ax, xy, values, name)
    shown = f"{len(idx):,} of {len(x_all):,}" if len(idx) < len(x_all) else f"{len(idx):,}"
    fig.suptitle(f"t-SNE of {shown} embeddings ({metric})")
    save_figure(fig, out)
    return {
        "points": int(len(idx)),
        "total": int(len(x_all)),
        "clusters": int(len(np.unique(clusters))),
        "labelled": labelled,
        "out": str(out),
    }


def plot_tsne_run(
    run: str | os.PathLike[str], out: str | os.PathLike[str], max_points: int = 10_000, seed: int = 0
) -> dict[str, Any]:
    """t-SNE of RUN's indexed embeddings (RUN/index/embeddings.parquet): what `imgsim tsne` draws."""
    import json

    from imgsim.data.rows import read_embeddings
    from imgsim.io.runs import RunPaths

    emb, cols = read_embeddings(run, columns=("label", "cluster"))
    manifest = RunPaths(run).manifest
    metric = json.loads(manifest.read_text()).get("metric", "cosine") if manifest.is_file() else "cosine"
    clusters = np.array([-1 if c is None else c for c in cols["cluster"]], dtype=np.int64)
    return plot_tsne(emb, clusters, cols["label"], out=out, max_points=max_points, seed=seed, metric=metric)


def _show(ax: Any, img: Image.Image) -> None:
    """Draw a PIL image at its true grey levels / colours (no contrast stretching)."""
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGBA" if "A" in img.getbands() or img.mode == "P" else "RGB")
    if img.mode == "L":
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(img)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _caption(rec: dict[str, Any]) -> str:
    distance = rec.get("distance")
    dist = "" if distance is None else f"  d={float(distance):.3f}"
    label = str(rec.get("label") or "-")
    label = label if len(label) <= 18 else label[:17] + "…"
    cluster = rec.get("cluster")
    return f"#{rec.get('rank', '?')}{dist}\n{label} · cluster {'-' if cluster is None else cluster}"


def plot_result_grid(
    query_img: Image.Image,
    items: Sequence[tuple[Image.Image, dict[str, Any]]],
    out: str | os.PathLike[str],
    title: str = "",
) -> Path:
    """The query image (left, larger) beside its results in a grid of up to 5 columns, each captioned
    with rank, distance, label and cluster. `items`: (image, result record) pairs, best first."""
    cols = min(5, max(1, len(items)))
    rows = max(1, math.ceil(len(items) / cols))
    fig = plt.figure(figsize=(2.2 * (cols + 1.4), 2.5 * rows + 0.4))
    grid = fig.add_gridspec(rows, cols + 1, width_ratios=[1.4] + [1] * cols, wspace=0.15, hspace=0.4)
    ax = fig.add_subplot(grid[:, 0] if rows > 1 else grid[0, 0])
    _show(ax, query_img)
    ax.set_title("query", fontweight="bold")
    for n, (img, rec) in enumerate(items):
        a = fig.add_subplot(grid[n // cols, 1 + n % cols])
        _show(a, img)
        a.set_title(_caption(rec), fontsize=8)
    if not items:
        fig.text(0.6, 0.5, "no results", ha="center", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, out)


def plot_results(searcher: Any, query: Any, result: dict[str, Any], out: str | os.PathLike[str]) -> Path:
    """Draw a search result (from `Searcher.search`) as a PNG: a thin adapter over
    `plot_result_grid` that fetches the images through the searcher."""
    items = [(searcher.display_image(r["id"]), r) for r in result["results"]]
    title = f"{result.get('query', '')}  (cluster {result.get('cluster', '-')})"
    return plot_result_grid(searcher.load_display_image(query), items, out, title=title)
