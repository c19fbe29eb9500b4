"""The autoencoder: shapes for any size and channel count, save/load, the training objective."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from imgsim.errors import RunNotFound
from imgsim.models import autoencoder as model_lib
from imgsim.models.autoencoder import Augment, AutoEncoder, ModelConfig, info_nce, training_loss


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 1), (32, 3), (45, 3), (64, 1)])
def test_shapes_for_any_size_and_channels(size: int, channels: int) -> None:
    m = AutoEncoder(ModelConfig(image_size=size, channels=channels, dim=16))
    x = torch.randint(0, 256, (3, channels, size, size), dtype=torch.uint8)
    out = m(x)
    assert out.recon.shape == (3, channels, size, size)
    assert out.z.shape == (3, 16)
    assert float(out.recon.min()) >= 0 and float(out.recon.max()) <= 1
    emb = m.embed(x.numpy())
    assert emb.shape == (3, 16) and emb.dtype == np.float32


def test_embed_subtracts_the_stored_centre() -> None:
    m = AutoEncoder(ModelConfig(dim=8))
    x = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    before = m.embed(x)
    m.emb_mean.fill_(1.0)
    np.testing.assert_allclose(m.embed(x), before - 1.0, atol=1e-5)


def test_save_load_round_trip_gives_identical_embeddings(tmp_path: Path) -> None:
    m = AutoEncoder(ModelConfig(image_size=32, channels=3, dim=12))
    m.emb_mean.normal_()
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    model_lib.save(m, tmp_path)
    loaded = model_lib.load(tmp_path)
    assert loaded.config == m.config
    np.testing.assert_array_equal(loaded.embed(x), m.embed(x))
    assert loaded.fingerprint == model_lib.fingerprint(tmp_path)
    assert (tmp_path / "model" / "config.json").is_file()
    assert not list((tmp_path / "model").glob("*.tmp"))


def test_load_without_a_model_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(RunNotFound, match="imgsim train"):
        model_lib.load(tmp_path)


def test_fingerprint_changes_with_weights(tmp_path: Path) -> None:
    m = AutoEncoder(ModelConfig(dim=8))
    model_lib.save(m, tmp_path)
    first = model_lib.fingerprint(tmp_path)
    with torch.no_grad():
        m.to_z.bias.add_(1.0)
    model_lib.save(m, tmp_path)
    assert model_lib.fingerprint(tmp_path) != first


def test_info_nce_is_low_for_matching_views_and_high_for_shuffled() -> None:
    z = torch.randn(32, 16)
    matched = info_nce(z, z + 0.01 * torch.randn_like(z), 0.2)
    shuffled = info_nce(z, z[torch.randperm(32)], 0.2)
    assert matched < shuffled


def test_augment_keeps_shape_and_range() -> None:
    x = torch.rand(6, 3, 32, 32)
    out = Augment()(x)
    assert out.shape == x.shape
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert not torch.allclose(out, x)


def test_a_few_steps_reduce_the_training_loss() -> None:
    torch.manual_seed(0)
    m = AutoEncoder(ModelConfig(dim=16, widths=(8, 16, 32)))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    x = torch.randint(0, 256, (32, 1, 32, 32), dtype=torch.uint8)
    x[:, :, :16] = 0  # some structure to learn
    aug = Augment(noise=0.0)
    first = float(training_loss(m, x, aug, 0.5)[0])
    for _ in range(30):
        loss, _ = training_loss(m, x, aug, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(training_loss(m, x, aug, 0.5)[0]) < first


@pytest.mark.parametrize("whiten", [False, True])
def test_fit_whitening_centres_and_optionally_decorrelates(whiten: bool) -> None:
    m = AutoEncoder(ModelConfig(dim=4))
    g = torch.Generator().manual_seed(0)
    mix = torch.tensor([[3.0, 0, 0, 0], [1.0, 1, 0, 0], [0, 0, 0.5, 0], [0, 0, 0.2, 2]], dtype=torch.float64)
    z = torch.randn(5000, 4, generator=g, dtype=torch.float64) @ mix + 7.0
    model_lib.fit_whitening(m, z.sum(0), z.t() @ z, float(len(z)), whiten=whiten)
    out = (z.float() - m.emb_mean) @ m.emb_whiten
    assert torch.allclose(out.mean(0), torch.zeros(4), atol=1e-3)
    cov = torch.cov(out.t().double())
    if whiten:
        assert torch.allclose(cov, torch.eye(4, dtype=torch.float64), atol=1e-3)
    else:  # centring only: the covariance is untouched and still correlated
        assert torch.equal(m.emb_whiten, torch.eye(4))
        assert abs(float(cov[0, 1])) > 1.0


def test_plain_objective_reports_no_contrastive_term() -> None:
    m = AutoEncoder(ModelConfig(dim=8, widths=(8, 16, 32)))
    x = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8)
    loss, parts = training_loss(m, x, Augment(), 0.0)
    assert float(parts["nce"]) == 0.0 and float(loss.detach()) == pytest.approx(float(parts["recon"]))


def test_a_model_file_from_before_the_arch_field_loads_unchanged(tmp_path: Path) -> None:
    """Model files written before `arch`/`recipe` existed hold only the original five fields."""
    m = AutoEncoder(ModelConfig(image_size=32, channels=1, dim=16, widths=(8, 16, 32)))
    model_lib.save(m, tmp_path)
    path = tmp_path / "model" / "model.pt"
    payload = torch.load(path, weights_only=True)
    payload["config"] = {
        k: payload["config"][k] for k in ("image_size", "channels", "dim", "widths", "proj_dim")
    }
    torch.save(payload, path)
    loaded = model_lib.load(tmp_path)
    assert loaded.config.arch == "small"
    x = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    np.testing.assert_array_equal(loaded.embed(x), m.embed(x))


@pytest.mark.parametrize("size,channels", [(48, 3), (64, 3), (64, 1), (96, 3)])
def test_resnet_arch_shapes_and_round_trip(tmp_path: Path, size: int, channels: int) -> None:
    config = ModelConfig(
        image_size=size, channels=channels, dim=24, widths=(8, 16, 32), arch="resnet", recon_size=32
    )
    m = AutoEncoder(config)
    x = torch.randint(0, 256, (2, channels, size, size), dtype=torch.uint8)
    out = m(x)
    assert out.recon.shape == (2, channels, 32, 32) and out.z.shape == (2, 24)
    model_lib.save(m, tmp_path)
    loaded = model_lib.load(tmp_path)
    assert loaded.config == config
    np.testing.assert_allclose(loaded.embed(x), m.embed(x), atol=1e-5)


def test_unknown_arch_is_refused() -> None:
    with pytest.raises(ValueError, match="choose from small, resnet"):
        ModelConfig(arch="vit")


def test_mirror_symmetric_embedding_ignores_a_mirror() -> None:
    config = ModelConfig(
        image_size=32, channels=3, dim=8, widths=(8, 16), arch="resnet", mirror_symmetric=True
    )
    m = AutoEncoder(config)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    np.testing.assert_allclose(m.embed(x), m.embed(x.flip(-1)), atol=1e-5)
    plain = AutoEncoder(ModelConfig(**{**config.to_dict(), "mirror_symmetric": False}))
    assert not np.allclose(plain.embed(x), plain.embed(x.flip(-1)), atol=1e-3)


def test_cpu_bf16_follows_the_cpu_unless_the_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(model_lib.CPU_BF16_ENV, raising=False)
    assert model_lib.uses_bf16("cpu") == model_lib._cpu_has_native_bf16()
    monkeypatch.setenv(model_lib.CPU_BF16_ENV, "0")
    assert not model_lib.uses_bf16("cpu") and not model_lib.autocast("cpu")._enabled
    monkeypatch.setenv(model_lib.CPU_BF16_ENV, "1")
    assert model_lib.uses_bf16("cpu")


@pytest.mark.parametrize("arch", ["small", "resnet"])
def test_bf16_and_float32_embeddings_agree(monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    """An index embedded in bf16 and a query in float32 (or the reverse) must still match: the two
    embeddings of one image are ~1e-5 apart in cosine distance, far below any duplicate threshold."""
    torch.manual_seed(0)
    size, channels = (32, 1) if arch == "small" else (64, 3)
    model = AutoEncoder(ModelConfig(image_size=size, channels=channels, arch=arch, dim=32))
    x = np.random.default_rng(0).integers(0, 256, (16, channels, size, size), dtype=np.uint8)
    monkeypatch.setenv(model_lib.CPU_BF16_ENV, "0")
    exact = model.embed(x)
    monkeypatch.setenv(model_lib.CPU_BF16_ENV, "1")
    fast = model.embed(x)
    cos = (exact * fast).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(fast, axis=1)
    assert not np.array_equal(exact, fast)  # bf16 did run
    assert float(np.max(1 - cos)) < 1e-3
