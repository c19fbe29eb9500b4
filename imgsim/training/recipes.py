"""Training recipes: the objective, its augmentation and the architecture that suits the data.

A training loop (Ray Train's `train_loop_per_worker`, or an in-process benchmark) needs to know
nothing about which recipe it runs:

    choice = choose(sample_sizes, channels, use_gpu)          # arch, image size, recipe + the reason
    config = choice.model_config(dim=...)                     # stored with the model
    recipe = get_recipe(config.recipe)
    model = AutoEncoder(config)
    ... decode the training images at recipe.train_image_size(config) ...
    loss, parts = recipe.loss(model, x_uint8)                 # model may be DDP-wrapped
    ... after training: recipe.fit_embedding(model, batches)  # centring (and whitening)

Recipes (all stay autoencoders: the bottleneck is the embedding and reconstruction stays in the
objective):
- `denoise`: reconstruct the clean image from a mildly augmented, noisy view.
- `denoise-hog` (the default for small images): `denoise`, plus neighbour distillation: within each
  batch, the embedding learns which images a hand-made descriptor of edges (histograms of oriented
  gradients, `imgsim.models.hog`, computed on the clean images) finds close. Pixel reconstruction alone
  ranks images by their brightness layout; the edges tell a shirt from a pullover. The best measured
  for small greyscale images (Fashion-MNIST) at a few minutes of CPU (docs/results.md).
- `copy`: two edited views of each image (`imgsim.training.augment.CopyAugment`: crops, mirror, greyscale,
  colour, resampling blur, noise); the decoder reconstructs the clean image from each view, and an
  instance-discrimination term (NT-Xent / InfoNCE) pulls the two views' embeddings together against
  the rest of the batch. This teaches the invariances people expect of "the same photo".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imgsim.models.autoencoder import (
    Augment,
    AutoEncoder,
    ModelConfig,
    fit_whitening,
    training_loss,
    uses_bf16,
)
from imgsim.training.augment import CopyAugment


def _unwrap(model: nn.Module) -> AutoEncoder:
    return getattr(model, "module", model)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR's InfoNCE): row i of `a` must pick row i of `b` (and vice versa) among all 2N-1."""
    z = F.normalize(torch.cat([a, b]).float(), dim=1)
    n = a.shape[0]
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


