"""Small encoders exported the way users export theirs, for tests of `imgsim import-encoder`.

    from encoders import export_toy_encoder, export_bad_encoder
    export_toy_encoder(tmp / "toy.pt2", kind="export", mirror_invariant=True, image_size=32, channels=1)

`export_toy_encoder` writes a working encoder: a fixed, seeded random conv layer, ReLU, a 4x4
average pool and a linear map to `dim` (random features are enough to tell the test patterns
apart). With `mirror_invariant` it averages the features of the image and of its left-right mirror,
so an image and its mirrored copy get the same embedding. `kind` picks the file format:
"torchscript" (`torch.jit.script` + `torch.jit.save`), "trace" (`torch.jit.trace` + `torch.jit.save`)
or "export" (`torch.export.export` with a dynamic batch dimension + `torch.export.save`, a .pt2).

`export_bad_encoder` writes one of the files `import-encoder` must refuse (`BAD_ENCODERS` names them).
`make_asymmetric_image` draws an image whose mirrored copy looks unlike it (a left-to-right ramp
plus a few seeded blobs): with a mirror-invariant encoder the copy finds it first, without one it
does not.
Nothing is downloaded: every file is built here from a few seeded layers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

KINDS = ("torchscript", "trace", "export")


class ToyEncoder(nn.Module):
    """float (N, C, S, S) in [0, 1] → (N, dim): random conv features, optionally mirror-invariant."""

    def __init__(self, channels: int, dim: int, mirror_invariant: bool, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(channels, 16, 3, padding=1)
        self.proj = nn.Linear(16 * 4 * 4, dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        self.mirror_invariant = mirror_invariant

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(F.relu(self.conv(x)), 4)
        return self.proj(h.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mirror_invariant:
            return 0.5 * (self.features(x) + self.features(torch.flip(x, dims=[3])))
        return self.features(x)


def save_module(
    module: nn.Module,
    path: str | os.PathLike[str],
    kind: str,
    example: torch.Tensor,
    fixed_batch: bool = False,
) -> Path:
    """Save `module` as a TorchScript ("torchscript", "trace") or torch.export ("export") file.

    "export" makes the batch dimension dynamic unless `fixed_batch` (torch.export's default: only
    `example`'s batch size is accepted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    if kind == "torchscript":
        torch.jit.save(torch.jit.script(module), str(path))
    elif kind == "trace":
        torch.jit.save(torch.jit.trace(module, example), str(path))
    elif kind == "export":
        batch = torch.export.Dim("batch", min=1, max=65536)
        dynamic = None if fixed_batch else ({0: batch},)
        program = torch.export.export(module, (example,), dynamic_shapes=dynamic)
        torch.export.save(program, str(path))
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return path


def export_toy_encoder(
    path: str | os.PathLike[str],
    kind: str = "torchscript",
    *,
    mirror_invariant: bool = True,
    image_size: int = 32,
    channels: int = 1,
    dim: int = 16,
    seed: int = 0,
    fixed_batch: int | None = None,
) -> Path:
    """Write a small working encoder to `path` (see the module docstring); returns `path`.

    `fixed_batch` (kind "export" only): export for exactly that batch size, as torch.export does
    without `dynamic_shapes`."""
    module = ToyEncoder(channels, dim, mirror_invariant, seed)
    example = torch.rand(fixed_batch or 2, channels, image_size, image_size)
    return save_module(module, path, kind, example, fixed_batch=fixed_batch is not None)


# -- files import-encoder must refuse ----------------------------------------------------------------


class _Rank4(nn.Module):
    """(N, C, S, S) → (N, 8, 1, 1): a CNN exported without its final flatten."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.conv(x), 1)


class _BatchMean(nn.Module):
    """One vector for the whole batch: (1, D) whatever N is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :8].mean(dim=0, keepdim=True)


class _NonFinite(nn.Module):
    """NaN and inf in the output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :8] / 0.0 - x.flatten(1)[:, :8] / 0.0


class _Raises(nn.Module):
    """Fails on every input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > -1.0):
            raise RuntimeError("this encoder always fails")
        return x.flatten(1)


class _BatchDependent(nn.Module):
    """Each image's vector depends on the rest of the batch (like BatchNorm left in training mode)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.flatten(1)[:, :8]
        return v - v.mean(dim=0, keepdim=True)


BAD_ENCODERS = (
    "random-bytes",
    "state-dict",
    "pickled-module",
    "rank-4",
    "batch-mean",
    "non-finite",
    "raises",
)


def export_bad_encoder(
    path: str | os.PathLike[str], fault: str, *, image_size: int = 32, channels: int = 1
) -> Path:
    """Write a file `import-encoder` must refuse: `fault` is one of BAD_ENCODERS (or "batch-dependent").

    Models are TorchScript files; the non-model faults are random bytes and `torch.save` pickles.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    toy = ToyEncoder(channels, 8, False, 0)
    if fault == "random-bytes":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
        return path
    if fault == "state-dict":
        torch.save(toy.state_dict(), path)
        return path
    if fault == "pickled-module":
        torch.save(toy, path)
        return path
    modules = {
        "rank-4": lambda: _Rank4(channels),
        "batch-mean": _BatchMean,
        "non-finite": _NonFinite,
        "raises": _Raises,
        "batch-dependent": _BatchDependent,
    }
    if fault not in modules:
        raise ValueError(f"fault must be one of {BAD_ENCODERS} or 'batch-dependent', got {fault!r}")
    return save_module(modules[fault](), path, "torchscript", torch.rand(2, channels, image_size, image_size))


def make_asymmetric_image(seed: int, size: int = 32) -> Image.Image:
    """A greyscale image unlike its own mirror: a left-to-right ramp plus three seeded blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = 0.6 * xx
    for _ in range(3):
        cx, cy = rng.uniform(0.1, 0.9, 2)
        r = rng.uniform(0.05, 0.15)
        img = img + rng.uniform(0.3, 0.6) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    return Image.fromarray(np.clip(img / img.max() * 255, 0, 255).astype(np.uint8), mode="L")
