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

from imgsim.runs import temp_path_beside  # noqa: E402


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


def _sample(n: int, max_points: int, strata: np.ndarray, seed: int) -> np.ndarray:
    """Indices of at most `max_points` items, drawn proportionally from each stratum (cluster)."""
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    picked = []
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        take = max(1, round(len(members) * max_points / n))
        picked.append(rng.choice(members, min(take, len(members)), replace=False))
    return np.sort(np.concatenate(picked))[:max_points]


def plot_tsne(
    emb: np.ndarray,
    clusters: np.ndarray,
    labels: Sequence[str | None] | None,
    out: str | os.PathLike[str],
    max_points: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """t-SNE of (a cluster-stratified sample of at most `max_points`) embeddings, coloured by cluster
    and, when labels are known, by label in a second panel."""
    from sklearn.manifold import TSNE

    clusters = np.asarray(clusters)
    idx = _sample(len(emb), max_points, clusters, seed)
    x = np.asarray(emb, dtype=np.float32)[idx]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # the cosine geometry searched
    perplexity = float(min(30, max(2, (len(x) - 1) / 3)))
    xy = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed, n_jobs=-1).fit_transform(
        x
    )
    lab = None if labels is None else np.array([str(labels[i]) if labels[i] is not None else "" for i in idx])
    has_labels = lab is not None and (lab != "").any()
    fig, axes = plt.subplots(
        1, 2 if has_labels else 1, figsize=(14 if has_labels else 7.5, 6.5), squeeze=False
    )
    panels = [("cluster", clusters[idx].astype(str))] + ([("label", lab)] if has_labels else [])
    for ax, (name, values) in zip(axes[0], panels, strict=True):
        cats = sorted(set(values.tolist()), key=lambda v: (len(v), v))
        cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
        for j, cat in enumerate(cats):
            m = values == cat
            ax.scatter(xy[m, 0], xy[m, 1], s=4, alpha=0.7, color=cmap(j % cmap.N), label=cat or "(none)")
        ax.set_title(f"t-SNE of {len(idx):,} embeddings, coloured by {name}")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(markerscale=3, fontsize=8, loc="best", title=name, ncol=1 if len(cats) <= 12 else 2)
    save_figure(fig, out)
    return {"points": int(len(idx)), "total": int(len(emb)), "out": str(out)}


def plot_tsne_run(
    run: str | os.PathLike[str], out: str | os.PathLike[str], max_points: int = 10_000, seed: int = 0
) -> dict[str, Any]:
    """t-SNE of RUN's indexed embeddings (what `imgsim tsne` draws)."""
    from imgsim.runs import read_embeddings

    emb, cols = read_embeddings(run, columns=("label", "cluster"))
    return plot_tsne(emb, np.asarray(cols["cluster"]), cols["label"], out, max_points=max_points, seed=seed)


def plot_result_grid(
    query: Image.Image,
    items: Sequence[tuple[Image.Image, dict[str, Any]]],
    out: str | os.PathLike[str],
    title: str = "",
) -> Path:
    """The query image beside its results, each captioned with rank, distance, label and cluster."""
    cols = min(5, max(1, len(items)))
    rows = max(1, math.ceil(len(items) / cols))
    fig = plt.figure(figsize=(2.2 * (cols + 1.3), 2.5 * rows))
    grid = fig.add_gridspec(rows, cols + 1, width_ratios=[1.3] + [1] * cols, wspace=0.15, hspace=0.35)
    ax = fig.add_subplot(grid[:, 0])
    ax.imshow(query, cmap="gray" if query.mode == "L" else None)
    ax.set_title("query", fontweight="bold")
    ax.axis("off")
    for n, (img, rec) in enumerate(items):
        a = fig.add_subplot(grid[n // cols, 1 + n % cols])
        a.imshow(img, cmap="gray" if img.mode == "L" else None)
        label = rec.get("label") or "-"
        a.set_title(
            f"#{rec['rank']}  d={rec['distance']:.3f}\n{label} · cluster {rec['cluster']}", fontsize=8
        )
        a.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, out)


def plot_results(searcher: Any, query: Any, result: dict[str, Any], out: str | os.PathLike[str]) -> Path:
    """Draw a search result (from `Searcher.search`) as a PNG grid."""
    items = [(searcher.display_image(r["id"]), r) for r in result["results"]]
    title = f"{result['query']}  (cluster {result['cluster']})"
    return plot_result_grid(searcher.load_display_image(query), items, out, title=title)
