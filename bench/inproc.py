"""A plain in-process training loop (no Ray) over a uint8 tensor, for recipe experiments.

It calls exactly what Ray Train's loop calls: `recipe.loss(model, x_uint8)` per batch, then
`recipe.fit_embedding(model, batches)`. The learning rate follows a warm-up + cosine schedule over
`steps`, or over the steps that fit in `minutes` (estimated from the first 10 steps).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from imgsim.models.autoencoder import AutoEncoder, ModelConfig, autocast, memory_format
from imgsim.training.recipes import Recipe


def train(
    images: torch.Tensor,
    config: ModelConfig,
    recipe: Recipe,
    *,
    steps: int | None = None,
    minutes: float | None = None,
    seed: int = 0,
    log_every: int = 50,
    fit_images: torch.Tensor | None = None,
) -> tuple[AutoEncoder, dict]:
    """Train on uint8 (N, C, T, T) images (T = recipe.train_image_size(config)); return model and stats.

    `fit_images`: the same images at the model's input size, for the embedding's centring (default:
    `images` scaled down)."""
    torch.manual_seed(seed)
    model = AutoEncoder(config)
    layout = memory_format("cpu")  # as Ray Train's loop does (imgsim.models.autoencoder.uses_bf16)
    model = model.to(memory_format=layout)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-4)
    batch = min(recipe.batch_size, len(images))
    total = steps or recipe.steps
    budget = minutes * 60 if minutes else None
    warmup = 50
    started = time.perf_counter()
    step, seen, parts = 0, 0, {}
    g = torch.Generator().manual_seed(seed)
    while step < total:
        perm = torch.randperm(len(images), generator=g)
        for s in range(0, len(perm) - batch + 1, batch):
            if budget and step == 10:  # how many steps fit the budget
                total = max(20, int(budget / ((time.perf_counter() - started) / 10)))
            frac = min(1.0, step / total)
            for group in opt.param_groups:
                group["lr"] = recipe.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * frac))
            with autocast("cpu"):
                loss, parts = recipe.loss(model, images[perm[s : s + batch]].contiguous(memory_format=layout))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += batch
            if log_every and step % log_every == 0:
                rate = seen / (time.perf_counter() - started)
                print(
                    f"  step {step}/{total} loss {float(loss.detach()):.4f} "
                    f"{ {k: round(float(v), 4) for k, v in parts.items()} } {rate:.0f} img/s",
                    flush=True,
                )
            if step >= total or (budget and time.perf_counter() - started > budget * 1.02):
                total = step
                break
    train_s = time.perf_counter() - started
    size = config.image_size
    if fit_images is not None:
        images = fit_images
    fit_batches = [
        F.interpolate(images[i : i + 256].float(), size=(size, size), mode="area").round().to(torch.uint8)
        if images.shape[-1] != size
        else images[i : i + 256]
        for i in range(0, min(len(images), 20_000), 256)
    ]
    recipe.fit_embedding(model, fit_batches)
    model.eval()
    last = {k: float(v) for k, v in parts.items()}
    return model, {"steps": step, "train_s": train_s, "images_per_s": seen / train_s, "last": last}
