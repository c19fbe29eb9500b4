"""The convolutional autoencoder: strided-conv encoder → bottleneck (the embedding) → transposed-conv decoder.

Input is the uint8 (N, C, S, S) batch that `imgsim.decode.decode_image` produces; scaling to
[0, 1] happens here, so training, indexing and serving share one preprocessing path. `embed()`
returns the search embedding: the bottleneck centred on the training-set mean (buffers saved with
the weights), so cosine similarity compares directions around the data's centre rather than the
origin. When trained with the contrastive term it is also PCA-whitened with the training-set
covariance, which helped the contrastive model and not the plain autoencoder (README, "what was
tried"), so the plain default only centres.

Training objective (see `pipelines/train.py`): reconstruction of the clean image from a mildly
augmented, noisy view (a denoising autoencoder), optionally plus an auxiliary contrastive term
(InfoNCE, `--contrastive W`) that pulls together the embeddings of two augmented views of the same
image. Both are unsupervised; the autoencoder remains the model.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgsim import encoders
from imgsim.atomic import atomic_write_bytes, atomic_write_json
from imgsim.config import DEFAULTS
from imgsim.errors import RunNotFound
from imgsim.runs import RunPaths


@dataclass(frozen=True)
class ModelConfig:
    """Architecture plus the preprocessing settings the model was trained with."""

    image_size: int = DEFAULTS.preprocess.image_size
    channels: int = DEFAULTS.preprocess.channels
    dim: int = DEFAULTS.train.dim
    widths: tuple[int, ...] = (32, 64, 128)
    proj_dim: int = 64  # contrastive projection head (training only)

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
        self.projector = nn.Sequential(
            nn.Linear(config.dim, config.dim), nn.ReLU(inplace=True), nn.Linear(config.dim, config.proj_dim)
        )
        # embedding post-processing fitted on the training data after training (see fit_whitening)
        self.register_buffer("emb_mean", torch.zeros(config.dim))
        self.register_buffer("emb_whiten", torch.eye(config.dim))

    # -- pieces ---------------------------------------------------------------------------------
    def to_float(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or float in [0, 1]) images → float in [0, 1], padded to the encoder's grid."""
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        pad = self.padded - x.shape[-1]
        if pad:
            x = F.pad(x, (0, pad, 0, pad), mode="replicate")
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck z (N, D) for float images already passed through `to_float`."""
        h = self.encoder_conv(x)
        return self.to_z(h.flatten(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction in [0, 1] of the original (unpadded) size."""
        h = self.from_z(z).view(-1, self.config.widths[-1], self.grid, self.grid)
        out = torch.sigmoid(self.decoder_conv(h))
        s = self.config.image_size
        return out[..., :s, :s]

    def forward(self, x: torch.Tensor) -> AutoEncoderOutput:
        z = self.encode(self.to_float(x))
        return AutoEncoderOutput(recon=self.decode(z), z=z, proj=self.projector(z))

    # -- inference ------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, images: np.ndarray | torch.Tensor, batch_size: int = 1024) -> np.ndarray:
        """THE search embedding for uint8 (N, C, S, S) images: float32 (N, D), centred and whitened."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        x_all = torch.as_tensor(images)
        if x_all.ndim == 3:
            x_all = x_all.unsqueeze(0)
        out = []
        for start in range(0, len(x_all), batch_size):
            x = x_all[start : start + batch_size].to(device, non_blocking=True)
            z = self.encode(self.to_float(x)).float()
            out.append(((z - self.emb_mean) @ self.emb_whiten).cpu())
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
    AutoEncoder, or the encoder `imgsim import-encoder` stored (`imgsim.encoders`)."""
    path = _model_path(run_dir)
    if not path.is_file() and encoders.is_imported(path.parent.parent):
        return encoders.load(path.parent.parent, device=device)
    if not path.is_file():
        raise _no_model(path, run_dir)
    data = path.read_bytes()
    payload = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    model = AutoEncoder(ModelConfig.from_dict(payload["config"]))
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()
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
    # Fashion-MNIST (README, "what was tried").
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


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """NT-Xent: each embedding's positive is the other view of the same image; the rest are negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
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


def training_loss(
    model: nn.Module, x_uint8: torch.Tensor, augment: Augment, nce_weight: float = 0.5
) -> tuple[torch.Tensor, dict[str, float]]:
    """The objective: denoising reconstruction of the clean image + InfoNCE between two views.

    Both views go through one `model(...)` call, so a DDP-wrapped model synchronises gradients.
    """
    ae: AutoEncoder = getattr(model, "module", model)
    x = ae.to_float(x_uint8)
    n, s = x.shape[0], ae.config.image_size
    views = torch.cat([augment(x), augment(x)]) if nce_weight > 0 else augment(x)
    out = model(views)
    clean = x[..., :s, :s]
    rec_loss = F.mse_loss(out.recon, torch.cat([clean, clean]) if nce_weight > 0 else clean)
    if nce_weight <= 0:
        return rec_loss, {"recon": float(rec_loss.detach()), "nce": 0.0}
    nce = info_nce(out.proj[:n], out.proj[n:])
    return rec_loss + nce_weight * nce, {"recon": float(rec_loss.detach()), "nce": float(nce.detach())}
