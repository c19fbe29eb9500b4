"""The pretrained trunk's features of each training image and of its edited views, computed once.

With the trunk frozen, its forward pass over every view is by far the dearest part of training the
"lite0" autoencoder (about 15 ms per view at 224 px on one 2-core machine, against well under 1 ms for
the head's step), and it gives the same answer every time. So training first maps every image, once,
to the trunk's pooled features (`TrunkFeatures`: global and per quadrant) of its clean self and of `views` edited views
(`imgsim.training.views`: several edits at once), plus the small reconstruction target; the trainer
then runs its steps on those vectors alone. A Ray Data mapper (`ViewFeaturizer`, run by
`pipelines.train`) does it, on the trunk's fast path.

A view is seeded by the image's path and its view number, so the same images give the same views
on every run and on any number of workers.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imgsim.training.views import view_array

#: Trunk forward passes (views, clean ones included) training budgets per run on a CPU: with about
#: 15 ms each on 2 cores this is the larger part of the 10-minute budget (docs/pretrained.md).
VIEW_BUDGET = 9_000
MIN_VIEWS, MAX_VIEWS = 2, 8


def views_for(images: int, budget: int = VIEW_BUDGET) -> int:
    """Edited views per image so that `images` x (views + 1) trunk passes fit `budget`, clamped to
    [MIN_VIEWS, MAX_VIEWS]."""
    return int(np.clip(budget // max(1, images) - 1, MIN_VIEWS, MAX_VIEWS))


def _seed(path: str, seed: int) -> list[int]:
    return [seed, zlib.crc32(path.encode("utf-8", "surrogateescape"))]


class ViewFeaturizer:
    """Ray Data mapper: rows {path, image: uint8 (3, D, D)} -> {features: float16 (V + 1, F), target:
    uint8 (3, r, r)}: row 0 of `features` is the clean image's (resized to `image_size`), rows 1..V
    its edited views'; `target` is the clean image at the decoder's size `recon_size`."""

    def __init__(
        self,
        trunk: str,
        image_size: int,
        recon_size: int,
        views: int,
        seed: int = 0,
        threads: int | None = None,
        use_gpu: bool = False,
    ) -> None:
        from imgsim.models.fast import accelerate
        from imgsim.models.trunk import load_trunk
        from imgsim.models.trunk_head import TrunkFeatures

        if threads:
            torch.set_num_threads(threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.features = accelerate(TrunkFeatures(load_trunk(trunk, device)).eval(), image_size, 3, device)
        self.device = device
        self.image_size, self.recon_size, self.views, self.seed = image_size, recon_size, views, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        images = batch["image"]
        n, s = len(images), self.image_size
        pixels = torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0
        clean = F.interpolate(pixels, size=(s, s), mode="area") if pixels.shape[-1] != s else pixels
        stack = [clean]
        rngs = [np.random.default_rng(_seed(str(p), self.seed)) for p in batch["path"]]
        for _ in range(self.views):
            views = np.stack([view_array(img, rng, s) for img, rng in zip(images, rngs, strict=True)])
            stack.append(torch.from_numpy(views).float() / 255.0)
        x = torch.cat(stack).to(self.device)  # view-major: view v of image i at v * n + i
        with torch.inference_mode():
            feats = self.features(x).float().cpu().numpy()
        features = feats.reshape(self.views + 1, n, -1).transpose(1, 0, 2).astype(np.float16)
        target = F.interpolate(pixels, size=(self.recon_size,) * 2, mode="area")
        target = (target * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        return {"features": features, "target": target}