@dataclass(frozen=True)
class Recipe:
    """An objective with its augmentation and training defaults; `loss(model, x_uint8)` is all a loop calls."""

    name: str
    objective: str  # "denoise" | "copy"
    recon_weight: float = 1.0
    nce_weight: float = 0.0
    temperature: float = 0.1
    distill_weight: float = 0.0  # "denoise": neighbour distillation from oriented-gradient histograms
    distill_temperature: float = 0.1
    augment: CopyAugment | None = None  # "copy" only
    decode_scale: float = 1.0  # training images are decoded this much larger than the model input
    whiten: bool = False  # PCA-whiten the embedding after training (else only centre it)
    # training defaults (2 CPU cores; a GPU affords more steps in the same time)
    lr: float = 2e-3
    batch_size: int = 256
    steps: int = 1000
    #: steps on a CPU that computes bf16 natively (`imgsim.models.autoencoder.uses_bf16`): more fit the same
    #: minutes there; 0 means `steps`
    steps_native_bf16: int = 0
    notes: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def train_image_size(self, config: ModelConfig) -> int:
        """The size to decode training images at (`imgsim.data.decode.decode_image`): the model's input,
        or larger so that crops are resampled from real pixels."""
        return max(config.image_size, round(config.image_size * self.decode_scale))

    def loss(self, model: nn.Module, x_uint8: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss for a uint8 (N, C, T, T) batch decoded at `train_image_size`, and its
        parts as detached 0-d tensors (no host sync per step; `float()` them to show them).

        All views go through one `model(...)` call, so a DDP-wrapped model synchronises gradients.
        """
        if self.objective == "denoise":
            return training_loss(
                model,
                x_uint8,
                _DENOISE_AUGMENT,
                self.nce_weight,
                distill_weight=self.distill_weight,
                distill_temperature=self.distill_temperature,
            )
        ae = _unwrap(model)
        cfg = ae.config
        x = x_uint8.float() / 255.0 if x_uint8.dtype == torch.uint8 else x_uint8.float()
        n = x.shape[0]
        views = torch.cat([self.augment(x, cfg.image_size), self.augment(x, cfg.image_size)])
        out = model(views)
        clean = F.interpolate(x, size=(ae.recon_size, ae.recon_size), mode="area")
        recon = F.mse_loss(out.recon.float(), torch.cat([clean, clean]))
        nce = nt_xent(out.proj[:n], out.proj[n:], self.temperature)
        loss = self.recon_weight * recon + self.nce_weight * nce
        return loss, {"recon": recon.detach(), "nce": nce.detach()}

    @torch.no_grad()
    def fit_embedding(self, model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
        """Centre (and, if `whiten`, whiten) the embedding on training images at the model's input size.

        `batches` yield uint8 (N, C, S, S) at `config.image_size`; for a distributed fit, sum the
        statistics across workers instead (see `embedding_statistics`)."""
        ae = _unwrap(model)
        total, outer, count = embedding_statistics(ae, batches)
        fit_whitening(ae, total, outer, count, whiten=self.whiten)


@torch.no_grad()
def embedding_statistics(
    ae: AutoEncoder, batches: Iterable[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(sum z, sum z zᵀ, n) over the bottlenecks of `batches`, in float64, for `fit_whitening`."""
    was_training = ae.training
    ae.eval()
    device = next(ae.parameters()).device
    dim = ae.config.dim
    total = torch.zeros(dim, dtype=torch.float64, device=device)
    outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    count = 0
    for batch in batches:
        x = batch.to(device)
        if x.shape[-1] != ae.config.image_size:
            x = F.interpolate(ae.to_float(x), size=(ae.config.image_size,) * 2, mode="area")
        z = ae.embedding_z(ae.to_float(x)).double()
        total += z.sum(0)
        outer += z.t() @ z
        count += len(z)
    ae.train(was_training)
    return total.cpu(), outer.cpu(), float(count)


# The original objective's augmentation (mild: crops 0.92-1.0, 4 % shifts; see imgsim.models.autoencoder.Augment).
_DENOISE_AUGMENT = Augment()

RECIPES: dict[str, Recipe] = {
    "denoise": Recipe(
        name="denoise",
        objective="denoise",
        notes="plain denoising autoencoder: Fashion-MNIST P@10 0.841 (docs/results.md)",
    ),
    "denoise-hog": Recipe(
        name="denoise-hog",
        objective="denoise",
        distill_weight=1.0,
        distill_temperature=0.1,
        notes="denoise + neighbour distillation from oriented-gradient histograms (docs/results.md)",
    ),
    "copy": Recipe(
        name="copy",
        objective="copy",
        recon_weight=1.0,
        nce_weight=1.0,
        temperature=0.1,
        augment=CopyAugment(p_greyscale=0.5),
        decode_scale=1.25,
        lr=2e-3,
        batch_size=128,
        # Fits the 10-minute budget on 2 cores through Ray Train: 800 steps took 11 min 35 s there
        # (72 s per 100 steps at best; 557 s in-process) for mix P@1 0.866; docs/quality.md
        steps=700,
        # bf16 on the CPU: 1,100 steps in 9 min 26 s, mix P@1 0.910 (700 steps: 0.866); docs/results.md
        steps_native_bf16=1100,
    ),
}


def get_recipe(name: str, **overrides: Any) -> Recipe:
    """A recipe by name, with fields overridden (e.g. `steps=...`)."""
    try:
        recipe = RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}") from None
    return replace(recipe, **overrides) if overrides else recipe


# -- choosing the architecture, input size and recipe from the data and the hardware --------------


