"""Ray Train: DDP across 2 workers on CPU; resume after the driver is killed; a killed worker restarts."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from bench.processes import kill_tree, latest_checkpoint, ray_processes, wait_for
from imgsim.models import autoencoder as model_lib
from pipelines.train import train

pytestmark = pytest.mark.usefixtures("ray_session")

TINY = {"image_size": 16, "dim": 8, "batch_size": 8, "lr": 3e-3}


def test_two_worker_ddp_reduces_the_loss_and_saves_a_loadable_model(
    image_folder: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    summary = train(str(image_folder), str(run), epochs=4, workers=2, threads_per_worker=1, **TINY)
    losses = [h["loss"] for h in summary["history"]]
    assert summary["epochs"] == 4 and len(losses) == 4
    assert losses[-1] < losses[0]
    assert summary["images"] == 25
    model = model_lib.load(run)
    assert model.config.image_size == 16 and model.config.channels == 1  # greyscale data detected
    emb = model.embed(np.zeros((2, 1, 16, 16), dtype=np.uint8))
    assert emb.shape == (2, 8) and np.isfinite(emb).all()
    assert float(np.abs(model.emb_mean.numpy()).sum()) > 0  # the centre was fitted on training data
    assert (run / "plots" / "loss.png").stat().st_size > 1000


def test_resume_continues_after_the_driver_is_killed(image_folder: Path, tmp_path: Path) -> None:
    # `imgsim train` is killed (SIGKILL, as the OOM killer or a lost node would) after an epoch's
    # checkpoint; `--resume` then continues the same Ray Train run from it.
    run = tmp_path / "run"
    argv = ["train", str(image_folder), "--out", str(run), "--epochs", "12", "--workers", "1"]
    argv += ["--image-size", "16", "--dim", "8", "--batch-size", "8"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "imgsim.cli", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        at_kill = wait_for(lambda: latest_checkpoint(run), 240, "a first checkpoint")
    finally:
        kill_tree(driver.pid)
    assert driver.wait(timeout=30) != 0
    assert not (run / "model" / "model.pt").exists()  # it never finished
    state = json.loads((run / "checkpoints" / "train-state.json").read_text())
    summary = train(str(image_folder), str(run), epochs=12, workers=1, resume=True, **TINY)
    assert summary["epochs"] == 12
    assert [h["epoch"] for h in summary["history"]] == list(range(1, 13))
    # the epochs done before the kill were kept, not trained again
    assert summary["history"][: at_kill["epoch"]] == at_kill["history"]
    assert json.loads((run / "checkpoints" / "train-state.json").read_text())["run_name"] == state["run_name"]
    model_lib.load(run)


def test_a_killed_worker_restarts_from_its_checkpoint_and_the_run_finishes(
    image_folder: Path, tmp_path: Path
) -> None:
    # A Ray Train worker process is SIGKILLed mid-run; Ray Train restarts the worker group from the
    # last checkpoint by itself (FailureConfig) and the run finishes.
    run = tmp_path / "run"
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["summary"] = train(
                str(image_folder), str(run), epochs=12, workers=2, threads_per_worker=1, **TINY
            )
        except BaseException as e:  # reported by the assertions below
            outcome["error"] = e

    trainer = threading.Thread(target=fit)
    trainer.start()
    at_kill = wait_for(lambda: latest_checkpoint(run), 240, "a first checkpoint")
    (victim, *_) = wait_for(lambda: ray_processes("RayTrainWorker"), 60, "a Ray Train worker process")
    victim.kill()
    trainer.join(timeout=600)
    assert not trainer.is_alive() and "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert victim.pid not in {p.pid for p in ray_processes("RayTrainWorker")}
    assert summary["epochs"] == 12
    assert [h["epoch"] for h in summary["history"]] == list(range(1, 13))
    assert summary["history"][: at_kill["epoch"]] == at_kill["history"]  # restarted from a checkpoint
    model_lib.load(run)


def test_default_length_repeats_a_small_data_set_up_to_min_steps(image_folder: Path, tmp_path: Path) -> None:
    # 25 images in batches of 8 are 3 steps a pass; 8 default epochs would be 24 steps, so each
    # epoch passes over the data ceil(60 / 24) = 3 times: 9 steps, 72 images, per epoch.
    summary = train(str(image_folder), str(tmp_path / "run"), min_steps=60, workers=1, **TINY)
    assert summary["epochs"] == 8
    assert [h["images"] for h in summary["history"]] == [72] * 8
    # an explicit --epochs means exactly that many passes
    summary = train(str(image_folder), str(tmp_path / "run2"), epochs=2, min_steps=60, workers=1, **TINY)
    assert [h["images"] for h in summary["history"]] == [24, 24]
