"""Histograms of oriented gradients (HOG), in torch: the teacher of the `denoise-hog` recipe.

`orientation_histograms(x)` describes each image by where its edges are and which way they run: the
grey image, lightly blurred, is cut into a grid of cells (8 x 8 by default), and each cell holds a
histogram of its gradient orientations (unsigned, 9 bins, soft-assigned to the two nearest bins)
weighted by gradient magnitude. The vector is L2-normalised, then square-rooted (a Hellinger map,
so one strong edge does not drown the rest).

Such a descriptor ignores brightness and contrast and tolerates small shifts, which the pixels of
an autoencoder's reconstruction do not; the recipe distils which images it finds close into the
learned embedding (`imgsim.training.recipes`). It runs on whatever device `x` is on, without gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CELLS = 8  # cells per side: 4 px cells at the small model's 32 px
BINS = 9  # unsigned orientations, 20 degrees each
SIGMA = 0.7  # px of Gaussian blur before the gradients (less JPEG/aliasing noise)


def _blur(grey: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=grey.dtype, device=grey.device)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(grey, (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1))


@torch.no_grad()
def orientation_histograms(
    x: torch.Tensor, cells: int = CELLS, bins: int = BINS, sigma: float = SIGMA
) -> torch.Tensor:
    """float32 (N, cells * cells * bins) descriptors of images `x` (N, C, H, W): uint8, or float in [0, 1].

    Each side is split into `cells` equal cells (the remainder of a side that does not divide is
    left out). Rows are non-negative; before the square root they had unit L2 norm."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _histograms(x.float() / 255.0 if x.dtype == torch.uint8 else x.float(), cells, bins, sigma)


def _histograms(x: torch.Tensor, cells: int, bins: int, sigma: float) -> torch.Tensor:
    grey = x.mean(dim=1, keepdim=True)
    if sigma > 0:
        grey = _blur(grey, sigma)
    padded = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    gx = padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]
    gy = padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]
    magnitude = torch.hypot(gx, gy)
    # unsigned orientation in bins; each pixel's vote is shared by the two nearest bin centres
    position = torch.remainder(torch.atan2(gy, gx), math.pi) / math.pi * bins - 0.5
    lower = torch.floor(position)
    upper_share = position - lower
    lower_bin = lower.long() % bins
    votes = torch.zeros(grey.shape[0], bins, *grey.shape[2:], device=grey.device)
    votes.scatter_add_(1, lower_bin, magnitude * (1 - upper_share))
    votes.scatter_add_(1, (lower_bin + 1) % bins, magnitude * upper_share)
    cell = max(1, min(grey.shape[-2:]) // cells)
    histograms = F.avg_pool2d(votes[..., : cell * cells, : cell * cells], cell).flatten(1)
    histograms = histograms / (histograms.norm(dim=1, keepdim=True) + 1e-6)
    return histograms.clamp(min=0).sqrt()
