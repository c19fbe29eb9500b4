"""Train: the autoencoder on Ray Train's TorchTrainer (DDP across `workers`, CPU or GPU).

The driver lists and decodes images with Ray Data (pipelines.ingest), hands the dataset to the
trainer, and each worker streams its shard (`ray.train.get_dataset_shard`). Every epoch reports
the loss with a checkpoint (model, optimiser, scheduler, epoch, config); a worker that dies is
restarted from the last checkpoint (`FailureConfig`), and `--resume` continues an earlier run.

    ray job submit --working-dir . -- python -m pipelines.train DATA --out RUN --workers 4 --gpu
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from imgsim import model as model_lib
from imgsim.atomic import atomic_write_json
from imgsim.config import DEFAULTS
from imgsim.encoders import check_trainable
from imgsim.errors import ImgsimError
from imgsim.model import Augment, AutoEncoder, ModelConfig, fit_whitening, training_loss
from imgsim.plots import plot_loss
from imgsim.progress import log
from imgsim.runs import RunPaths
from imgsim.sources import ImageRef, list_images
from pipelines.ingest import detect_channels, read_images
from pipelines.runtime import ensure_ray

CHECKPOINT_FILE = "checkpoint.pt"  # inside each Ray Train checkpoint directory


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


@dataclass(frozen=True)
class TrainPlan:
    """What a training run will do: its Ray Train name, architecture and length."""

    run_name: str
    model: ModelConfig
    epochs: int
    batch_size: int
    repeats: int  # passes over the data per epoch (a small data set is repeated)
    steps_per_epoch: int
    resumed: bool

    def state(self, data: str) -> dict[str, Any]:
        """What RUN/checkpoints/train-state.json records, for --resume."""
        return {
            "run_name": self.run_name,
            "model": self.model.to_dict(),
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "repeats": self.repeats,
            "data": data,
        }


def _new_run_name() -> str:
    return f"train-{time.strftime('%Y%m%d-%H%M%S')}-{random.randrange(16**4):04x}"


def _previous_state(paths: RunPaths, resume: bool) -> dict[str, Any] | None:
    """The state of the run to resume (Ray Train restores a run's latest checkpoint when its name
    is reused), or None for a new run."""
    if not resume:
        return None
    if not paths.train_state.is_file():
        log(f"[train] nothing to resume in {paths.root}; starting a new run")
        return None
    return json.loads(paths.train_state.read_text())


def plan_training(
    paths: RunPaths,
    refs: list[ImageRef],
    *,
    resume: bool,
    epochs: int | None,
    min_steps: int,
    image_size: int,
    channels: int | None,
    dim: int,
    batch_size: int,
) -> TrainPlan:
    """Architecture and length: a resumed run keeps its own; a new one gets them from the arguments.

    `epochs` None means the default length: DEFAULTS.train.epochs, and a small data set repeated
    within each epoch so that the run makes at least `min_steps` optimiser steps (8 passes over
    2,000 images are 60 steps, far too few to learn anything). An explicit `epochs` always means
    exactly that many passes.
    """
    previous = _previous_state(paths, resume)
    if previous:  # a resumed run keeps its architecture and its learning-rate schedule
        if epochs not in (None, previous["epochs"]):
            log(f"[train] resuming a {previous['epochs']}-epoch run; --epochs {epochs} is ignored")
        model = ModelConfig.from_dict(previous["model"])
        epochs, batch_size = previous["epochs"], previous.get("batch_size", batch_size)
    else:
        model = ModelConfig(image_size=image_size, channels=channels or detect_channels(refs), dim=dim)
    batch_size = min(batch_size, max(2, len(refs)))
    steps_per_pass = max(1, len(refs) // batch_size)
    if previous:
        repeats = previous.get("repeats", 1)
    elif epochs is None:
        epochs = DEFAULTS.train.epochs
        repeats = max(1, math.ceil(min_steps / (epochs * steps_per_pass)))
    else:
        repeats = 1
    return TrainPlan(
        run_name=previous["run_name"] if previous else _new_run_name(),
        model=model,
        epochs=epochs,
        batch_size=batch_size,
        repeats=repeats,
        steps_per_epoch=steps_per_pass * repeats,
        resumed=previous is not None,
    )


def training_dataset(data: str, refs: list[ImageRef], model: ModelConfig) -> ray.data.Dataset:
    """The decoded training images as a Ray Data dataset (decoded once when they fit in memory)."""
    ds = read_images(data, model.image_size, model.channels, refs=refs, keep_errors=False)
    ds = ds.select_columns(["image"])
    est_bytes = len(refs) * model.channels * model.image_size**2
    if est_bytes < 0.2 * ray.available_resources().get("object_store_memory", 0):
        ds = ds.materialize()  # decode once, not every epoch, when the pixels fit comfortably
    # Rows are already in random order (refs were shuffled); each epoch also visits blocks in a new
    # order. Cheaper than a per-row shuffle buffer, which halved throughput on 2 cores.
    ds = ds.randomize_block_order()
    # The loop prints its own progress; Ray Data's per-epoch bars from the split coordinator would
    # print three more bars every epoch.
    ds.context.enable_progress_bars = False
    return ds


def make_trainer(
    plan: TrainPlan,
    ds: ray.data.Dataset,
    paths: RunPaths,
    *,
    lr: float,
    nce_weight: float,
    seed: int,
    workers: int,
    use_gpu: bool,
    max_failures: int,
    threads_per_worker: int | None,
) -> TorchTrainer:
    """The TorchTrainer: `train_loop_per_worker` on `workers` workers, checkpoints under RUN."""
    config = {
        "model": plan.model.to_dict(),
        "epochs": plan.epochs,
        "batch_size": plan.batch_size,
        "lr": lr,
        "nce_weight": nce_weight,
        "seed": seed,
        "steps_per_epoch": plan.steps_per_epoch,
        "threads_per_worker": threads_per_worker,
        "log_every": max(1, plan.steps_per_epoch // 4),
        "mean_batches": max(1, 20_000 // max(1, plan.batch_size // workers)),
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(
            name=plan.run_name,
            storage_path=str(paths.checkpoints_dir),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": ds},
    )


def export_model(result: Any, paths: RunPaths, data: str, workers: int) -> tuple[AutoEncoder, dict[str, Any]]:
    """Save the final checkpoint's model as RUN/model (loadable without Ray) and plot its loss."""
    if result.error:
        raise ImgsimError(f"training failed: {result.error}")
    if result.checkpoint is None:
        raise ImgsimError("training produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    model = AutoEncoder(ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    model_lib.save(model, paths.root, extra={"history": state["history"], "data": data, "workers": workers})
    plot_loss([h["loss"] for h in state["history"]], paths.loss_plot)
    return model, state


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
) -> dict[str, Any]:
    """Train on every image under `data`; save the model under `out`; return a summary.

    `epochs`: passes over the data; None = the default length (see `plan_training`).
    """
    paths = RunPaths(Path(out).resolve())
    check_trainable(paths.root)  # an imported encoder cannot be trained or resumed
    paths.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    refs = list_images(data)
    random.Random(seed).shuffle(refs)  # listing is sorted by class folder; batches must mix classes
    plan = plan_training(
        paths,
        refs,
        resume=resume,
        epochs=epochs,
        min_steps=min_steps,
        image_size=image_size,
        channels=channels,
        dim=dim,
        batch_size=batch_size,
    )
    ensure_ray()
    _log_plan(plan, len(refs), min_steps, workers, use_gpu, paths)
    atomic_write_json(paths.train_state, plan.state(data))
    trainer = make_trainer(
        plan,
        training_dataset(data, refs, plan.model),
        paths,
        lr=lr,
        nce_weight=nce_weight,
        seed=seed,
        workers=workers,
        use_gpu=use_gpu,
        max_failures=max_failures,
        threads_per_worker=threads_per_worker,
    )
    started = time.perf_counter()
    result = trainer.fit()
    model, state = export_model(result, paths, data, workers)
    history = state["history"]
    return {
        "epochs": state["epoch"],
        "images": len(refs),
        "final_loss": history[-1]["loss"],
        "history": history,
        "model_dir": str(paths.model_dir),
        "loss_plot": str(paths.loss_plot),
        "checkpoint": result.checkpoint.path,
        "seconds": round(time.perf_counter() - started, 1),
        "channels": model.config.channels,
        "image_size": model.config.image_size,
    }


def _log_plan(
    plan: TrainPlan, images: int, min_steps: int, workers: int, use_gpu: bool, paths: RunPaths
) -> None:
    log(f"[train] {images} images, {model_lib.describe(AutoEncoder(plan.model))}")
    if plan.repeats > 1 and not plan.resumed:
        log(
            f"[train] a small data set: each epoch passes over it {plan.repeats} times "
            f"(at least {min_steps} steps in all; --epochs E sets exactly E passes)"
        )
    log(
        f"[train] {plan.epochs} epochs x {plan.steps_per_epoch} steps, batch {plan.batch_size}, "
        f"{workers} worker(s), {'GPU' if use_gpu else 'CPU'}; checkpoints in "
        f"{paths.checkpoints_dir / plan.run_name}"
    )


if __name__ == "__main__":
    import sys

    from imgsim.cli import main_for

    sys.exit(main_for("train"))
