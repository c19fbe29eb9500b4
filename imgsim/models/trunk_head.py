"""The pretrained-trunk autoencoder's parts ("lite0" in `imgsim.models.autoencoder`).

    image -> frozen trunk (EfficientNet-Lite0) -> GeM over its map -> g (1280)
          g -> head (trainable MLP) -> z_head (the learnt bottleneck) -> decoder -> image (32 px)
          bottleneck = [ unit(z_head - mean), unit(P (g - mean_g)) ]   (the search embedding)

The head learns, on the user's images, what the trunk does not know: which differences do not make
another picture (copy invariance between heavily edited views, `imgsim.training.views`), while
neighbour distillation from the frozen trunk keeps its knowledge of what images show. The second
half of the bottleneck is the trunk's own pooled features, centred and projected on their principal
axes (fitted on the training images, not trained): a head trained on a few hundred photos forgets
part of what the trunk knew about other photos, and keeping the trunk's view beside it recovered
that loss (docs/pretrained.md, "Fusing the trunk's view").

`TrunkFeatures` runs the trunk with GeM pooling (the training views' features are computed with it
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


class TrunkFeatures(nn.Module):
    """Float RGB (N, 3, S, S) in [0, 1] -> the trunk's map, GeM-pooled: (N, C) float32."""

    def __init__(self, trunk: Trunk, p: float = GEM_P) -> None:
        super().__init__()
        self.trunk = trunk
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x).float().clamp(min=1e-6)
        return h.pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class FeatureHead(nn.Module):
    """The trainable head: pooled trunk features (N, C) -> the learnt bottleneck (N, dim)."""

    def __init__(self, channels: int, dim: int, hidden: int = 1024) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim)
        )

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.net(g.float())


#: The buffers `fuse` reads (fitted after training, saved with the weights).
FUSE_BUFFERS = ("emb_mean", "trunk_mean", "trunk_proj")


def fuse(z_head: torch.Tensor, g: torch.Tensor, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
    """The search embedding from the head's bottleneck and the trunk's features (module docstring)."""
    a = F.normalize(z_head.float() - buffers["emb_mean"], dim=1, eps=1e-12)
    b = F.normalize((g.float() - buffers["trunk_mean"]) @ buffers["trunk_proj"], dim=1, eps=1e-12)
    return torch.cat([a, b], dim=1)


class EmbeddingGraph(nn.Module):
    """Float images in [0, 1] -> the search embedding, as one graph (for ONNX Runtime)."""

    def __init__(self, features: TrunkFeatures, head: FeatureHead, buffers: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.features = features
        self.head = head
        for name, value in buffers.items():
            self.register_buffer(name, value.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.features(x)
        return fuse(self.head(g), g, {n: getattr(self, n) for n in FUSE_BUFFERS})


@torch.no_grad()
def principal_axes(
    total: torch.Tensor, outer: torch.Tensor, count: float, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, (C, k) projection on the top-k principal axes) from sums over feature vectors."""
    mean = total / count
    cov = outer / count - torch.outer(mean, mean)
    _, eigvec = torch.linalg.eigh(cov.double())
    return mean.float(), eigvec[:, -k:].flip(1).float().contiguous()
