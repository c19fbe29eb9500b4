"""Recipe experiments: train the autoencoder in-process for a time budget on Fashion-MNIST and
report precision@10 (60K train images as the database, 10K test images as queries, cosine).

This is how the defaults were chosen; `imgsim train` + `imgsim eval` give the official figures.

    python -m bench.quality --minutes 4              # the defaults' recipe
    python -m bench.quality --minutes 4 --nce 0.5    # with the contrastive term
    python -m bench.quality --steps 1875,3750        # `imgsim train`'s choice and recipe, N steps each
    python -m bench.quality --steps 1875 --recipes denoise,denoise-hog   # recipes alternated, same seed
    python -m bench.quality --baselines-only         # raw pixels, hand-made 8x8, oriented gradients

`--steps` trains what `imgsim train` picks for Fashion-MNIST (`imgsim.training.recipes.choose`) with
`bench.inproc.train` (the Ray Train loop's calls, in bf16 where the CPU has it) for each step count.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from imgsim.config import DEFAULTS
from imgsim.data.datasets import find_fashion_mnist, read_idx
from imgsim.models.autoencoder import Augment, AutoEncoder, ModelConfig, training_loss
from imgsim.models.hog import orientation_histograms


def load_split(split: str, size: int) -> tuple[torch.Tensor, np.ndarray]:
    src = find_fashion_mnist()
    prefix = "train" if split == "train" else "t10k"
    x = torch.from_numpy(read_idx(src / f"{prefix}-images-idx3-ubyte.gz").copy()).unsqueeze(1)
    if size != 28:
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True).round().clamp(0, 255)
        x = x.to(torch.uint8)
    return x, read_idx(src / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)


def precision_at_k(q: np.ndarray, ql: np.ndarray, db: np.ndarray, dbl: np.ndarray, k: int = 10) -> float:
    qn = torch.nn.functional.normalize(torch.from_numpy(q), dim=1)
    dn = torch.nn.functional.normalize(torch.from_numpy(db), dim=1)
    hits = 0
    for s in range(0, len(qn), 1000):
        idx = (qn[s : s + 1000] @ dn.t()).topk(k, dim=1).indices.numpy()
        hits += (dbl[idx] == ql[s : s + 1000, None]).sum()
    return hits / (len(q) * k)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=4)
    p.add_argument("--nce", type=float, default=DEFAULTS.train.nce_weight)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--widths", default="32,64,128")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--aug-scale", type=float, default=Augment.scale[0], help="smallest crop scale")
    p.add_argument("--aug-shift", type=float, default=Augment.max_shift)
    p.add_argument("--baselines-only", action="store_true", help="raw pixels and the hand-made descriptor")
    p.add_argument("--steps", default="", help="comma-separated step counts: the default recipe, in-process")
    p.add_argument(
        "--recipes",
        default="",
        help="with --steps: comma-separated recipes, alternated (default: the chosen one)",
    )
    a = p.parse_args()
    if a.steps:
        recipes = a.recipes.split(",") if a.recipes else None
        return default_recipe_steps([int(s) for s in a.steps.split(",")], a.threads, recipes)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    xtr, ytr = load_split("train", a.size)
    xte, yte = load_split("test", a.size)
    raw = precision_at_k(
        (xte.flatten(1).float() - xtr.flatten(1).float().mean(0)).numpy(),
        yte,
        (xtr.flatten(1).float() - xtr.flatten(1).float().mean(0)).numpy(),
        ytr,
    )
    from bench.copydetect import handmade  # greyscale, mirror-symmetrised, standardised 8x8 pixels

    hand = precision_at_k(handmade(xte.numpy()), yte, handmade(xtr.numpy()), ytr)
    hog_db = torch.cat([orientation_histograms(xtr[i : i + 4096]) for i in range(0, len(xtr), 4096)])
    hog_mean = hog_db.mean(0)
    hog = precision_at_k(
        (orientation_histograms(xte) - hog_mean).numpy(), yte, (hog_db - hog_mean).numpy(), ytr
    )
    print(
        f"BASELINES size={a.size}: raw pixels (centred, cosine) P@10 {raw:.4f}; hand-made 8x8 P@10 {hand:.4f}; "
        f"oriented gradients ({hog_db.shape[1]}-d, centred, cosine) P@10 {hog:.4f}"
    )
    if a.baselines_only:
        return
    model = AutoEncoder(
        ModelConfig(image_size=a.size, dim=a.dim, widths=tuple(int(w) for w in a.widths.split(",")))
    )
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-4)
    aug = Augment(scale=(a.aug_scale, 1.0), max_shift=a.aug_shift)
    budget = a.minutes * 60
    start = time.perf_counter()
    step, total_steps = 0, None
    while True:
        perm = torch.randperm(len(xtr))
        for s in range(0, len(perm) - a.batch + 1, a.batch):
            if step == 10:  # estimate the schedule length from the measured step time
                total_steps = int(budget / ((time.perf_counter() - start) / 10))
            frac = min(1.0, step / total_steps) if total_steps else 0.0
            for g in opt.param_groups:
                g["lr"] = a.lr * (min(1.0, (step + 1) / 50)) * 0.5 * (1 + math.cos(math.pi * frac))
            loss, parts = training_loss(model, xtr[perm[s : s + a.batch]], aug, a.nce)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if time.perf_counter() - start > budget:
                break
        else:
            continue
        break
    train_s = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        model.emb_mean.zero_()
        db = model.embed(xtr)
        model.emb_mean.copy_(torch.from_numpy(db.mean(0)))
        db = db - db.mean(0)
        q = model.embed(xte)
    p10 = precision_at_k(q, yte, db, ytr)
    # PCA whitening fitted on the database embeddings (a candidate post-processing step)
    eigval, eigvec = np.linalg.eigh(np.cov(db, rowvar=False))
    w = eigvec / np.sqrt(eigval + 1e-6 * eigval.max())
    p10_white = precision_at_k(q @ w, yte, db @ w, ytr)
    print(
        f"RESULT nce={a.nce} size={a.size} dim={a.dim} widths={a.widths} batch={a.batch} lr={a.lr} aug=({a.aug_scale},{a.aug_shift}): "
        f"{step} steps ({step * a.batch / 60000:.2f} epochs) in {train_s:.0f}s -> P@10 {p10:.4f} "
        f"(whitened {p10_white:.4f}) "
        f"(raw pixels, centred cosine: {raw:.4f}; hand-made 8x8: {hand:.4f}); "
        f"last loss { {k: round(float(v), 4) for k, v in parts.items()} }"
    )


def default_recipe_steps(steps: list[int], threads: int, recipes: list[str] | None = None) -> None:
    """P@10 of `imgsim train`'s default choice for Fashion-MNIST after each number of steps, with its
    recipe or each of `recipes` in turn (same seed)."""
    from bench.inproc import train
    from imgsim.training.recipes import RECIPES, choose

    torch.set_num_threads(threads)
    xtr, ytr = load_split("train", 32)
    xte, yte = load_split("test", 32)
    choice = choose([(28, 28)] * 20, 1)
    for n in steps:
        for name in recipes or [choice.recipe]:
            started = time.perf_counter()
            config = choice.model_config(recipe=name)
            model, _ = train(xtr, config, RECIPES[name], steps=n, log_every=0)
            train_s = time.perf_counter() - started
            model.eval()
            with torch.no_grad():
                p10 = precision_at_k(model.embed(xte), yte, model.embed(xtr), ytr)
            epochs = n * RECIPES[name].batch_size / len(xtr)
            print(
                f"RESULT {name} {n} steps ({epochs:.1f} epochs) in {train_s:.0f} s -> P@10 {p10:.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
