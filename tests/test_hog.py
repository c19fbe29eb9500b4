"""Oriented-gradient histograms (imgsim.models.hog) and the neighbour distillation that teaches them to the
embedding (the `denoise-hog` recipe): the descriptor sees edges and their direction, not brightness,
and a short training run makes the embedding follow it where pixels would not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from imgsim.models.autoencoder import MIN_DISTILL_BATCH, AutoEncoder, ModelConfig, neighbour_distillation
from imgsim.models.hog import BINS, CELLS, orientation_histograms
from imgsim.training.recipes import get_recipe


def cells_of(descriptor: torch.Tensor) -> torch.Tensor:
    """(N, bins, cells, cells) view of descriptors (the layout orientation_histograms flattens)."""
    return descriptor.view(len(descriptor), BINS, CELLS, CELLS)


def test_a_horizontal_edge_votes_for_the_vertical_gradient_bin_only() -> None:
    x = torch.zeros(1, 1, 32, 32)
    x[..., 16:, :] = 1.0  # dark above, light below: a horizontal edge, its gradient points down
    h = cells_of(orientation_histograms(x))[0]
    vertical = BINS // 2  # bin centres at 10, 30, ..., 170 degrees: 90 degrees is bin 4
    on_edge = h[:, 3:5, :]  # the two rows of cells that touch row 16
    assert float(on_edge[vertical].min()) > 0
    assert float(on_edge.sum() - on_edge[vertical].sum()) == pytest.approx(0.0, abs=1e-4)
    assert float(h[:, :2, :].sum()) == pytest.approx(0.0, abs=1e-6)  # flat cells cast no votes


def test_brightness_and_contrast_do_not_change_the_descriptor() -> None:
    x = torch.rand(4, 3, 32, 32)
    edited = 0.2 + 0.5 * x  # darker, less contrast, still inside [0, 1]
    assert torch.allclose(orientation_histograms(x), orientation_histograms(edited), atol=1e-3)
    as_uint8 = (x * 255).round().to(torch.uint8)
    assert torch.allclose(orientation_histograms(as_uint8), orientation_histograms(as_uint8.float() / 255))


def test_a_mirror_image_mirrors_the_cells_and_the_orientations() -> None:
    x = torch.rand(3, 1, 32, 32)
    h, mirrored = cells_of(orientation_histograms(x)), cells_of(orientation_histograms(x.flip(-1)))
    # an orientation at angle a becomes 180 - a: bin b (centre 10 + 20 b degrees) becomes bin 8 - b
    expected = h.flip(-1).flip(1)
    assert torch.allclose(mirrored, expected, atol=1e-4)
    assert not torch.allclose(mirrored, h, atol=1e-2)


def test_the_teacher_is_float32_inside_bf16_autocast() -> None:
    # the training loop computes the loss under autocast; the descriptor must not change with it
    x = torch.rand(4, 1, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = orientation_histograms(x)
    assert inside.dtype == torch.float32 and torch.equal(inside, orientation_histograms(x))


def test_other_image_sizes_keep_the_grid_of_cells() -> None:
    assert orientation_histograms(torch.rand(2, 3, 64, 64)).shape == (2, CELLS * CELLS * BINS)
    assert orientation_histograms(torch.rand(2, 1, 28, 28)).shape == (2, CELLS * CELLS * BINS)


def test_neighbour_distillation_is_least_when_the_student_ranks_like_the_teacher() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(32, 20)
    # the same geometry in another space: rotated into 64 dimensions and scaled
    same_geometry = teacher @ torch.linalg.qr(torch.randn(64, 64))[0][:20] * 3
    shuffled = same_geometry[torch.randperm(32)]
    assert float(neighbour_distillation(same_geometry, teacher)) < 0.05 * float(
        neighbour_distillation(shuffled, teacher)
    )
    student = shuffled.clone().requires_grad_(True)
    neighbour_distillation(student, teacher).backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0


def test_batches_too_small_to_rank_neighbours_train_without_the_distillation() -> None:
    model = AutoEncoder(ModelConfig(image_size=16, channels=1, dim=8, widths=(8, 16)))
    recipe = get_recipe("denoise-hog")
    _, tiny = recipe.loss(model, torch.randint(0, 256, (MIN_DISTILL_BATCH - 1, 1, 16, 16), dtype=torch.uint8))
    _, enough = recipe.loss(model, torch.randint(0, 256, (MIN_DISTILL_BATCH, 1, 16, 16), dtype=torch.uint8))
    assert "distill" not in tiny and float(enough["distill"]) > 0


def stripes(orientation: str, seed: int, size: int = 32) -> np.ndarray:
    """Thin stripes of random period and phase over a strong random brightness ramp: the ramp owns
    most of the pixels' variance, the stripes' direction is what the images have in common."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    along = xx if orientation == "vertical" else yy
    period, phase = rng.uniform(3.5, 5.5), rng.uniform(0, 2 * math.pi)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / size
    img = 0.5 + 0.45 * ramp + 0.12 * np.sin(2 * math.pi * along / period + phase)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)[None]


def test_distillation_teaches_the_embedding_what_the_edges_say() -> None:
    """A short run of `denoise-hog` groups stripes by direction despite brightness ramps; the same
    run of plain `denoise` (the pixels' view) does much worse."""
    labels = np.array([i % 2 for i in range(192)])
    images = torch.from_numpy(
        np.stack([stripes("vertical" if y else "horizontal", seed) for seed, y in enumerate(labels)])
    )

    def precision_at_5(recipe_name: str) -> float:
        torch.manual_seed(0)
        model = AutoEncoder(ModelConfig(image_size=32, channels=1, dim=16, widths=(16, 32, 64)))
        recipe = get_recipe(recipe_name)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(0)
        for _step in range(120):
            batch = images[torch.randperm(len(images), generator=g)[:64]]
            loss, _parts = recipe.loss(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        recipe.fit_embedding(model, [images])
        emb = torch.nn.functional.normalize(torch.from_numpy(model.embed(images)), dim=1)
        sims = emb @ emb.t()
        sims.fill_diagonal_(-2)
        nearest = sims.topk(5, dim=1).indices.numpy()
        return float((labels[nearest] == labels[:, None]).mean())

    with_edges, pixels_only = precision_at_5("denoise-hog"), precision_at_5("denoise")
    assert with_edges >= 0.9
    assert with_edges > pixels_only + 0.15
