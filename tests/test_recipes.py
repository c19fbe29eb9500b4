"""Training recipes: the copy objective learns the invariances it trains for; the automatic choice."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from imgsim.data.decode import decode_image
from imgsim.evaluation.edits import apply_edit, copy_rng
from imgsim.models.autoencoder import CPU_BF16_ENV, AutoEncoder, ModelConfig, info_nce
from imgsim.training.augment import CopyAugment
from imgsim.training.recipes import RECIPES, choose, get_recipe


def blob_photo(seed: int, size: int = 96) -> Image.Image:
    """A colourful, asymmetric picture: random soft blobs of colour on a random gradient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    arr = rng.uniform(0, 255, 3) * xx[..., None] + rng.uniform(0, 255, 3) * (1 - yy[..., None])
    arr /= 2
    for _ in range(8):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.08, 0.25)
        weight = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
        arr = arr * (1 - weight) + rng.uniform(0, 255, 3) * weight
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def decoded(img: Image.Image, size: int) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return decode_image(buf.getvalue(), size, 3)


def p_at_1(db: np.ndarray, q: np.ndarray) -> float:
    dbn, qn = F.normalize(torch.as_tensor(db), dim=1), F.normalize(torch.as_tensor(q), dim=1)
    return float(((qn @ dbn.t()).argmax(1) == torch.arange(len(q))).float().mean())


