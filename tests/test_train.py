"""Ray Train: DDP across 2 workers on CPU, resume from a checkpoint, restart after a worker failure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from imgsim import model as model_lib
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


def test_resume_continues_from_the_saved_epoch(image_folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # a first run that is interrupted after 2 epochs (the failure budget is 0, so it stops)
    with pytest.raises(Exception, match="injected failure"):
        train(str(image_folder), str(run), epochs=4, workers=1, max_failures=0, _fail_at_epoch=2, **TINY)
    state = json.loads((run / "checkpoints" / "train-state.json").read_text())
    summary = train(str(image_folder), str(run), epochs=4, workers=1, resume=True, **TINY)
    assert summary["epochs"] == 4
    # the history carries the first two epochs over; only epochs 3 and 4 ran again
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3, 4]
    assert json.loads((run / "checkpoints" / "train-state.json").read_text())["run_name"] == state["run_name"]


def test_a_failed_worker_restarts_from_its_checkpoint_and_the_run_finishes(
    image_folder: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    summary = train(
        str(image_folder), str(run), epochs=3, workers=2, threads_per_worker=1, _fail_at_epoch=1, **TINY
    )
    assert (run / "checkpoints" / ".injected-failure").exists()  # the failure did happen
    assert summary["epochs"] == 3
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]  # epoch 1 was not redone
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
