"""Train: the autoencoder on Ray Train's TorchTrainer (DDP across `workers`, CPU or GPU).

The driver lists and decodes images with Ray Data (pipelines.ingest), hands the dataset to the
trainer, and each worker streams its shard (`ray.train.get_dataset_shard`). Every epoch reports
the loss with a checkpoint (model, optimiser, scheduler, epoch, config); a worker that dies is
restarted from the last checkpoint (`FailureConfig`), and `--resume` continues an earlier run.

    ray job submit --working-dir . -- python -m pipelines.train DATA --out RUN --workers 4 --gpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from imgsim import model as model_lib
from imgsim.config import DEFAULTS
from imgsim.errors import ImgsimError
from imgsim.model import Augment, AutoEncoder, ModelConfig, fit_whitening, training_loss
from imgsim.plots import plot_loss
from imgsim.progress import log
from imgsim.runs import RunPaths, atomic_write_json
from imgsim.sources import list_images
from pipelines.ingest import detect_channels, read_images
from pipelines.runtime import ensure_ray

CHECKPOINT_FILE = "checkpoint.pt"
STATE_FILE = "train-state.json"  # in RUN/checkpoints: the Ray Train run name to resume, the config


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One worker's training loop: read top to bottom like nanoGPT's."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"] + rank)
    # Ray pins OMP threads to the worker's logical CPUs; use the node's cores shared among its workers.
    threads = config["threads_per_worker"] or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size())
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()
    use_cuda = device.type == "cuda"

    # model, optimiser, schedule
    mcfg = ModelConfig.from_dict(config["model"])
    model = AutoEncoder(mcfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=1e-4)
    total_steps = config["epochs"] * config["steps_per_epoch"]
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config["lr"], total_steps=max(total_steps, 1), pct_start=0.05, anneal_strategy="cos"
    )
    start_epoch, history = 0, []

    # resume: Ray Train hands back the latest checkpoint after a failure or with --resume
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"], state["history"]
        if rank == 0:
            log(f"[train] resuming from epoch {start_epoch}")

    if config["nce_weight"] <= 0:
        # Without the contrastive term the projector gets no gradient; DDP would wait for it forever.
        model.projector.requires_grad_(False)
    model = ray.train.torch.prepare_model(model)  # DDP when world > 1; moves to the device
    ae: AutoEncoder = getattr(model, "module", model)
    augment = Augment()
    shard = ray.train.get_dataset_shard("train")
    per_worker_batch = max(1, config["batch_size"] // world)

    for epoch in range(start_epoch, config["epochs"]):
        if config.get("fail_at_epoch") == epoch and not os.path.exists(config["fail_marker"]):
            Path(config["fail_marker"]).touch()  # test hook: fail once, then succeed after restart
            raise RuntimeError(f"injected failure at epoch {epoch}")
        model.train()
        started, seen, loss_sum, steps = time.perf_counter(), 0, 0.0, 0
        for batch in _batches(shard, per_worker_batch, config["steps_per_epoch"], use_cuda):
            x = batch["image"].to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_cuda):
                loss, parts = training_loss(model, x, augment, config["nce_weight"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler.last_epoch < total_steps:
                scheduler.step()
            loss_sum += float(loss.detach())
            seen += len(x)
            steps += 1
            if rank == 0 and steps % config["log_every"] == 0:
                rate = seen * world / (time.perf_counter() - started)
                terms = (
                    f" (recon {parts['recon']:.4f}, nce {parts['nce']:.3f})"
                    if config["nce_weight"] > 0
                    else ""
                )
                log(
                    f"[train] epoch {epoch + 1}/{config['epochs']} step {steps}/{config['steps_per_epoch']} "
                    f"loss {loss_sum / steps:.4f}{terms} {rate:.0f} img/s"
                )
        epoch_loss = _mean_across_workers(loss_sum / max(steps, 1), device, world)
        elapsed = time.perf_counter() - started
        history.append({"epoch": epoch + 1, "loss": epoch_loss, "seconds": elapsed, "images": seen * world})
        if epoch + 1 == config["epochs"]:
            _fit_embedding_mean(
                ae, shard, per_worker_batch, device, world, config["mean_batches"], config["nce_weight"] > 0
            )
        metrics = {"epoch": epoch + 1, "loss": epoch_loss, "images_per_s": seen * world / max(elapsed, 1e-9)}
        if rank == 0:
            log(
                f"[train] epoch {epoch + 1}/{config['epochs']} done: loss {epoch_loss:.4f}, "
                f"{metrics['images_per_s']:.0f} img/s, {elapsed:.0f} s"
            )
            with tempfile.TemporaryDirectory() as d:
                state = {
                    "model": {k: v.cpu() for k, v in ae.state_dict().items()},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch + 1,
                    "history": history,
                    "model_config": mcfg.to_dict(),
                }
                torch.save(state, Path(d) / CHECKPOINT_FILE)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics, checkpoint=None)


def _batches(shard: Any, batch_size: int, steps: int, pin_memory: bool) -> Any:
    """Exactly `steps` batches from the shard: passes over it as often as needed (a small data set
    is repeated within an epoch), and the same count on every worker (DDP needs it)."""
    done = 0
    while done < steps:
        passed = done
        for batch in shard.iter_torch_batches(
            batch_size=batch_size,
            dtypes={"image": torch.uint8},
            device="cpu",
            drop_last=True,
            prefetch_batches=4,
            pin_memory=pin_memory,
        ):
            yield batch
            done += 1
            if done >= steps:
                return
        if done == passed:
            return  # an empty shard: nothing to repeat


def _mean_across_workers(value: float, device: torch.device, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item() / world)


@torch.no_grad()
def _fit_embedding_mean(
    ae: AutoEncoder,
    shard: Any,
    batch_size: int,
    device: torch.device,
    world: int,
    max_batches: int,
    whiten: bool,
) -> None:
    """Fit the embedding's centring and whitening on (a sample of) the training data, all workers."""
    ae.eval()
    dim = ae.config.dim
    total = torch.zeros(dim, dtype=torch.float64, device=device)
    outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    count = torch.zeros(1, dtype=torch.float64, device=device)
    for i, batch in enumerate(shard.iter_torch_batches(batch_size=batch_size, dtypes={"image": torch.uint8})):
        if i >= max_batches:
            break
        z = ae.encode(ae.to_float(batch["image"].to(device))).double()
        total += z.sum(0)
        outer += z.t() @ z
        count += len(z)
    if world > 1:
        for t in (total, outer, count):
            torch.distributed.all_reduce(t)
    fit_whitening(ae, total.cpu(), outer.cpu(), float(count.item()), whiten=whiten)