@pytest.fixture
def one_thread():
    """A tiny net trains fastest on one thread (and far faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_tiny_copy_run_learns_mirror_and_greyscale_invariance(one_thread: None) -> None:
    """After a short run of the default copy recipe, mirrored and greyscale copies (made by
    imgsim.evaluation.edits) find their originals; before it they mostly do not, and raw pixels miss mirrors."""
    torch.manual_seed(0)
    photos = [blob_photo(i) for i in range(32)]
    config = ModelConfig(image_size=32, channels=3, dim=32, widths=(8, 16, 32), arch="resnet", recon_size=16)
    recipe = get_recipe("copy", batch_size=32, temperature=0.2)
    train_size = recipe.train_image_size(config)
    x = torch.from_numpy(np.stack([decoded(p, train_size) for p in photos]))
    db_images = np.stack([decoded(p, 32) for p in photos])
    queries = {
        edit: np.stack([decoded(apply_edit(p, edit, copy_rng(0, i)), 32) for i, p in enumerate(photos)])
        for edit in ("mirror", "greyscale")
    }
    model = AutoEncoder(config)

    def scores() -> dict[str, float]:
        recipe.fit_embedding(model, [torch.from_numpy(db_images)])
        db = model.embed(db_images)
        return {edit: p_at_1(db, model.embed(q)) for edit, q in queries.items()}

    before = scores()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss, _ = recipe.loss(model, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = scores()
    assert after["mirror"] >= 0.9 and after["greyscale"] >= 0.7, (before, after)
    assert after["greyscale"] > before["greyscale"] + 0.2, (before, after)
    raw_db = db_images.reshape(len(db_images), -1).astype(np.float32)
    mirrored = queries["mirror"].reshape(len(photos), -1).astype(np.float32)
    assert p_at_1(raw_db - raw_db.mean(0), mirrored - raw_db.mean(0)) < 0.9  # not trivial for raw pixels


def test_copy_loss_reports_both_terms_and_reaches_every_parameter() -> None:
    config = ModelConfig(image_size=32, channels=3, dim=16, widths=(8, 16), arch="resnet", recon_size=16)
    model = AutoEncoder(config)
    recipe = get_recipe("copy")
    x = torch.randint(
        0, 256, (6, 3, recipe.train_image_size(config), recipe.train_image_size(config)), dtype=torch.uint8
    )
    loss, parts = recipe.loss(model, x)
    assert set(parts) == {"recon", "nce"} and parts["recon"] > 0 and parts["nce"] > 0
    loss.backward()
    # every trainable parameter gets a gradient: a DDP-wrapped model would otherwise wait forever
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_denoise_recipe_is_the_original_objective() -> None:
    model = AutoEncoder(ModelConfig(dim=8, widths=(8, 16, 32)))
    loss, parts = get_recipe("denoise").loss(model, torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8))
    assert float(parts["nce"]) == 0.0 and float(loss.detach()) == pytest.approx(float(parts["recon"]))


def test_info_nce_prefers_matching_views() -> None:
    z = torch.randn(16, 8)
    assert info_nce(z, z + 0.01 * torch.randn_like(z), 0.1) < info_nce(z, z[torch.randperm(16)], 0.1)


def test_copy_augment_keeps_range_and_makes_grey_and_mirrored_views() -> None:
    x = torch.rand(64, 3, 40, 40)
    out = CopyAugment(p_greyscale=1.0)(x, 32)
    assert out.shape == (64, 3, 32, 32) and float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-6)  # greyscale: equal channels
    plain = CopyAugment(crop=(1.0, 1.0), p_mirror=1.0, p_greyscale=0, brightness=0, contrast=0, saturation=0)
    plain = type(plain)(**{**plain.to_dict(), "p_resample": 0.0, "noise": 0.0})
    mirrored = plain(x, 40)
    assert torch.allclose(mirrored, x.flip(-1), atol=1e-4)


def test_choose_picks_from_the_data_and_says_why() -> None:
    small = choose([(28, 28)] * 10, channels=1)
    assert (small.arch, small.image_size, small.recipe) == ("small", 32, "denoise-hog")
    assert "small images" in small.reason
    photos = choose([(1024, 768)] * 10, channels=3, arch="resnet")
    assert (photos.arch, photos.recipe) == ("resnet", "copy") and photos.image_size == 64
    assert choose([(1024, 768)], channels=3, arch="resnet", use_gpu=True).image_size > 64
    assert choose([(1024, 768)] * 10, channels=3, arch="lite0").arch == "lite0"  # tests/test_trunk_model.py
    forced = choose([(28, 28)], channels=1, arch="resnet", image_size=48)
    assert (forced.arch, forced.image_size, forced.recipe) == ("resnet", 48, "copy")
    assert "--arch resnet" in forced.reason
    config = photos.model_config()
    assert config.arch == "resnet" and config.recipe == "copy" and config.channels == 3
    assert config.mirror_symmetric and not small.model_config().mirror_symmetric
    assert set(RECIPES) >= {"denoise", "denoise-hog", "copy"}


def test_imgsim_train_plans_from_a_sample_of_the_files(tmp_path, monkeypatch) -> None:
    # what `imgsim train` will run, decided by pipelines.train.plan_training from the files on disk
    import math

    from imgsim.data.sources import list_images
    from imgsim.io.runs import RunPaths
    from pipelines.train import plan_training, recipe_of

    photos, grey = tmp_path / "photos", tmp_path / "grey"
    photos.mkdir()
    grey.mkdir()
    for i in range(12):
        blob_photo(i, size=96).save(photos / f"{i:02d}.jpg")
        blob_photo(i, size=28).convert("L").save(grey / f"{i:02d}.png")

    def plan(folder, **flags):
        return plan_training(
            RunPaths(tmp_path / "run"), list_images(str(folder)), resume=False, epochs=None, **flags
        )

    copy = RECIPES["copy"]
    for bf16, steps in (("0", copy.steps), ("1", copy.steps_native_bf16)):  # more steps where bf16 is native
        monkeypatch.setenv(CPU_BF16_ENV, bf16)
        p = plan(photos, arch="resnet")
        assert steps <= p.epochs * p.steps_per_epoch < steps + p.epochs  # in whole epochs
        assert ("bf16 natively" in p.reason) == (bf16 == "1")
    assert copy.steps_native_bf16 > copy.steps
    assert (p.model.arch, p.model.recipe, p.model.image_size, p.model.channels) == ("resnet", "copy", 64, 3)
    assert p.model.mirror_symmetric and p.decode_size > 64  # crops are resampled from real pixels
    assert p.batch_size == 12  # 12 images: the batch is capped
    assert "median shorter side 96 px" in p.reason
    auto = plan(photos, arch="lite0")  # the pretrained trunk
    assert (auto.model.arch, auto.model.recipe, auto.model.image_size) == ("lite0", "trunk-copy", 224)
    assert auto.epochs * auto.steps_per_epoch >= RECIPES["trunk-copy"].steps and auto.decode_size == 280
    g = plan(grey)
    assert (g.model.arch, g.model.recipe, g.model.image_size, g.model.channels) == (
        "small",
        "denoise-hog",
        32,
        1,
    )
    assert g.repeats > 1  # the denoising objectives' rule: a small data set is repeated within each epoch
    assert g.decode_size == 32 and "small images" in g.reason
    # flags win, and say so
    forced = plan(photos, arch="small", dim=16, steps=40)
    assert (forced.model.arch, forced.model.recipe, forced.model.dim) == ("small", "denoise-hog", 16)
    assert forced.epochs * forced.steps_per_epoch == 40 and "--arch small" in forced.reason
    exact = plan_training(
        RunPaths(tmp_path / "run"), list_images(str(photos)), resume=False, epochs=3, batch_size=4
    )
    assert (exact.epochs, exact.steps_per_epoch) == (3, math.ceil(12 / 4))  # exactly 3 passes
    # --contrastive W sets the invariance weight; a denoising model with it is whitened
    assert recipe_of(g.model, 0.5).nce_weight == 0.5 and recipe_of(g.model, 0.5).whiten
    assert recipe_of(p.model, None) == copy and not recipe_of(g.model, None).whiten
