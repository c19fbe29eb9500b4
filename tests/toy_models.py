"""Small real encoders for tests, with known invariances built into their weights (no training).

`mirror_invariant_model`: the project's own `AutoEncoder`, randomly initialised, then made exactly
invariant to a left-right mirror. Each stride-2 convolution (kernel 4, padding 1) on an even side
maps mirrored inputs to mirrored outputs when its kernels are left-right symmetric; BatchNorm and
ReLU act per position; and a bottleneck whose weights are symmetric across the feature map's width
gives the same embedding for an image and its mirror. `save_model` writes it as a run's model, which
`imgsim index`, `eval`, `duplicates`, `query` and `serve` then use like a trained one.

`RawPixels`: the baseline encoder (the flattened, preprocessed pixels), with the `embed` + `config`
interface that `imgsim.evaluation.copies` evaluates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imgsim.models import autoencoder as model_lib


def mirror_invariant_model(
    image_size: int = 32, channels: int = 1, dim: int = 32, seed: int = 0
) -> model_lib.AutoEncoder:
    """An `AutoEncoder` whose embedding of an image and of its mirror image are equal (to float error)."""
    if image_size % 8:
        raise ValueError("image_size must be a multiple of 8 (three stride-2 layers, no padding)")
    torch.manual_seed(seed)
    model = model_lib.AutoEncoder(
        model_lib.ModelConfig(image_size=image_size, channels=channels, dim=dim, widths=(8, 16, 32))
    )
    with torch.no_grad():
        for module in model.encoder_conv.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.copy_((module.weight + module.weight.flip(-1)) / 2)
        grid = model.grid
        w = model.to_z.weight.view(dim, -1, grid, grid)
        model.to_z.weight.copy_(((w + w.flip(-1)) / 2).reshape(dim, -1))
    return model.eval()


def save_model(model: model_lib.AutoEncoder, run: Path) -> Path:
    """Write `model` as RUN's model (what `imgsim train` leaves behind)."""
    model_lib.save(model, run)
    return run


@dataclass(frozen=True)
class _Config:
    image_size: int
    channels: int


class RawPixels:
    """The raw-pixel baseline: an image's preprocessed pixels, flattened and centred."""

    def __init__(self, image_size: int = 32, channels: int = 1) -> None:
        self.config = _Config(image_size, channels)

    def embed(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, np.float32).reshape(len(images), -1) / 255.0
        return x - 0.5
