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
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from imgsim.config import DEFAULTS
from imgsim.console.progress import Progress, bar, debug, log, stage
from imgsim.data.sources import ImageRef
from imgsim.errors import ImgsimError
from imgsim.evaluation.plots import plot_loss
from imgsim.io.atomic import atomic_write_json
from imgsim.io.runs import RunPaths
from imgsim.models import autoencoder as model_lib
from imgsim.models.autoencoder import AutoEncoder, ModelConfig, autocast, fit_whitening, memory_format
from imgsim.models.encoders import check_trainable
from imgsim.training.recipes import (
    Recipe,
    choose,
    embedding_statistics,
    fit_trunk_embedding,
    get_recipe,
    trunk_statistics,
)
from imgsim.training.view_features import ViewFeaturizer, views_for
from pipelines.ingest import list_inputs, read_images, sample_data
from pipelines.runtime import ensure_ray, gpu_or_cpu

CHECKPOINT_FILE = "checkpoint.pt"  # inside each Ray Train checkpoint directory
POST_EVERY_S = 0.5  # rank 0 posts its progress (a host sync on a GPU) at most this often


def recipe_of(model: ModelConfig, nce_weight: float | None) -> Recipe:
    """The model's training recipe (`imgsim.training.recipes`); `nce_weight` (--contrastive) overrides the
    weight of its invariance term. Models from before recipes were recorded trained `denoise`."""
    recipe = get_recipe(model.recipe or "denoise")
    if nce_weight is None:
        return recipe
    # a denoising model with the contrastive term is whitened (docs/results.md, "Before `denoise-hog`")
    whiten = {"whiten": nce_weight > 0} if recipe.objective == "denoise" else {}
    return replace(recipe, nce_weight=nce_weight, **whiten)


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
    recipe = recipe_of(mcfg, config["nce_weight"])
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

    if recipe.nce_weight <= 0:
        # Without the contrastive term the projector gets no gradient; DDP would wait for it forever.
        model.projector.requires_grad_(False)
    layout = memory_format(device)  # channels_last with bf16: a GPU, or a CPU with native bf16
    model = model.to(memory_format=layout)
    model = ray.train.torch.prepare_model(model)  # DDP when world > 1; moves to the device
    ae: AutoEncoder = getattr(model, "module", model)
    shard = ray.train.get_dataset_shard("train")
    per_worker_batch = max(1, config["batch_size"] // world)

    for epoch in range(start_epoch, config["epochs"]):
        model.train()
        started, seen, steps = time.perf_counter(), 0, 0
        loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
        posted = 0.0
        for batch in _batches(shard, per_worker_batch, config["steps_per_epoch"], use_cuda, recipe.columns):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if "image" in batch:
                batch["image"] = batch["image"].contiguous(memory_format=layout)
            x = next(iter(batch.values()))
            with autocast(device):
                loss, parts = recipe.batch_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler.last_epoch < total_steps:
                scheduler.step()
            loss_sum += loss.detach()
            seen += len(x)
            steps += 1
            now = time.perf_counter()
            if (
                rank == 0
                and config.get("progress") is not None
                and (now - posted >= POST_EVERY_S or steps == config["steps_per_epoch"])
            ):
                posted = now
                config["progress"].update.remote(
                    {
                        "step": epoch * config["steps_per_epoch"] + steps,
                        "epoch": epoch + 1,
                        "loss": float(loss_sum) / steps,
                        "images_per_s": seen * world / (time.perf_counter() - started),
                    }
                )
            if rank == 0 and steps % config["log_every"] == 0:  # to the worker's log file
                rate = seen * world / (time.perf_counter() - started)
                # the loss's terms (recon, nce, distill) when it has more than one
                shown = {k: float(v) for k, v in parts.items() if k != "nce" or recipe.nce_weight > 0}
                terms = f" ({', '.join(f'{k} {v:.4f}' for k, v in shown.items())})" if len(shown) > 1 else ""
                log(
                    f"[train] epoch {epoch + 1}/{config['epochs']} step {steps}/{config['steps_per_epoch']} "
                    f"loss {float(loss_sum) / steps:.4f}{terms} {rate:.0f} img/s"
                )
        epoch_loss = _mean_across_workers(float(loss_sum) / max(steps, 1), device, world)
        elapsed = time.perf_counter() - started
        history.append({"epoch": epoch + 1, "loss": epoch_loss, "seconds": elapsed, "images": seen * world})
        if epoch + 1 == config["epochs"]:
            _fit_embedding(ae, recipe, shard, per_worker_batch, world, config["mean_batches"])
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


def _batches(
    shard: Any, batch_size: int, steps: int, pin_memory: bool, columns: dict[str, torch.dtype]
) -> Any:
    """Exactly `steps` batches from the shard: passes over it as often as needed (a small data set
    is repeated within an epoch), and the same count on every worker (DDP needs it)."""
    done = 0
    while done < steps:
        passed = done
        for batch in shard.iter_torch_batches(
            batch_size=batch_size,
            dtypes=columns,
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


def _fit_embedding(
    ae: AutoEncoder, recipe: Recipe, shard: Any, batch_size: int, world: int, max_batches: int
) -> None:
    """Fit the embedding's centring (and whitening, if the recipe asks) on a sample of the training
    data, summed over all workers (`imgsim.training.recipes.embedding_statistics`)."""
    device = next(ae.parameters()).device
    column = "features" if recipe.objective == "trunk" else "image"

    def batches() -> Any:
        for i, batch in enumerate(shard.iter_torch_batches(batch_size=batch_size, dtypes=recipe.columns)):
            if i >= max_batches:
                return
            # "trunk": the clean images' trunk features (row 0 of each image's views)
            yield batch[column][:, 0].float() if column == "features" else batch[column]

    if recipe.objective == "trunk":
        sums = trunk_statistics(ae, batches())
        fit_trunk_embedding(ae, *_sum_across_workers(sums, device, world))
        return
    total, outer, count = _sum_across_workers(embedding_statistics(ae, batches()), device, world)
    fit_whitening(ae, total, outer, count, whiten=recipe.whiten)


def _sum_across_workers(sums: tuple[Any, ...], device: torch.device, world: int) -> tuple[Any, ...]:
    """Tensors and counts summed over all workers (unchanged with one)."""
    if world == 1:
        return sums
    out = []
    for value in sums:
        t = (
            value.to(device)
            if isinstance(value, torch.Tensor)
            else torch.tensor([value], dtype=torch.float64, device=device)
        )
        torch.distributed.all_reduce(t)
        out.append(t.cpu() if isinstance(value, torch.Tensor) else float(t.item()))
    return tuple(out)


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
    nce_weight: float | None = None  # --contrastive: overrides the recipe's invariance weight
    lr: float | None = None  # the peak learning rate (None: the recipe's)
    reason: str = ""  # why this architecture and recipe (imgsim.training.recipes.choose), for the console

    @property
    def recipe(self) -> Recipe:
        return recipe_of(self.model, self.nce_weight)

    @property
    def decode_size(self) -> int:
        """The side training images are decoded at (larger than the input where the recipe crops)."""
        return self.recipe.train_image_size(self.model)

    def state(self, data: str) -> dict[str, Any]:
        """What RUN/checkpoints/train-state.json records, for --resume."""
        return {
            "run_name": self.run_name,
            "model": self.model.to_dict(),
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "repeats": self.repeats,
            "steps_per_epoch": self.steps_per_epoch,
            "nce_weight": self.nce_weight,
            "lr": self.lr,
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
        debug(f"train: nothing to resume in {paths.root}; starting a new run")
        return None
    return json.loads(paths.train_state.read_text())


def plan_training(
    paths: RunPaths,
    refs: list[ImageRef],
    *,
    resume: bool,
    epochs: int | None,
    steps: int | None = None,
    min_steps: int = DEFAULTS.train.min_steps,
    image_size: int | None = None,
    channels: int | None = None,
    dim: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    nce_weight: float | None = None,
    arch: str | None = None,
    recipe: str | None = None,
    use_gpu: bool = False,
) -> TrainPlan:
    """Architecture, recipe and length: a resumed run keeps its own; a new one gets them from a
    sample of the data and the hardware (`imgsim.training.recipes.choose`), each flag given winning.

    Length: `epochs` E means exactly E passes over the data; `steps` N about N optimiser steps in
    all, in DEFAULTS.train.epochs epochs (one checkpoint each). Neither: the recipe's default,
    `copy`'s step count (the 10-minute CPU budget; 4x on a GPU), or for the `denoise` objectives
    DEFAULTS.train.epochs passes with a small data set repeated within each epoch up to `min_steps`
    steps (8 passes over 2,000 images are 60 steps, far too few to learn anything).
    """
    previous = _previous_state(paths, resume)
    if previous:  # a resumed run keeps its architecture, recipe and learning-rate schedule
        if epochs not in (None, previous["epochs"]):
            log(f"train: resuming a {previous['epochs']}-epoch run; --epochs {epochs} is ignored")
        model = ModelConfig.from_dict(previous["model"])
        bs = previous.get("batch_size", batch_size or DEFAULTS.train.batch_size)
        spp = max(1, len(refs) // min(bs, max(2, len(refs))))
        return TrainPlan(
            run_name=previous["run_name"],
            model=model,
            epochs=previous["epochs"],
            batch_size=bs,
            repeats=previous.get("repeats", 1),
            steps_per_epoch=previous.get("steps_per_epoch", spp * previous.get("repeats", 1)),
            resumed=True,
            nce_weight=previous.get("nce_weight", nce_weight),
            lr=previous.get("lr", lr),
        )
    sample = sample_data(refs)
    choice = choose(
        sample.sizes, channels or sample.channels, use_gpu, arch=arch, image_size=image_size, recipe=recipe
    )
    model = choice.model_config(**({"dim": dim} if dim else {}))
    batch_size = min(batch_size or choice.batch_size, max(2, len(refs)))
    steps_per_pass = max(1, len(refs) // batch_size)
    if epochs is not None:
        repeats, steps_per_epoch = 1, steps_per_pass
    elif steps is not None or recipe_of(model, None).objective != "denoise":
        epochs = min(DEFAULTS.train.epochs, steps or choice.steps)
        steps_per_epoch = math.ceil((steps or choice.steps) / epochs)
        repeats = math.ceil(steps_per_epoch / steps_per_pass)
    else:
        epochs = DEFAULTS.train.epochs
        repeats = max(1, math.ceil(min_steps / (epochs * steps_per_pass)))
        steps_per_epoch = steps_per_pass * repeats
    return TrainPlan(
        run_name=_new_run_name(),
        model=model,
        epochs=epochs,
        batch_size=batch_size,
        repeats=repeats,
        steps_per_epoch=steps_per_epoch,
        resumed=False,
        nce_weight=nce_weight,
        lr=lr,
        reason=choice.reason,
    )


def training_dataset(data: str, refs: list[ImageRef], plan: TrainPlan) -> ray.data.Dataset:
    """The decoded training images (at `plan.decode_size`) as a Ray Data dataset, decoded once when
    they fit in memory."""
    model, size = plan.model, plan.decode_size
    ds = read_images(data, size, model.channels, refs=refs, keep_errors=False)
    if plan.recipe.objective == "trunk":
        return _trunk_features_dataset(ds, data, refs, plan)
    ds = ds.select_columns(["image"])
    est_bytes = len(refs) * model.channels * size**2
    if est_bytes < 0.2 * ray.available_resources().get("object_store_memory", 0):
        ds = _materialize(ds, "decode", data, refs)  # decode once, not every epoch, when the pixels fit
    # Rows are already in random order (refs were shuffled); each epoch also visits blocks in a new
    # order. Cheaper than a per-row shuffle buffer, which halved throughput on 2 cores.
    ds = ds.randomize_block_order()
    # The loop prints its own progress; Ray Data's per-epoch bars from the split coordinator would
    # print three more bars every epoch.
    ds.context.enable_progress_bars = False
    return ds


def _materialize(ds: ray.data.Dataset, what: str, data: str, refs: list[ImageRef]) -> ray.data.Dataset:
    """`ds` computed once, with a progress line named `what`, and one line on the files skipped."""
    with stage(what, len(refs), "images") as p:
        ds = ds.materialize()
        done = ds.count()
        p.set(done)
    if done < len(refs):
        log(
            f"skipped {len(refs) - done:,} of {len(refs):,} files that could not be read or decoded "
            f"(to list them: imgsim ingest {data} --skipped FILE)"
        )
    return ds


def _trunk_features_dataset(
    ds: ray.data.Dataset, data: str, refs: list[ImageRef], plan: TrainPlan
) -> ray.data.Dataset:
    """ "trunk" recipes: every image's trunk features, clean and of its edited views, computed once
    (`imgsim.training.view_features`) and kept for all epochs."""
    model = plan.model
    views = plan.recipe.views or views_for(len(refs))
    log(
        f"train: the trunk's features of each image and {views} edited views of it are computed once "
        f"({len(refs) * (views + 1):,} trunk passes), then the head trains on them"
    )
    ds = ds.select_columns(["path", "image"]).map_batches(
        ViewFeaturizer,
        fn_constructor_kwargs={
            "trunk": model.trunk,
            "image_size": model.image_size,
            "recon_size": model.recon_size or model.image_size,
            "views": views,
            "threads": 1,
        },
        batch_size=VIEW_BATCH,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=DEFAULTS.index.concurrency),
        num_cpus=1,
    )
    ds = _materialize(ds, "trunk features", data, refs)
    ds = ds.randomize_block_order()
    ds.context.enable_progress_bars = False
    return ds


#: Images per trunk-features task (each makes views + 1 trunk passes).
VIEW_BATCH = 16


def make_trainer(
    plan: TrainPlan,
    ds: ray.data.Dataset,
    paths: RunPaths,
    *,
    seed: int,
    workers: int,
    use_gpu: bool,
    max_failures: int,
    threads_per_worker: int | None,
    gpus_per_worker: float = 1.0,
    backend: str | None = None,
    progress: Any = None,
) -> TorchTrainer:
    """The TorchTrainer: `train_loop_per_worker` on `workers` workers, checkpoints under RUN.

    `gpus_per_worker` below 1 packs several workers on one GPU; they then talk over `gloo` (NCCL
    refuses two ranks on one device), else over `nccl` on GPUs and `gloo` on CPUs; `backend` forces
    one. `progress`: a `TrainProgress` actor that rank 0 posts its step and loss to (the driver's bar).
    """
    config = {
        "model": plan.model.to_dict(),
        "epochs": plan.epochs,
        "batch_size": plan.batch_size,
        "lr": plan.lr or plan.recipe.lr,
        "nce_weight": plan.nce_weight,
        "seed": seed,
        "steps_per_epoch": plan.steps_per_epoch,
        "threads_per_worker": threads_per_worker,
        "log_every": max(1, plan.steps_per_epoch // 4),
        "mean_batches": max(1, 20_000 // max(1, plan.batch_size // workers)),
        "progress": progress,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": 1, **({"GPU": gpus_per_worker} if use_gpu else {})},
        ),
        torch_config=TorchConfig(backend=backend or ("nccl" if use_gpu and gpus_per_worker >= 1 else "gloo")),
        run_config=RunConfig(
            name=plan.run_name,
            storage_path=str(paths.checkpoints_dir),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": ds},
        # Ray Train's default ingest options set the deprecated `ExecutionOptions.exclude_resources`;
        # the same options, without it.
        dataset_config=DataConfig(execution_options=_ingest_options()),
    )


def _ingest_options() -> ray.data.ExecutionOptions:
    """The driver's Ray Data execution options, as Ray Train would carry them over to the shards."""
    current = ray.data.DataContext.get_current().execution_options
    return ray.data.ExecutionOptions(
        resource_limits=current.resource_limits,
        preserve_order=current.preserve_order,
        verbose_progress=current.verbose_progress,
    )


@ray.remote(num_cpus=0)
class TrainProgress:
    """Rank 0 posts its step, epoch and loss here; the driver reads them for its progress bar (the
    workers' own output stays in their log files, RUN/logs/)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def update(self, state: dict[str, Any]) -> None:
        self.state = state

    def read(self) -> dict[str, Any]:
        return self.state


POLL_S = 0.5  # how often the driver reads the training progress


def fit_with_progress(trainer: TorchTrainer, board: Any, plan: TrainPlan) -> Any:
    """`trainer.fit()`, with a bar of the optimiser steps of all epochs fed by `board`."""
    total = plan.epochs * plan.steps_per_epoch
    with bar(total, "train", "steps", show_rate=False) as p:  # the note has the images per second
        stop = threading.Event()

        def show(state: dict[str, Any]) -> None:
            if state:
                p.set(int(state["step"]))
                p.note(
                    f"epoch {state['epoch']}/{plan.epochs}, loss {state['loss']:.4f}, "
                    f"{state['images_per_s']:,.0f} img/s"
                )

        def poll() -> None:
            while not stop.wait(POLL_S):
                try:
                    show(ray.get(board.read.remote(), timeout=30))
                except Exception:  # a slow or restarting actor: try again at the next tick
                    continue

        poller = threading.Thread(target=poll, name="imgsim-train-progress", daemon=True)
        poller.start()
        try:
            result = trainer.fit()
        finally:
            stop.set()
            poller.join(timeout=35)
        show(ray.get(board.read.remote(), timeout=30))
        _show_failed(result, p)
    return result


def _show_failed(result: Any, p: Progress) -> None:
    """A failed run leaves its bar where it stopped, not at 100 %."""
    if getattr(result, "error", None):
        p.close(failed=True)


def export_model(
    result: Any, paths: RunPaths, data: str, workers: int, plan: TrainPlan | None = None
) -> tuple[AutoEncoder, dict[str, Any]]:
    """Save the final checkpoint's model as RUN/model (loadable without Ray) and plot its loss."""
    if result.error:
        raise ImgsimError(f"training failed: {result.error}")
    if result.checkpoint is None:
        raise ImgsimError("training produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    model = AutoEncoder(ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    extra = {"history": state["history"], "data": data, "workers": workers}
    if plan is not None:
        extra |= {"recipe": plan.recipe.to_dict(), "reason": plan.reason}
    model_lib.save(model, paths.root, extra=extra)
    plot_loss([h["loss"] for h in state["history"]], paths.loss_plot)
    return model, state


def train(
    data: str,
    out: str,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    min_steps: int = DEFAULTS.train.min_steps,
    image_size: int | None = None,
    channels: int | None = None,
    dim: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    workers: int = DEFAULTS.train.workers,
    use_gpu: bool = DEFAULTS.train.use_gpu,
    gpus_per_worker: float = 1.0,
    backend: str | None = None,
    resume: bool = False,
    nce_weight: float | None = None,
    arch: str | None = None,
    recipe: str | None = None,
    seed: int = DEFAULTS.train.seed,
    max_failures: int = 3,
    threads_per_worker: int | None = None,
) -> dict[str, Any]:
    """Train on every image under `data`; save the model under `out`; return a summary.

    Arguments left None are chosen from the data and the hardware (`plan_training`).
    """
    paths = RunPaths(Path(out).resolve())
    check_trainable(paths.root)  # an imported encoder cannot be trained or resumed
    paths.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    refs = list_inputs(data)
    random.Random(seed).shuffle(refs)  # listing is sorted by class folder; batches must mix classes
    plan = plan_training(
        paths,
        refs,
        resume=resume,
        epochs=epochs,
        steps=steps,
        min_steps=min_steps,
        image_size=image_size,
        channels=channels,
        dim=dim,
        batch_size=batch_size,
        lr=lr,
        nce_weight=nce_weight,
        arch=arch,
        recipe=recipe,
        use_gpu=use_gpu,
    )
    ensure_ray()
    use_gpu = gpu_or_cpu(use_gpu, "training")
    if use_gpu:
        check_gpus(workers, gpus_per_worker)
    _log_plan(plan, len(refs), workers, use_gpu, paths)
    atomic_write_json(paths.train_state, plan.state(data))
    board = TrainProgress.remote()
    trainer = make_trainer(
        plan,
        training_dataset(data, refs, plan),
        paths,
        seed=seed,
        workers=workers,
        use_gpu=use_gpu,
        max_failures=max_failures,
        threads_per_worker=threads_per_worker,
        gpus_per_worker=gpus_per_worker,
        backend=backend,
        progress=board,
    )
    started = time.perf_counter()
    result = fit_with_progress(trainer, board, plan)
    ray.kill(board)
    model, state = export_model(result, paths, data, workers, plan)
    history = state["history"]
    return {
        "epochs": state["epoch"],
        "steps": plan.epochs * plan.steps_per_epoch,
        "images": len(refs),
        "final_loss": history[-1]["loss"],
        "history": history,
        "model_dir": str(paths.model_dir),
        "loss_plot": str(paths.loss_plot),
        "checkpoint": result.checkpoint.path,
        "seconds": round(time.perf_counter() - started, 1),
        "channels": model.config.channels,
        "image_size": model.config.image_size,
        "arch": model.config.arch,
        "recipe": model.config.recipe or "denoise",
        "dim": model.config.dim,
        "reason": plan.reason,
    }


def check_gpus(workers: int, gpus_per_worker: float) -> None:
    """One line when the cluster has fewer GPUs than the workers ask for: Ray Train then waits
    (an autoscaling cluster may still add GPU nodes), which otherwise looks like a hang."""
    have = ray.cluster_resources().get("GPU", 0)
    need = workers * gpus_per_worker
    if have >= need:
        return
    fits = int(have // gpus_per_worker) if gpus_per_worker else 0
    hint = f"--workers {fits}" if fits else f"--gpus-per-worker {have / workers:g}"
    log(
        f"train: {workers} worker{'s' if workers != 1 else ''} x {gpus_per_worker:g} GPU need {need:g} GPUs and "
        f"the cluster has {have:g} now; training waits for more GPU nodes (or run with {hint})"
    )


def _log_plan(plan: TrainPlan, images: int, workers: int, use_gpu: bool, paths: RunPaths) -> None:
    if plan.resumed:
        log(f"train: resuming {paths.checkpoints_dir / plan.run_name}")
    elif plan.reason:
        log(f"train: {plan.reason}")
    model = AutoEncoder(plan.model)
    log(
        f"train: {images:,} images, {plan.epochs} epoch{'s' if plan.epochs != 1 else ''} x "
        f"{plan.steps_per_epoch:,} steps, batch {plan.batch_size}, {workers} worker{'s' if workers != 1 else ''} "
        f"on {'GPU' if use_gpu else 'CPU'}; {plan.model.arch} {plan.model.image_size} px, recipe "
        f"{plan.model.recipe or 'denoise'}, {plan.model.dim}-d embedding, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters"
    )
    debug(f"train: {model_lib.describe(model)}; checkpoints in {paths.checkpoints_dir / plan.run_name}")
    per_worker = plan.batch_size // workers
    if plan.recipe.distill_weight > 0 and per_worker < model_lib.MIN_DISTILL_BATCH:
        log(
            f"train: batches of {per_worker} images per worker are too few to rank neighbours, so the "
            f"oriented-gradient distillation is left out (it needs {model_lib.MIN_DISTILL_BATCH}); "
            "this trains as plain denoise"
        )
    if plan.repeats > 1 and not plan.resumed:
        log(
            f"train: a small data set, so each epoch passes over it {plan.repeats} times "
            f"({plan.epochs * plan.steps_per_epoch:,} steps in all; --epochs E sets exactly E passes)"
        )


if __name__ == "__main__":
    import sys

    from imgsim.console.command import run_as_module
    from pipelines.commands.train import COMMAND

    sys.exit(run_as_module(COMMAND))
