"""bf16 on the CPU against float32, in the same run: embedding cost, training step, agreement.

`imgsim.models.autoencoder.uses_bf16` turns bf16 autocast and channels_last on for CPUs with native bf16 (AVX-512
BF16 / AMX). This measures what that buys on this machine for both model families as `imgsim train`
chooses them (small/denoise for 28 px greyscale, resnet/copy for photos), alternating the two
precisions round by round on the same inputs, and how far apart the two embeddings of one image are:

    python -m bench.bf16 [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import numpy as np
import torch

from imgsim.models import autoencoder as model_lib
from imgsim.models.autoencoder import AutoEncoder
from imgsim.training.recipes import choose, get_recipe

FAMILIES = {"small (28 px greyscale)": ([(28, 28)] * 8, 1), "resnet (photos)": ([(512, 512)] * 8, 3)}


def measure(sample: list[tuple[int, int]], channels: int, rounds: int, embed_n: int) -> dict[str, Any]:
    choice = choose(sample, channels)
    config = choice.model_config()
    recipe = get_recipe(choice.recipe)
    torch.manual_seed(0)
    model = AutoEncoder(config)
    if recipe.nce_weight <= 0:
        model.projector.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    side = recipe.train_image_size(config)
    train_x = torch.from_numpy(
        rng.integers(0, 256, (choice.batch_size, channels, side, side), dtype=np.uint8)
    )
    embed_x = rng.integers(0, 256, (embed_n, channels, config.image_size, config.image_size), dtype=np.uint8)

    def step() -> None:
        with model_lib.autocast("cpu"):
            loss, _ = recipe.loss(model, train_x.contiguous(memory_format=model_lib.memory_format("cpu")))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times: dict[str, dict[str, list[float]]] = {"float32": {}, "bf16": {}}
    for r in range(rounds + 1):  # round 0 warms both up and is not counted
        for name, flag in (
            (("float32", "0"), ("bf16", "1")) if r % 2 == 0 else (("bf16", "1"), ("float32", "0"))
        ):
            os.environ[model_lib.CPU_BF16_ENV] = flag
            model.to(memory_format=model_lib.memory_format("cpu"))
            model.train()
            train_s = []
            for _ in range(3):
                started = time.perf_counter()
                step()
                train_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            model.embed(embed_x)
            embed_s = time.perf_counter() - started
            if r:
                times[name].setdefault("train_step_ms", []).append(1000 * statistics.median(train_s))
                times[name].setdefault("embed_us_per_image", []).append(1e6 * embed_s / embed_n)
    embeddings = []  # the same weights embedded both ways
    for flag in ("0", "1"):
        os.environ[model_lib.CPU_BF16_ENV] = flag
        embeddings.append(model.embed(embed_x))
    os.environ.pop(model_lib.CPU_BF16_ENV, None)
    a, b = embeddings
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    best = {p: {k: round(min(v), 1) for k, v in t.items()} for p, t in times.items()}
    return {
        "model": f"{choice.arch} {config.image_size} px, recipe {choice.recipe}, batch {choice.batch_size}",
        **best,
        "train_speedup": round(best["float32"]["train_step_ms"] / best["bf16"]["train_step_ms"], 2),
        "embed_speedup": round(best["float32"]["embed_us_per_image"] / best["bf16"]["embed_us_per_image"], 2),
        "cosine_distance_fp32_vs_bf16": {
            "median": float(np.median(1 - cosine)),
            "max": float(np.max(1 - cosine)),
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds per precision (best kept)")
    p.add_argument("--embed-n", type=int, default=512, help="images embedded per round")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    native = model_lib._cpu_has_native_bf16()
    out: dict[str, Any] = {"cpu_native_bf16": native, "threads": args.threads, "families": {}}
    for name, (sample, channels) in FAMILIES.items():
        out["families"][name] = row = measure(sample, channels, args.rounds, args.embed_n)
        if not args.json:
            print(
                f"{name}: {row['model']}\n"
                f"  train step {row['float32']['train_step_ms']} ms float32 vs {row['bf16']['train_step_ms']} ms "
                f"bf16 ({row['train_speedup']}x); embed {row['float32']['embed_us_per_image']} vs "
                f"{row['bf16']['embed_us_per_image']} us/image ({row['embed_speedup']}x); cosine distance "
                f"between the two: median {row['cosine_distance_fp32_vs_bf16']['median']:.1e}, "
                f"max {row['cosine_distance_fp32_vs_bf16']['max']:.1e}",
                flush=True,
            )
    if not native:
        print(
            "this CPU has no native bf16: imgsim keeps float32 here (imgsim.models.autoencoder.uses_bf16)",
            flush=True,
        )
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