# -- driver ----------------------------------------------------------------------------------------


def _resolve_run_name(paths: RunPaths, resume: bool) -> tuple[str, dict[str, Any] | None]:
    """Ray Train restores a run's latest checkpoint when the same name is reused: reuse it to resume."""
    state_path = paths.checkpoints_dir / STATE_FILE
    if resume:
        if not state_path.is_file():
            log(f"[train] nothing to resume in {paths.root}; starting a new run")
        else:
            state = json.loads(state_path.read_text())
            return state["run_name"], state
    return f"train-{time.strftime('%Y%m%d-%H%M%S')}-{random.randrange(16**4):04x}", None


def train(
    data: str,
    out: str,
    *,
    epochs: int | None = None,
    min_steps: int = DEFAULTS.train.min_steps,
    image_size: int = DEFAULTS.preprocess.image_size,
    channels: int | None = None,
    dim: int = DEFAULTS.train.dim,
    batch_size: int = DEFAULTS.train.batch_size,
    lr: float = DEFAULTS.train.lr,
    workers: int = DEFAULTS.train.workers,
    use_gpu: bool = DEFAULTS.train.use_gpu,
    resume: bool = False,
    nce_weight: float = DEFAULTS.train.nce_weight,
    seed: int = DEFAULTS.train.seed,
    max_failures: int = 3,
    threads_per_worker: int | None = None,
    _fail_at_epoch: int | None = None,
) -> dict[str, Any]:
    """Train on every image under `data`; save the model under `out`; return a summary.

    `epochs`: passes over the data; None = the default length (DEFAULTS.train.epochs, with small
    data sets repeated so that the run makes at least `min_steps` steps).
    """
    paths = RunPaths(Path(out).resolve())
    paths.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    run_name, previous = _resolve_run_name(paths, resume)
    refs = list_images(data)
    random.Random(seed).shuffle(refs)  # listing is sorted by class folder; batches must mix classes
    if previous:  # a resumed run keeps its architecture and its learning-rate schedule
        model_cfg = ModelConfig.from_dict(previous["model"])
        if epochs not in (None, previous["epochs"]):
            log(f"[train] resuming a {previous['epochs']}-epoch run; --epochs {epochs} is ignored")
        epochs, batch_size = previous["epochs"], previous.get("batch_size", batch_size)
    else:
        channels = channels or detect_channels(refs)
        model_cfg = ModelConfig(image_size=image_size, channels=channels, dim=dim)
    if len(refs) < batch_size:
        batch_size = max(2, len(refs))
    steps_per_pass = max(1, len(refs) // batch_size)
    # A default-length run makes at least `min_steps` optimiser steps: 8 passes over 2,000 images
    # are 60 steps, far too few to learn anything. Each epoch then repeats the data `repeats`
    # times; an explicit --epochs always means exactly that many passes.
    repeats = 1
    if previous:  # (epochs came from it above)
        repeats = previous.get("repeats", 1)
    elif epochs is None:
        epochs = DEFAULTS.train.epochs
        repeats = max(1, math.ceil(min_steps / (epochs * steps_per_pass)))
    steps_per_epoch = steps_per_pass * repeats
    ensure_ray()

    log(f"[train] {len(refs)} images, {model_lib.describe(AutoEncoder(model_cfg))}")
    if repeats > 1:
        log(
            f"[train] a small data set: each epoch passes over it {repeats} times "
            f"(at least {min_steps} steps in all; --epochs E sets exactly E passes)"
        )
    log(
        f"[train] {epochs} epochs x {steps_per_epoch} steps, batch {batch_size}, {workers} worker(s), "
        f"{'GPU' if use_gpu else 'CPU'}; checkpoints in {paths.checkpoints_dir / run_name}"
    )
    atomic_write_json(
        paths.checkpoints_dir / STATE_FILE,
        {
            "run_name": run_name,
            "model": model_cfg.to_dict(),
            "epochs": epochs,
            "batch_size": batch_size,
            "repeats": repeats,
            "data": data,
        },
    )

    ds = read_images(data, model_cfg.image_size, model_cfg.channels, refs=refs, keep_errors=False)
    ds = ds.select_columns(["image"])
    est_bytes = len(refs) * model_cfg.channels * model_cfg.image_size**2
    if est_bytes < 0.2 * ray.available_resources().get("object_store_memory", 0):
        ds = ds.materialize()  # decode once, not every epoch, when the pixels fit comfortably
    # Rows are already in random order (refs were shuffled); each epoch also visits blocks in a new
    # order. Cheaper than a per-row shuffle buffer, which halved throughput on 2 cores.
    ds = ds.randomize_block_order()
    # The loop prints its own progress; Ray Data's per-epoch bars from the split coordinator would
    # print three more bars every epoch.
    ds.context.enable_progress_bars = False

    config = {
        "model": model_cfg.to_dict(),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "nce_weight": nce_weight,
        "seed": seed,
        "steps_per_epoch": steps_per_epoch,
        "threads_per_worker": threads_per_worker,
        "log_every": max(1, steps_per_epoch // 4),
        "mean_batches": max(1, 20_000 // max(1, batch_size // workers)),
        "fail_at_epoch": _fail_at_epoch,
        "fail_marker": str(paths.checkpoints_dir / ".injected-failure"),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(paths.checkpoints_dir),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": ds},
    )
    started = time.perf_counter()
    result = trainer.fit()
    if result.error:
        raise ImgsimError(f"training failed: {result.error}")
    if result.checkpoint is None:
        raise ImgsimError("training produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    model = AutoEncoder(ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    history = state["history"]
    model_lib.save(model, paths.root, extra={"history": history, "data": data, "workers": workers})
    plot_loss([h["loss"] for h in history], paths.plots_dir / "loss.png")
    return {
        "epochs": state["epoch"],
        "images": len(refs),
        "final_loss": history[-1]["loss"],
        "history": history,
        "model_dir": str(paths.model_dir),
        "loss_plot": str(paths.plots_dir / "loss.png"),
        "checkpoint": result.checkpoint.path,
        "seconds": round(time.perf_counter() - started, 1),
        "channels": model.config.channels,
        "image_size": model.config.image_size,
    }


def main() -> None:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        description="Train the imgsim autoencoder with Ray Train (see `imgsim train --help`)."
    )
    p.add_argument("data", metavar="DATA")
    p.add_argument("--out", required=True, metavar="RUN")
    p.add_argument(
        "--epochs", type=int, default=None, help=f"default {d.train.epochs} (see imgsim train --help)"
    )
    p.add_argument("--image-size", type=int, default=d.preprocess.image_size)
    p.add_argument("--channels", type=int, choices=[1, 3], default=None)
    p.add_argument("--dim", type=int, default=d.train.dim)
    p.add_argument("--batch-size", type=int, default=d.train.batch_size)
    p.add_argument("--lr", type=float, default=d.train.lr)
    p.add_argument("--workers", type=int, default=d.train.workers)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--contrastive", type=float, default=d.train.nce_weight, metavar="W")
    a = p.parse_args()
    summary = train(
        a.data,
        a.out,
        epochs=a.epochs,
        image_size=a.image_size,
        channels=a.channels,
        dim=a.dim,
        batch_size=a.batch_size,
        lr=a.lr,
        workers=a.workers,
        use_gpu=a.gpu,
        resume=a.resume,
        nce_weight=a.contrastive,
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))


if __name__ == "__main__":
    main()
