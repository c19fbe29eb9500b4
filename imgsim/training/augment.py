"""Training augmentations in plain torch, on a decoded float batch (no torchvision).

`CopyAugment` makes a random *edited view* of each image in a batch, imitating the edits people make
to photos (the trained edits of `imgsim.evaluation.edits`): a random crop of each side (random position, each
side drawn separately), mirror, greyscale, brightness/contrast/saturation, resampling blur (a
down-up scaling, as rescaling and JPEG re-compression blur an image) and noise. It works on images
decoded somewhat larger than the model input, so even a tight crop is resampled from real pixels.
The held-out edits of `imgsim.evaluation.edits` (rotation, borders, overlays, changed aspect, other codecs) are
deliberately not imitated: they measure whether the invariance generalises.

Every range is a field, so a recipe states its augmentation as data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

#: ITU-R 601 luma weights, as Pillow's convert("L") uses.
LUMA = (0.299, 0.587, 0.114)


def greyscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma; a 1-channel batch is returned as is."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


@dataclass(frozen=True)
class CopyAugment:
    """Random edited views of a float (N, C, H, W) batch in [0, 1], output (N, C, size, size)."""

    crop: tuple[float, float] = (0.55, 1.0)  # kept share of each side (drawn per side)
    p_mirror: float = 0.5
    p_greyscale: float = 0.25
    brightness: float = 0.4  # x(1 ± b)
    contrast: float = 0.4  # x(1 ± c) around the image's mean luma
    saturation: float = 0.6  # x(1 ± s) around each pixel's luma
    p_resample: float = 0.5  # down-up scaling to a factor in `resample` of the side
    resample: tuple[float, float] = (0.35, 0.9)
    noise: float = 0.03  # Gaussian noise, sigma drawn in [0, noise]

    def to_dict(self) -> dict:
        return asdict(self)

    def __call__(self, x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        n, c, dev = x.shape[0], x.shape[1], x.device

        def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
            return torch.rand(n, *shape, device=dev, generator=generator) * (hi - lo) + lo

        def coin(p: float) -> torch.Tensor:
            return torch.rand(n, device=dev, generator=generator) < p

        # geometry: crop a share of each side at a random position, maybe mirrored, resample to size
        sx, sy = u(*self.crop), u(*self.crop)
        tx, ty = (1 - sx) * u(-1, 1), (1 - sy) * u(-1, 1)
        flip = torch.where(coin(self.p_mirror), -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = sx * flip, sy, tx, ty
        if x.shape[-1] > 2 * size:  # sample from a smoothed copy, to avoid aliasing
            x = F.interpolate(x, scale_factor=2 * size / x.shape[-1], mode="area")
        grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

        # colour, in the order Pillow's ImageEnhance edits apply: brightness, contrast, saturation
        out = out * u(1 - self.brightness, 1 + self.brightness, 1, 1, 1)
        if c == 3:
            luma = greyscale(out)
            mean = luma.mean(dim=(2, 3), keepdim=True)
            out = (out - mean) * u(1 - self.contrast, 1 + self.contrast, 1, 1, 1) + mean
            luma = greyscale(out)
            out = (out - luma) * u(1 - self.saturation, 1 + self.saturation, 1, 1, 1) + luma
        else:
            mean = out.mean(dim=(2, 3), keepdim=True)
            out = (out - mean) * u(1 - self.contrast, 1 + self.contrast, 1, 1, 1) + mean

        # resampling blur for a random part of the batch (one factor per call keeps it cheap)
        if self.p_resample > 0:
            pick = coin(self.p_resample).view(n, 1, 1, 1)
            factor = float(torch.empty(1).uniform_(*self.resample, generator=generator))
            small = max(4, round(size * factor))
            blurred = F.interpolate(
                F.interpolate(out, size=(small, small), mode="area"), size=(size, size), mode="bilinear"
            )
            out = torch.where(pick, blurred, out)
        if self.noise > 0:
            out = out + torch.randn_like(out) * u(0, self.noise, 1, 1, 1)
        if c == 3:  # last, so that a greyscale view has exactly equal channels, like a greyscale copy
            grey = coin(self.p_greyscale).view(n, 1, 1, 1)
            out = torch.where(grey, greyscale(out).expand_as(out), out)
        return out.clamp(0, 1)
