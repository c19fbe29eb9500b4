"""The pretrained-trunk autoencoder's parts ("lite0" in `imgsim.models.autoencoder`).

    image -> frozen trunk (EfficientNet-Lite0) -> its map (C, 7, 7)
          features f = [ GeM over the map (g, C) | 4 mirror-symmetric quadrant GeMs (4 C) ]
          f -> head (trainable MLP) -> z_head (the learnt bottleneck) -> decoder -> image (32 px)
          bottleneck = [ unit(z_head - mean) | unit(P (g - mean_g)) | 0.8 unit(thumbnail) ]
                       (the search embedding)

The head learns, on the user's images, what the trunk does not know: which differences do not make
another picture (copy invariance between heavily edited views, `imgsim.training.views`), while
neighbour distillation from the frozen trunk keeps its knowledge of what images show. The head sees
where things are, not only what: the quadrants' GeMs beside the global one (copies P@1 0.763 ->
0.821 for the head alone, docs/pretrained.md).

The rest of the bottleneck is not trained, so it cannot forget what a head trained on a few hundred
images would: the trunk's own GeM features, centred and projected on their principal axes (fitted
on the training images), and a tiny picture of the image itself, grey, mirror-symmetric and with
its mean taken out (robust to colour changes, greyscale, codecs and mild crops). Together they held
the gains on photos the head never saw (held-out photos' copies P@1 0.621 for the head alone, 0.886
fused; docs/pretrained.md, "Fusing").

`TrunkFeatures` runs the trunk and pools it (the training views' features are computed with it
once, `imgsim.training.view_features`); `EmbeddingGraph` is the whole inference path as one module,
which `imgsim.models.fast.accelerate` runs in ONNX Runtime.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imgsim.models.trunk import Trunk

#: GeM's exponent over the trunk's map: copies P@1 0.648 vs 0.616 with average pooling (docs/pretrained.md)
GEM_P = 3.0
#: Quadrant descriptors beside the global one: the map's four overlapping quarters (4x4 of 7x7).
REGIONS = 4
#: The quadrants' GeMs are unit vectors; scaled so that the head's input sees them at about the
#: global GeM's size.
REGION_SCALE = 10.0
#: The thumbnail's weight in the search embedding against the head's and the trunk's unit parts
#: (0.8: copies 0.889 / unseen edits 0.785 / held-out photos 0.886; 1.0: 0.885 / 0.795 / 0.875).
THUMB_WEIGHT = 0.8


def feature_width(channels: int) -> int:
    """Width of `TrunkFeatures`' output for a trunk with `channels` map channels."""
    return channels * (1 + REGIONS)


def global_part(features: torch.Tensor) -> torch.Tensor:
    """The global GeM (..., C) of `TrunkFeatures`' output (..., feature_width(C))."""
    return features[..., : features.shape[-1] // (1 + REGIONS)]


def _gem(h: torch.Tensor, p: float) -> torch.Tensor:
    return h.pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class TrunkFeatures(nn.Module):
    """Float RGB (N, 3, S, S) in [0, 1] -> (N, (1 + REGIONS) C) float32: the trunk's map GeM-pooled
    over all of it, then over each quadrant (a quadrant and the mirror image of the opposite one
    pooled together, unit length, times `REGION_SCALE`: a mirrored copy gives the same four)."""

    def __init__(self, trunk: Trunk, p: float = GEM_P) -> None:
        super().__init__()
        self.trunk = trunk
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x).float().clamp(min=1e-6)
        side_h, side_w = h.shape[-2:]
        span_h, span_w = (side_h + 1) // 2, (side_w + 1) // 2
        mirrored = h.flip(-1)
        parts = [_gem(h, self.p)]
        for top in (0, side_h - span_h):
            for left in (0, side_w - span_w):
                box = (slice(None), slice(None), slice(top, top + span_h), slice(left, left + span_w))
                region = _gem(h[box], self.p) + _gem(mirrored[box], self.p)
                parts.append(REGION_SCALE * F.normalize(region, dim=1, eps=1e-12))
        return torch.cat(parts, dim=1)


def thumb_side(dim: int) -> int:
    """The thumbnail's side for an embedding of `dim` values: a quarter of them, at most 16 x 16."""
    return next((s for s in (16, 8, 4) if s * s * 4 <= dim), 0)


def thumbnail(x: torch.Tensor, side: int) -> torch.Tensor:
    """Float images (N, C, S, S) in [0, 1] -> (N, side²) unit vectors: the image in grey, averaged
    down to side x side, made mirror-symmetric, its mean taken out."""
    k = x.shape[-1] // side
    grey = x[:, :, : k * side, : k * side].float().mean(dim=1, keepdim=True)
    t = F.avg_pool2d(grey, k)
    t = (0.5 * (t + t.flip(-1))).flatten(1)
    return F.normalize(t - t.mean(dim=1, keepdim=True), dim=1, eps=1e-6)


class FeatureHead(nn.Module):
    """The trainable head: `TrunkFeatures` (N, F) -> the learnt bottleneck (N, dim)."""

    def __init__(self, width: int, dim: int, hidden: int = 1024) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float())


#: The buffers `fuse` reads (fitted after training, saved with the weights).
FUSE_BUFFERS = ("emb_mean", "trunk_mean", "trunk_proj")


def fuse(
    z_head: torch.Tensor, g: torch.Tensor, thumb: torch.Tensor | None, buffers: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The search embedding from the head's bottleneck, the trunk's global GeM `g` and the
    `thumbnail` (None: a model without one) (module docstring)."""
    a = F.normalize(z_head.float() - buffers["emb_mean"], dim=1, eps=1e-12)
    b = F.normalize((g.float() - buffers["trunk_mean"]) @ buffers["trunk_proj"], dim=1, eps=1e-12)
    parts = [a, b] if thumb is None else [a, b, THUMB_WEIGHT * thumb]
    return torch.cat(parts, dim=1)


class EmbeddingGraph(nn.Module):
    """Float images in [0, 1] -> the search embedding, as one graph (for ONNX Runtime)."""

    def __init__(
        self, features: TrunkFeatures, head: FeatureHead, buffers: dict[str, torch.Tensor], thumb: int
    ) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.thumb = thumb
        for name, value in buffers.items():
            self.register_buffer(name, value.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        g = global_part(f)
        t = thumbnail(x, self.thumb) if self.thumb else None
        return fuse(self.head(f), g, t, {n: getattr(self, n) for n in FUSE_BUFFERS})


@torch.no_grad()
def principal_axes(
    total: torch.Tensor, outer: torch.Tensor, count: float, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, (C, k) projection on the top-k principal axes) from sums over feature vectors."""
    mean = total / count
    cov = outer / count - torch.outer(mean, mean)
    _, eigvec = torch.linalg.eigh(cov.double())
    return mean.float(), eigvec[:, -k:].flip(1).float().contiguous()