@dataclass(frozen=True)
class Choice:
    """What `choose` picked, and why (one human-readable sentence, for the console and the model)."""

    arch: str
    image_size: int
    channels: int
    recipe: str
    dim: int
    widths: tuple[int, ...]
    recon_size: int
    proj_dim: int
    steps: int
    batch_size: int
    mirror_symmetric: bool
    reason: str

    def model_config(self, **overrides: Any) -> ModelConfig:
        """The ModelConfig to build (and store) for this choice; `overrides` win (e.g. dim=...)."""
        fields = {
            "image_size": self.image_size,
            "channels": self.channels,
            "dim": self.dim,
            "widths": self.widths,
            "arch": self.arch,
            "recon_size": self.recon_size if self.arch == "resnet" else 0,
            "proj_dim": self.proj_dim,
            "recipe": self.recipe,
            "mirror_symmetric": self.mirror_symmetric,
        }
        return ModelConfig(**(fields | overrides))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Images whose shorter side is at most this (median of a sample) count as small, like Fashion-MNIST.
SMALL_IMAGE_SIDE = 48


def choose(
    sizes: Iterable[tuple[int, int]],
    channels: int,
    use_gpu: bool = False,
    *,
    arch: str | None = None,
    image_size: int | None = None,
    recipe: str | None = None,
) -> Choice:
    """Pick the architecture, input size and recipe from a sample of the data and the hardware.

    `sizes`: (width, height) of a sample of the training images; `channels`: 1 or 3 as detected.
    `arch`, `image_size`, `recipe`: the user's flags; each one given wins over the automatic choice.
    """
    sides = sorted(min(w, h) for w, h in sizes) or [0]
    median = sides[len(sides) // 2]
    small = median <= SMALL_IMAGE_SIDE
    if small:
        auto_arch, auto_size, auto_recipe = "small", 32, "denoise-hog"
        why = f"small images (median shorter side {median} px <= {SMALL_IMAGE_SIDE})"
    else:
        auto_arch, auto_recipe = "resnet", "copy"
        auto_size = 96 if use_gpu else 64
        why = (
            f"{'colour' if channels == 3 else 'greyscale'} images of median shorter side {median} px: "
            f"the residual encoder at {auto_size} px ({'GPU' if use_gpu else 'CPU: 64 px fits a few minutes'})"
            ", trained to recognise edited copies (crops, mirror, greyscale, colour, blur)"
        )
    chosen_arch = arch or auto_arch
    chosen_size = image_size or auto_size
    chosen_recipe = recipe or (
        auto_recipe if chosen_arch == auto_arch else ("denoise-hog" if chosen_arch == "small" else "copy")
    )
    flags = [f"--{k} {v}" for k, v in (("arch", arch), ("image-size", image_size), ("recipe", recipe)) if v]
    if flags:
        why += f"; overridden by {' '.join(flags)}"
    if chosen_arch == "resnet":
        # 16-128 channels: a third of the 32-256 net's CPU cost per image (104 vs 52 img per CPU-s)
        widths, dim, recon, proj = ((32, 64, 128, 256) if use_gpu else (16, 32, 64, 128)), 128, 32, 64
    else:
        widths, dim, recon, proj = (32, 64, 128), 64, 0, 64
    base = get_recipe(chosen_recipe)
    if use_gpu:
        steps = base.steps * 4  # a GPU affords far more steps in the same minutes
    elif base.steps_native_bf16 and uses_bf16("cpu"):
        steps = base.steps_native_bf16
        why += f"; {steps:,} steps: this CPU computes bf16 natively"
    else:
        steps = base.steps
    reason = f"{chosen_arch} {chosen_size} px, recipe {chosen_recipe}: {why}"
    # photos: a mirror-symmetric embedding (mix P@1 0.613 -> 0.651, mirror copies 0.93 -> 1.00 on the
    # same trained model, docs/quality.md) for twice the encoder's cost per embedded image
    symmetric = chosen_arch == "resnet"
    return Choice(
        chosen_arch,
        chosen_size,
        channels,
        chosen_recipe,
        dim,
        widths,
        recon,
        proj,
        steps,
        base.batch_size,
        symmetric,
        reason,
    )
