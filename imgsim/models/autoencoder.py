"""The convolutional autoencoder: strided-conv encoder → bottleneck (the embedding) → transposed-conv decoder.

Input is the uint8 (N, C, S, S) batch that `imgsim.data.decode.decode_image` produces; scaling to
[0, 1] happens here, so training, indexing and serving share one preprocessing path. `embed()`
returns the search embedding: the bottleneck centred on the training-set mean (buffers saved with
the weights), so cosine similarity compares directions around the data's centre rather than the
origin. When trained with the contrastive term it is also PCA-whitened with the training-set
covariance, which helped the contrastive model and not the plain autoencoder (docs/results.md,
"Before `denoise-hog`"), so the plain default only centres.

Training objective (see `pipelines/train.py`): reconstruction of the clean image from a mildly
augmented, noisy view (a denoising autoencoder), optionally plus an auxiliary contrastive term
(InfoNCE, `--contrastive W`) that pulls together the embeddings of two augmented views of the same
image, and optionally neighbour distillation (`imgsim.training.recipes`' `denoise-hog`): the embedding
learns which images of a batch histograms of oriented gradients (`imgsim.models.hog`) find close. All are
unsupervised; the autoencoder remains the model.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgsim.config import DEFAULTS
from imgsim.errors import RunNotFound
from imgsim.io.atomic import atomic_write_bytes, atomic_write_json
from imgsim.io.runs import RunPaths
from imgsim.models import encoders
from imgsim.models.hog import orientation_histograms

#: "0" turns bf16 off on the CPU, "1" forces it on; unset: on where the CPU computes bf16 natively.
CPU_BF16_ENV = "IMGSIM_CPU_BF16"


def uses_bf16(device: torch.device | str) -> bool:
    """Whether the encoder runs in bf16 autocast with channels_last tensors on `device`.

    Always on a GPU. On a CPU only where it has native bf16 (AVX-512 BF16 or AMX, e.g. Xeon
    Sapphire Rapids and later), where it embeds 2.5-3.3x and trains 1.7-2.4x faster per step than
    float32 (`python -m bench.bf16`, docs/results.md); elsewhere bf16 is emulated and slower, so float32 stays.
    `IMGSIM_CPU_BF16=0|1` overrides the CPU's answer. The bottleneck's relative error is ~0.3 %
    (cosine distance ~1e-5 between the two), far below any duplicate threshold, so an index built
    one way and queried the other still agrees.
    """
    if torch.device(device).type == "cuda":
        return True
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return _cpu_has_native_bf16()


@lru_cache(maxsize=1)  # the CPU does not change: probe it once per process, not per batch or step
def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: stay in float32
        return False


def memory_format(device: torch.device | str) -> torch.memory_format:
    """channels_last where `uses_bf16(device)` (bf16 convolutions run fastest on NHWC weights and
    inputs), else the default layout: for `model.to(memory_format=...)` and `x.contiguous(...)`."""
    return torch.channels_last if uses_bf16(device) else torch.contiguous_format


def autocast(device: torch.device | str) -> torch.autocast:
    """`torch.autocast` in bf16 where `uses_bf16(device)`, else a no-op autocast."""
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=uses_bf16(device))


#: Architectures (`ModelConfig.arch`): "small" is the original strided-conv autoencoder (flatten ->
#: linear bottleneck), right for small greyscale images; "resnet" is a residual encoder with GeM
#: pooling to the bottleneck and a light upsampling decoder, for colour photos at 64-128 px; "lite0"
#: starts from the pretrained EfficientNet-Lite0 trunk (frozen), a trainable head to the bottleneck
#: and the same light decoder, for colour photos and clip art at 224 px (`imgsim.models.trunk_head`).
ARCHS = ("small", "resnet", "lite0")
#: Architectures built on a pretrained trunk: the trunk's name is `ModelConfig.trunk`.
TRUNK_ARCHS = {"lite0": "efficientnet-lite0"}
#: Images per pass of a trunk model's `embed`: ONNX Runtime's fastest batch on 2 cores (14.9 ms per
#: image at 64, docs/pretrained.md), and a few hundred MB of activations, not gigabytes.
TRUNK_EMBED_BATCH = 64


@dataclass(frozen=True)
class ModelConfig:
    """Architecture plus the preprocessing settings the model was trained with.

    Fields added after the first release have defaults that reproduce the original model, so model
    files written before them load unchanged (`from_dict` ignores keys it does not know).
    """

    image_size: int = DEFAULTS.preprocess.image_size
    channels: int = DEFAULTS.preprocess.channels
    dim: int = DEFAULTS.train.dim
    widths: tuple[int, ...] = (32, 64, 128)
    proj_dim: int = 64  # contrastive projection head (training only); 0 = the loss sees z itself
    arch: str = "small"
    recon_size: int = 0  # "resnet": side of the reconstruction (0 = image_size)
    blocks: int = 1  # "resnet": residual blocks per stage
    decoder_width: int = 64  # "resnet": channels of the decoder's first map (halved per upsampling)
    recipe: str = ""  # the training recipe's name (imgsim.training.recipes), for the record
    # the search embedding averages the bottlenecks of the image and its mirror image: mirror
    # invariance by construction, at twice the encoder's cost per indexed or query image
    mirror_symmetric: bool = False
    # "lite0": the pretrained trunk (name and weights' checksum: part of the model file, so of its
    # fingerprint) and how many of the `dim` embedding dimensions are the trunk's own projected
    # features (the rest are the trained head's bottleneck; `imgsim.models.trunk_head`)
    trunk: str = ""
    trunk_sha256: str = ""
    trunk_dims: int = 0
    # "lite0": the side of the grey thumbnail in the embedding (its side² values; 0 = none)
    thumb_size: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose from {', '.join(ARCHS)}")
        if self.trunk_dims < 0 or self.thumb_size < 0 or self.head_dim <= 0:
            raise ValueError(
                f"dim {self.dim} leaves no room for the trained bottleneck beside trunk_dims "
                f"{self.trunk_dims} and a {self.thumb_size} px thumbnail"
            )

    @property
    def head_dim(self) -> int:
        """The trained bottleneck's size: `dim` less the trunk's and the thumbnail's shares."""
        return self.dim - self.trunk_dims - self.thumb_size**2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d["widths"] = tuple(d.get("widths", cls.widths))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    k = 4 if stride == 2 else 3
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def _deconv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """Two 3x3 convs with a shortcut (average-pool + 1x1 conv when the shape changes, ResNet-D)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        shortcut: list[nn.Module] = []
        if stride > 1:
            shortcut.append(nn.AvgPool2d(stride, ceil_mode=True))
        if c_in != c_out:
            shortcut += [nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.shortcut = nn.Sequential(*shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class GeM(nn.Module):
    """Generalised-mean pooling over space, (mean x^p)^(1/p) with a learnt p: between average (p=1)
    and max pooling; the usual pooling for instance retrieval and copy detection."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(1.0, 8.0)
        return x.clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class ResEncoder(nn.Module):
    """Stride-2 stem, one stage per width (the first at the stem's resolution, then stride 2), GeM,
    linear to the bottleneck: works at any input size."""

    def __init__(self, channels: int, widths: tuple[int, ...], dim: int, blocks: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(channels, widths[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        c_in = widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(ResidualBlock(c_in, w, 2 if (i > 0 and b == 0) else 1))
                c_in = w
        self.features = nn.Sequential(*layers)
        self.pool = GeM()
        self.to_z = nn.Linear(c_in, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_z(self.pool(self.features(x)))


class LightDecoder(nn.Module):
    """Bottleneck -> a 4x4 map -> (upsample x2, 3x3 conv) until `size` -> image in [0, 1]."""

    def __init__(self, dim: int, channels: int, size: int, width: int = 64) -> None:
        super().__init__()
        self.grid = 4
        ups = max(0, math.ceil(math.log2(size / self.grid)))
        chans = [max(16, width >> i) for i in range(ups + 1)]  # halved at each upsampling
        self.start = chans[0]
        self.from_z = nn.Sequential(nn.Linear(dim, chans[0] * self.grid * self.grid), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:], strict=True):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(a, b, 3, padding=1, bias=False),
                nn.BatchNorm2d(b),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv2d(chans[-1], channels, 3, padding=1))
        self.net = nn.Sequential(*layers)
        self.size = size

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.from_z(z).view(-1, self.start, self.grid, self.grid)
        out = torch.sigmoid(self.net(h))
        if out.shape[-1] != self.size:
            out = F.interpolate(out, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return out


@dataclass
class AutoEncoderOutput:
    recon: torch.Tensor  # (N, C, S, S) in [0, 1]
    z: torch.Tensor  # bottleneck (N, D), before centring
    proj: torch.Tensor  # contrastive projection of z (training only)


class AutoEncoder(nn.Module):
    """Conv autoencoder for any image size and 1 or 3 channels."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ModelConfig()
        w = config.widths
        zdim = config.head_dim
        self._fast = None  # "lite0": the embedding graph on its fast path, built at the first embed
        # "lite0": the frozen trunk, kept in a list so that it is no submodule: not in the state dict
        # (the weights come from their package) nor in DDP's parameters
        self._trunk: list[nn.Module] = []
        if config.arch == "lite0":
            from imgsim.models.trunk import trunk_spec
            from imgsim.models.trunk_head import FeatureHead, feature_width

            self.scale, self.padded = 1, config.image_size
            feature_channels = trunk_spec(config.trunk or TRUNK_ARCHS["lite0"]).channels
            self.encoder = FeatureHead(feature_width(feature_channels), zdim)
            self.decoder = LightDecoder(zdim, config.channels, self.recon_size, config.decoder_width)
            self.register_buffer("trunk_mean", torch.zeros(feature_channels))
            self.register_buffer("trunk_proj", torch.zeros(feature_channels, config.trunk_dims))
        elif config.arch == "resnet":
            self.scale, self.padded = 1, config.image_size  # any size: no padding
            self.encoder = ResEncoder(config.channels, w, config.dim, config.blocks)
            self.decoder = LightDecoder(config.dim, config.channels, self.recon_size, config.decoder_width)
        else:
            # Every stride-2 conv halves the side; pad the input up to a multiple of 2**len(widths).
            self.scale = 2 ** len(w)
            self.grid = math.ceil(config.image_size / self.scale)
            self.padded = self.grid * self.scale
            # encoder: one stride-2 conv per width (S -> S/2 -> ... -> grid)
            self.encoder_conv = nn.Sequential(
                *[_conv_block(a, b, 2) for a, b in zip((config.channels, *w[:-1]), w, strict=True)]
            )
            flat = w[-1] * self.grid * self.grid
            self.to_z = nn.Linear(flat, config.dim)
            self.from_z = nn.Sequential(nn.Linear(config.dim, flat), nn.ReLU(inplace=True))
            # decoder: mirrored transposed convs (grid -> ... -> S); the last one outputs the image
            rev = tuple(reversed(w))
            self.decoder_conv = nn.Sequential(
                *[_deconv_block(a, b) for a, b in zip(rev[:-1], rev[1:], strict=True)],
                nn.ConvTranspose2d(rev[-1], config.channels, 4, stride=2, padding=1),
            )
        if config.proj_dim:
            self.projector = nn.Sequential(
                nn.Linear(zdim, zdim),
                nn.ReLU(inplace=True),
                nn.Linear(zdim, config.proj_dim),
            )
        else:
            self.projector = nn.Identity()
        # embedding post-processing fitted on the training data after training (see fit_whitening)
        self.register_buffer("emb_mean", torch.zeros(zdim))
        self.register_buffer("emb_whiten", torch.eye(zdim))

    @property
    def recon_size(self) -> int:
        """Side of the reconstruction (the input's for "small"; `recon_size` if set for "resnet")."""
        return self.config.recon_size or self.config.image_size

    # -- pieces ---------------------------------------------------------------------------------
    def to_float(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or float in [0, 1]) images → float in [0, 1], padded to the encoder's grid."""
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        pad = self.padded - x.shape[-1]
        if pad:
            x = F.pad(x, (0, pad, 0, pad), mode="replicate")
        return x

    @property
    def uses_trunk(self) -> bool:
        return self.config.arch in TRUNK_ARCHS

    def attach_trunk(self, device: str | torch.device = "cpu") -> AutoEncoder:
        """Load the pretrained trunk this model was trained on (from its installed package); refused
        in one line when the installed weights differ from the recorded ones."""
        from imgsim.errors import ModelMismatch
        from imgsim.models.trunk import load_trunk
        from imgsim.models.trunk_head import TrunkFeatures

        trunk = load_trunk(self.config.trunk, device)
        if self.config.trunk_sha256 and trunk.weights_sha256 != self.config.trunk_sha256:
            raise ModelMismatch(
                f"the installed {self.config.trunk} weights differ from those this model was trained on; "
                "reinstall the pinned package (make install) or train again"
            )
        self._trunk[:] = [TrunkFeatures(trunk).eval()]
        self._fast = None
        return self

    def trunk_features(self, x: torch.Tensor) -> torch.Tensor:
        """ "lite0": the frozen trunk's pooled features (`TrunkFeatures`) of float images in [0, 1]."""
        if not self._trunk:
            self.attach_trunk(next(self.parameters()).device)
        with torch.no_grad():
            return self._trunk[0](x)

    def encode_features(self, features: torch.Tensor) -> torch.Tensor:
        """ "lite0": the head's bottleneck (N, head_dim) from pooled trunk features (N, F)."""
        return self.encoder(features)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck z (N, D) for float images already passed through `to_float` ("lite0": the
        head's part, `head_dim`; `embed` adds the trunk's)."""
        if self.uses_trunk:
            return self.encode_features(self.trunk_features(x))
        if self.config.arch == "resnet":
            return self.encoder(x)
        h = self.encoder_conv(x)
        return self.to_z(h.flatten(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction in [0, 1], `recon_size` square (the input's unpadded size for "small")."""
        if self.config.arch != "small":
            return self.decoder(z)
        h = self.from_z(z).view(-1, self.config.widths[-1], self.grid, self.grid)
        out = torch.sigmoid(self.decoder_conv(h))
        s = self.config.image_size
        return out[..., :s, :s]

    def embedding_z(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck the search embedding is made of (mirror-averaged if `mirror_symmetric`),
        for float images already passed through `to_float`; before centring/whitening."""
        z = self.encode(x)
        if self.config.mirror_symmetric:
            z = (z + self.encode(x.flip(-1))) / 2
        return z

    def forward(self, x: torch.Tensor) -> AutoEncoderOutput:
        """Images (N, C, S, S) -> reconstruction, bottleneck and projection; "lite0" also takes the
        trunk's pooled features (N, F) of images, as its training does (`imgsim.training.view_features`)."""
        z = self.encode_features(x) if self.uses_trunk and x.ndim == 2 else self.encode(self.to_float(x))
        return AutoEncoderOutput(recon=self.decode(z), z=z, proj=self.projector(z))

    def embedding_graph(self) -> nn.Module:
        """ "lite0": images in [0, 1] -> the search embedding, one module (`imgsim.models.trunk_head`)."""
        from imgsim.models.trunk_head import FUSE_BUFFERS, EmbeddingGraph

        if not self._trunk:
            self.attach_trunk(next(self.parameters()).device)
        return EmbeddingGraph(
            self._trunk[0], self.encoder, {n: getattr(self, n) for n in FUSE_BUFFERS}, self.config.thumb_size
        ).eval()

    def _fast_path(self) -> object:
        if self._fast is None:
            from imgsim.models.fast import accelerate

            device = next(self.parameters()).device
            self._fast = accelerate(
                self.embedding_graph(), self.config.image_size, self.config.channels, device
            )
        return self._fast

    # -- inference ------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, images: np.ndarray | torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """THE search embedding for uint8 (N, C, S, S) images: float32 (N, D), centred and whitened.

        `batch_size` (None: `TRUNK_EMBED_BATCH` for "lite0", else 1,024) bounds the memory: the trunk's
        224 px activations for 1,024 images would take gigabytes."""
        batch_size = batch_size or (TRUNK_EMBED_BATCH if self.uses_trunk else 1024)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        x_all = torch.as_tensor(images)
        if x_all.ndim == 3:
            x_all = x_all.unsqueeze(0)
        out = []
        on_gpu = device.type == "cuda"
        layout = memory_format(device)
        for start in range(0, len(x_all), batch_size):
            x = x_all[start : start + batch_size]
            x = (x.pin_memory() if on_gpu else x).to(device, non_blocking=True)
            x = self.to_float(x).contiguous(memory_format=layout)
            if self.uses_trunk:  # the whole graph on its fast path (ONNX Runtime on a CPU)
                out.append(self._fast_path()(x).float().cpu())
                continue
            with autocast(device):
                z = self.embedding_z(x)
            out.append(((z.float() - self.emb_mean) @ self.emb_whiten).cpu())
        self.train(was_training)
        if not out:
            return np.zeros((0, self.config.dim), dtype=np.float32)
        return torch.cat(out).numpy().astype(np.float32, copy=False)


# -- persistence ---------------------------------------------------------------------------------


def _model_path(run_dir: str | os.PathLike[str]) -> Path:
    """RUN/model/model.pt; `run_dir` may also be the model/ folder itself."""
    run_dir = Path(run_dir)
    paths = RunPaths(run_dir.parent if run_dir.name == "model" else run_dir)
    return paths.model_file


def save(model: AutoEncoder, run_dir: str | os.PathLike[str], extra: dict | None = None) -> Path:
    """Write weights + config atomically to RUN/model/model.pt (and a readable config.json beside it)."""
    path = _model_path(run_dir)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"config": model.config.to_dict(), "state_dict": state, "extra": extra or {}}
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_json(
        RunPaths(path.parent.parent).model_config, {"model": model.config.to_dict(), **(extra or {})}
    )
    return path


def _no_model(path: Path, run_dir: str | os.PathLike[str]) -> RunNotFound:
    return RunNotFound(
        f"no trained model at {path} — run `imgsim train DATA --out {run_dir}` "
        f"(or `imgsim import-encoder MODEL_FILE --out {run_dir}`) first"
    )


def load(run_dir: str | os.PathLike[str], device: str = "cpu") -> encoders.Encoder:
    """Load RUN's model (no Ray needed), in eval mode, with `.config` and `.fingerprint`: the trained
    AutoEncoder, or the encoder `imgsim import-encoder` stored (`imgsim.models.encoders`)."""
    path = _model_path(run_dir)
    if not path.is_file() and encoders.is_imported(path.parent.parent):
        return encoders.load(path.parent.parent, device=device)
    if not path.is_file():
        raise _no_model(path, run_dir)
    data = path.read_bytes()
    payload = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    model = AutoEncoder(ModelConfig.from_dict(payload["config"]))
    model.load_state_dict(payload["state_dict"])
    model.to(device, memory_format=memory_format(device)).eval()
    if model.uses_trunk:
        model.attach_trunk(device)
    model.fingerprint = hashlib.sha256(data).hexdigest()[:16]  # type: ignore[attr-defined]
    return model


def fingerprint(run_dir: str | os.PathLike[str]) -> str:
    """A short hash of the saved model file: changes whenever the weights or config change."""
    path = _model_path(run_dir)
    if not path.is_file() and encoders.is_imported(path.parent.parent):
        return encoders.fingerprint(path.parent.parent)
    if not path.is_file():
        raise _no_model(path, run_dir)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def describe(model: encoders.Encoder) -> str:
    """One line: architecture size, for logs (an imported encoder describes itself)."""
    if not isinstance(model, AutoEncoder):
        return model.describe()  # type: ignore[attr-defined]
    n = sum(p.numel() for p in model.parameters())
    return f"AutoEncoder({json.dumps(model.config.to_dict())}, {n:,} parameters)"


@dataclass
class Augment:
    """Batch augmentations in torch (no torchvision): random resized crop, flip, brightness/contrast."""

    # Mild by default: with the plain denoising objective, milder crops and shifts did better on
    # Fashion-MNIST (docs/results.md, "Before `denoise-hog`").
    scale: tuple[float, float] = (0.92, 1.0)
    max_shift: float = 0.04
    flip: bool = True
    jitter: float = 0.3
    noise: float = 0.03
    rng: torch.Generator | None = field(default=None, repr=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: float (N, C, H, W) in [0, 1] → an augmented view of the same shape."""
        n, dev = x.shape[0], x.device
        s = torch.empty(n, device=dev).uniform_(*self.scale)
        tx = torch.empty(n, device=dev).uniform_(-self.max_shift, self.max_shift)
        ty = torch.empty(n, device=dev).uniform_(-self.max_shift, self.max_shift)
        sx = s * (torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0) if self.flip else 1.0)
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = sx, s, tx, ty
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        b = torch.empty(n, 1, 1, 1, device=dev).uniform_(-self.jitter / 2, self.jitter / 2)
        c = torch.empty(n, 1, 1, 1, device=dev).uniform_(1 - self.jitter, 1 + self.jitter)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * c + mean + b
        if self.noise:
            out = out + self.noise * torch.randn_like(out)
        return out.clamp(0, 1)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR's InfoNCE), the one contrastive term of every recipe: row i of `z1` must pick
    row i of `z2` (and vice versa) among all 2N - 1 other rows, at `temperature`."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.t() / temperature
    n = z1.shape[0]
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


def fit_whitening(
    model: AutoEncoder, total: torch.Tensor, outer: torch.Tensor, count: float, whiten: bool = True
) -> None:
    """Set the centring/whitening buffers from sums over training bottlenecks (sum z, sum z zᵀ, n).

    With `whiten=False` only the mean is fitted (the whitening matrix stays the identity).
    """
    mean = total / count
    model.emb_mean.copy_(mean.float())
    if not whiten:
        model.emb_whiten.copy_(torch.eye(len(mean)))
        return
    cov = outer / count - torch.outer(mean, mean)
    eigval, eigvec = torch.linalg.eigh(cov.double())
    eigval = eigval.clamp(min=0) + 1e-6 * float(eigval.max().clamp(min=1e-12))
    model.emb_whiten.copy_((eigvec / eigval.sqrt()).float())


#: Neighbour distillation needs this many images in a (per-worker) batch: with a handful, centring
#: on the batch mean and a softmax over 3 or 4 neighbours swing the term by 10x from step to step.
MIN_DISTILL_BATCH = 32


def neighbour_distillation(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """KL(teacher || student) of each row's distribution over its neighbours in the batch.

    Both sets of vectors are centred on the batch mean and compared by cosine; a row's neighbour
    distribution is the softmax of its similarities to the other rows at `temperature`. The student
    learns which images the teacher finds close, and how close, not the teacher's coordinates, so its
    dimension may differ. Computed in float32 whatever the autocast.
    """
    with torch.autocast(device_type=student.device.type, enabled=False):
        s = F.normalize(student.float() - student.float().mean(0), dim=1)
        t = F.normalize(teacher.float() - teacher.float().mean(0), dim=1)
        # a row is not its own neighbour: -1e9 (not -inf, which would meet 0 * -inf in the KL)
        # gives the self pair a target of exactly 0
        self_pair = torch.eye(len(s), dtype=torch.bool, device=s.device)
        target = (t @ t.t() / temperature).masked_fill(self_pair, -1e9).softmax(dim=1)
        log_p = (s @ s.t() / temperature).masked_fill(self_pair, -1e9).log_softmax(dim=1)
        return F.kl_div(log_p, target, reduction="batchmean")


def training_loss(
    model: nn.Module,
    x_uint8: torch.Tensor,
    augment: Augment,
    nce_weight: float = 0.5,
    temperature: float = 0.1,
    distill_weight: float = 0.0,
    distill_temperature: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The denoising objective: reconstruct the clean image from an augmented view, plus InfoNCE
    between two views (`nce_weight`), plus neighbour distillation from the clean images' oriented-
    gradient histograms (`distill_weight`; `imgsim.models.hog`, `neighbour_distillation`; left out of
    batches under MIN_DISTILL_BATCH images, so tiny data sets train as plain `denoise`).

    The parts are detached 0-d tensors: `float()` them only to show them (on a GPU each `float()`
    waits for the device).

    All views go through one `model(...)` call, so a DDP-wrapped model synchronises gradients.
    """
    ae: AutoEncoder = getattr(model, "module", model)
    x = ae.to_float(x_uint8)
    n, s = x.shape[0], ae.config.image_size
    views = torch.cat([augment(x), augment(x)]) if nce_weight > 0 else augment(x)
    out = model(views)
    clean = x[..., :s, :s]
    if out.recon.shape[-1] != s:  # a decoder at a lower resolution ("resnet" with recon_size)
        clean = F.interpolate(clean, size=tuple(out.recon.shape[-2:]), mode="area")
    targets = torch.cat([clean, clean]) if nce_weight > 0 else clean
    rec_loss = F.mse_loss(out.recon, targets)
    loss, parts = rec_loss, {"recon": rec_loss.detach(), "nce": torch.zeros((), device=rec_loss.device)}
    if nce_weight > 0:
        nce = info_nce(out.proj[:n], out.proj[n:], temperature)
        loss, parts["nce"] = loss + nce_weight * nce, nce.detach()
    if distill_weight > 0 and n >= MIN_DISTILL_BATCH:
        teacher = orientation_histograms(x[..., :s, :s])
        teacher = torch.cat([teacher, teacher]) if nce_weight > 0 else teacher
        distill = neighbour_distillation(out.z, teacher, distill_temperature)
        loss, parts["distill"] = loss + distill_weight * distill, distill.detach()
    return loss, parts
