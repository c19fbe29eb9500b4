"""The pretrained-trunk autoencoder ("lite0"): chosen for photos, each loss term falls in a short
training run and the decoder reconstructs, the saved model loads on its fast path with the same
embeddings as eager PyTorch, other trunk weights are refused, and `imgsim train` runs it end to end
through Ray Train, its run indexing and answering queries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from imgsim.errors import ModelMismatch
from imgsim.models import autoencoder as model_lib
from imgsim.models.autoencoder import AutoEncoder
from imgsim.models.trunk_head import feature_width, thumbnail
from imgsim.training.recipes import choose, fit_trunk_embedding, get_recipe, trunk_statistics
from imgsim.training.view_features import MAX_VIEWS, MIN_VIEWS, ViewFeaturizer, views_for
from tests.test_recipes import blob_photo, decoded

VIEWS = 3


@pytest.fixture(scope="module")
def config():
    return choose([(640, 480)] * 9, channels=3, arch="lite0").model_config()


@pytest.fixture(scope="module")
def features(config) -> dict[str, np.ndarray]:
    """40 colourful pictures' trunk features (clean + VIEWS edited views each) and 32 px targets."""
    torch.set_num_threads(2)
    images = np.stack([decoded(blob_photo(i, size=200), 280) for i in range(40)])
    featurize = ViewFeaturizer(config.trunk, config.image_size, config.recon_size, VIEWS)
    return featurize({"image": images, "path": np.array([f"p{i}.png" for i in range(40)])})


def test_photos_get_the_pretrained_trunk_and_small_images_keep_the_small_model() -> None:
    photos = choose([(1024, 768)] * 10, channels=3, arch="lite0")
    assert (photos.arch, photos.recipe, photos.image_size) == ("lite0", "trunk-copy", 224)
    assert "pretrained EfficientNet-Lite0" in photos.reason
    config = photos.model_config()
    assert config.trunk == "efficientnet-lite0" and len(config.trunk_sha256) == 64
    assert 0 < config.trunk_dims < config.dim
    assert choose([(28, 28)] * 10, channels=1).arch == "small"
    default = choose([(1024, 768)] * 10, channels=3)  # the default for photos (docs/pretrained.md)
    assert (default.arch, default.recipe, default.image_size) == ("lite0", "trunk-copy", 224)
    assert "overridden" not in default.reason and "--arch resnet" in default.reason
    assert choose([(1024, 768)], channels=3, arch="resnet").image_size == 64


def test_views_per_image_shrink_with_the_collection_to_keep_training_short() -> None:
    assert views_for(100) == MAX_VIEWS and views_for(1_000_000) == MIN_VIEWS
    assert views_for(2_000) < views_for(1_000) <= MAX_VIEWS


def test_view_features_are_the_same_for_the_same_image_and_differ_between_views(config, features) -> None:
    f = features["features"].astype(np.float32)
    assert f.shape == (40, VIEWS + 1, feature_width(1280)) and features["target"].shape == (40, 3, 32, 32)
    again = ViewFeaturizer(config.trunk, config.image_size, config.recon_size, VIEWS)(
        {"image": np.stack([decoded(blob_photo(0, size=200), 280)]), "path": np.array(["p0.png"])}
    )
    np.testing.assert_allclose(again["features"][0].astype(np.float32), f[0], atol=2e-2)  # seeded by path
    assert np.abs(f[:, 1] - f[:, 0]).mean() > 0.05 * np.abs(f[:, 0]).mean()  # an edited view is not the image


def test_a_short_run_lowers_every_loss_term_and_the_decoder_reconstructs(config, features) -> None:
    torch.manual_seed(0)
    model = AutoEncoder(config)
    recipe = get_recipe("trunk-copy")
    batch = {k: torch.from_numpy(v) for k, v in features.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    for _ in range(80):
        loss, parts = recipe.batch_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: float(v) for k, v in parts.items()})
    assert set(history[0]) == {"recon", "nce", "distill"}
    for term in history[0]:
        first = np.mean([h[term] for h in history[:5]])
        last = np.mean([h[term] for h in history[-5:]])
        assert last < 0.7 * first, (term, first, last)
    # the decoder rebuilds each image better than the average picture would
    model.eval()
    with torch.no_grad():
        recon = model(batch["features"][:, 0].float()).recon
    target = batch["target"].float() / 255
    assert float(((recon - target) ** 2).mean()) < 0.5 * float(((target.mean(0) - target) ** 2).mean())


def test_a_saved_model_loads_on_its_fast_path_with_eager_embeddings(config, features, tmp_path: Path) -> None:
    model = AutoEncoder(config)
    fit_trunk_embedding(
        model, *trunk_statistics(model, [torch.from_numpy(features["features"][:, 0]).float()])
    )
    model_lib.save(model, tmp_path / "run")
    loaded = model_lib.load(tmp_path / "run")
    assert loaded.uses_trunk and not any(
        "_blocks" in k or "_conv_stem" in k for k in loaded.state_dict()
    )  # trunk not saved
    images = np.stack([decoded(blob_photo(i, size=200), 224) for i in range(6)])
    fast = loaded.embed(images)
    assert type(loaded._fast).__name__ == "OnnxModule" and fast.shape == (6, config.dim)
    with torch.inference_mode():
        eager = loaded.embedding_graph()(torch.from_numpy(images).float() / 255).numpy()
    cos = (fast * eager).sum(1) / np.linalg.norm(fast, axis=1) / np.linalg.norm(eager, axis=1)
    assert cos.min() >= 0.9999
    # the trunk's half is the trunk's own view: two different pictures stay apart
    assert float(fast[0] @ fast[1]) < 0.95 * float(fast[0] @ fast[0])


def test_the_thumbnail_part_ignores_mirroring_and_brightness_and_contrast_but_not_the_picture() -> None:
    images = (
        torch.from_numpy(np.stack([decoded(blob_photo(i, size=200), 224) for i in range(2)])).float() / 255
    )
    t = thumbnail(images, 16)
    assert t.shape == (2, 256) and torch.allclose(t.norm(dim=1), torch.ones(2), atol=1e-5)
    torch.testing.assert_close(thumbnail(images.flip(-1), 16), t, atol=1e-5, rtol=0)
    dimmer = thumbnail(0.6 * images + 0.1, 16)  # brightness and contrast: no clipping at these factors
    assert float((dimmer * t).sum(1).min()) > 0.999
    assert float(t[0] @ t[1]) < 0.9  # two different pictures


def test_a_model_trained_on_other_trunk_weights_is_refused(config, tmp_path: Path) -> None:
    from dataclasses import replace

    model = AutoEncoder(replace(config, trunk_sha256="0" * 64))
    model_lib.save(model, tmp_path / "run")
    with pytest.raises(ModelMismatch, match="weights differ"):
        model_lib.load(tmp_path / "run")


def test_imgsim_train_runs_the_trunk_model_through_ray_train_and_its_run_answers_queries(
    tmp_path: Path, ray_session: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from imgsim.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(24):
        blob_photo(i, size=160).save(photos / f"{i:02d}.jpg", quality=92)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", str(photos), "--out", str(run), "--arch", "lite0", "--steps", "16", "--json"]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert (summary["arch"], summary["recipe"], summary["dim"]) == ("lite0", "trunk-copy", 1024)
    assert "edited views of it are computed once" in out.err and "pretrained EfficientNet-Lite0" in out.err
    assert main(["index", str(photos), "--model", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 24
    query = photos / "05.jpg"
    assert main(["query", str(query), "--model", str(run), "-k", "3", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert results[0]["path"] == str(query) and results[0]["distance"] < 1e-3
