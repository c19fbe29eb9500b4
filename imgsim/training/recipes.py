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
- `trunk-copy` (the default for colour photos and clip art; arch "lite0"): the encoder starts from a
  pretrained ImageNet trunk (frozen on a CPU), so the network already knows what images show; the
  trained head learns copy invariance by NT-Xent between two of each image's views, edited with
  several edits at once (`imgsim.training.views`), keeps the trunk's sense of which images are alike
  by neighbour distillation from the trunk's features of the clean images, and its decoder
  reconstructs the clean image (32 px) from each view's bottleneck. The trunk's features of every
  view are computed once before training (`imgsim.training.view_features`): a step sees vectors, not
  pixels, so `loss` takes them (`batch_loss(model, batch)` picks the columns for any recipe).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imgsim.models.autoencoder import (
    MIN_DISTILL_BATCH,
    TRUNK_ARCHS,
    Augment,
    AutoEncoder,
    ModelConfig,
    fit_whitening,
    info_nce,
    neighbour_distillation,
    training_loss,
    uses_bf16,
)
from imgsim.models.trunk_head import global_part, principal_axes, thumb_side
from imgsim.training.augment import CopyAugment


def _unwrap(model: nn.Module) -> AutoEncoder:
    return getattr(model, "module", model)


@dataclass(frozen=True)
class Recipe:
    """An objective with its augmentation and training defaults; `loss(model, x_uint8)` is all a loop calls."""

    name: str
    objective: str  # "denoise" | "copy" | "trunk"
    recon_weight: float = 1.0
    nce_weight: float = 0.0
    temperature: float = 0.1
    distill_weight: float = 0.0  # "denoise": neighbour distillation from oriented-gradient histograms
    distill_temperature: float = 0.1
    augment: CopyAugment | None = None  # "copy" only
    decode_scale: float = 1.0  # training images are decoded this much larger than the model input
    whiten: bool = False  # PCA-whiten the embedding after training (else only centre it)
    # "trunk": edited views per image whose trunk features are computed before training (0: as many
    # as `imgsim.training.view_features.VIEW_BUDGET` affords for the data set's size)
    views: int = 0
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

    @property
    def columns(self) -> dict[str, torch.dtype]:
        """The training dataset's columns a step reads, with their dtypes."""
        if self.objective == "trunk":
            return {"features": torch.float16, "target": torch.uint8}
        return {"image": torch.uint8}

    def batch_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`loss` on a batch of the training dataset's `columns` (already on the model's device)."""
        if self.objective == "trunk":
            return self.trunk_loss(model, batch["features"], batch["target"])
        return self.loss(model, batch["image"])

    def trunk_loss(
        self, model: nn.Module, features: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The `trunk-copy` loss on cached trunk features (N, V + 1, C) (row 0: the clean image's)
        and the clean images at the decoder's size, uint8 (N, C, r, r)."""
        features = features.float()  # stored as float16; a CPU's bf16 autocast refuses to mix them
        n, v1 = features.shape[:2]
        rows = torch.arange(n, device=features.device)
        va = torch.randint(0, v1, (n,), device=features.device)
        vb = (va + torch.randint(1, v1, (n,), device=features.device)) % v1  # another view of the same image
        out = model(torch.cat([features[rows, va], features[rows, vb]]))
        clean = target.float() / 255.0
        recon = F.mse_loss(out.recon.float(), torch.cat([clean, clean]))
        nce = info_nce(out.proj[:n], out.proj[n:], self.temperature)
        loss = self.recon_weight * recon + self.nce_weight * nce
        parts = {"recon": recon.detach(), "nce": nce.detach()}
        if self.distill_weight > 0 and n >= MIN_DISTILL_BATCH:
            teacher = global_part(features[:, 0])  # the clean image's global GeM
            distill = neighbour_distillation(out.z, torch.cat([teacher, teacher]), self.distill_temperature)
            loss, parts["distill"] = loss + self.distill_weight * distill, distill.detach()
        return loss, parts

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
                temperature=self.temperature,
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
        nce = info_nce(out.proj[:n], out.proj[n:], self.temperature)
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


@torch.no_grad()
def trunk_statistics(
    ae: AutoEncoder, batches: Iterable[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """ "lite0": (sum z, sum g, sum g gᵀ, n) over the clean images' trunk features (float (N, F)
    batches: `TrunkFeatures`), their global GeMs `g` and the head's bottlenecks `z` of them, in
    float64, for `fit_trunk_embedding`."""
    was_training = ae.training
    ae.eval()
    device = next(ae.parameters()).device
    z_total = torch.zeros(ae.config.head_dim, dtype=torch.float64, device=device)
    channels = ae.trunk_mean.numel()
    g_total = torch.zeros(channels, dtype=torch.float64, device=device)
    g_outer = torch.zeros(channels, channels, dtype=torch.float64, device=device)
    count = 0
    for features in batches:
        features = features.to(device).float()
        z_total += ae.encode_features(features).double().sum(0)
        g = global_part(features)
        g_total += g.double().sum(0)
        g_outer += g.double().t() @ g.double()
        count += len(g)
    ae.train(was_training)
    return z_total.cpu(), g_total.cpu(), g_outer.cpu(), float(count)


@torch.no_grad()
def fit_trunk_embedding(
    ae: AutoEncoder, z_total: torch.Tensor, g_total: torch.Tensor, g_outer: torch.Tensor, count: float
) -> None:
    """ "lite0": centre the head's bottleneck and fit the trunk half's centring and principal axes
    (`imgsim.models.trunk_head`) from `trunk_statistics`' sums."""
    ae.emb_mean.copy_((z_total / max(count, 1.0)).float())
    mean, proj = principal_axes(g_total, g_outer, max(count, 1.0), ae.config.trunk_dims)
    ae.trunk_mean.copy_(mean)
    ae.trunk_proj.copy_(proj)


# The original objective's augmentation (mild: crops 0.92-1.0, 4 % shifts; see imgsim.models.autoencoder.Augment).
_DENOISE_AUGMENT = Augment()

RECIPES: dict[str, Recipe] = {
    "denoise": Recipe(
        name="denoise",
        objective="denoise",
        temperature=0.2,  # of the --contrastive term, when given
        notes="plain denoising autoencoder: Fashion-MNIST P@10 0.841 (docs/results.md)",
    ),
    "denoise-hog": Recipe(
        name="denoise-hog",
        objective="denoise",
        temperature=0.2,
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
    "trunk-copy": Recipe(
        name="trunk-copy",
        objective="trunk",
        recon_weight=1.0,
        nce_weight=1.0,
        temperature=0.1,
        distill_weight=1.0,
        distill_temperature=0.1,
        decode_scale=1.25,  # views crop from 280 px decodes
        lr=2e-3,
        batch_size=256,
        steps=600,
        notes="pretrained trunk + trained head: docs/pretrained.md",
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
    trunk: str = ""  # "lite0": the pretrained trunk's name
    trunk_dims: int = 0  # "lite0": the trunk's share of the embedding
    thumb_size: int = 0  # "lite0": the thumbnail's side (its side² values are in the embedding)

    def model_config(self, **overrides: Any) -> ModelConfig:
        """The ModelConfig to build (and store) for this choice; `overrides` win (e.g. dim=...)."""
        fields = {
            "image_size": self.image_size,
            "channels": self.channels,
            "dim": self.dim,
            "widths": self.widths,
            "arch": self.arch,
            "recon_size": self.recon_size if self.arch != "small" else 0,
            "proj_dim": self.proj_dim,
            "recipe": self.recipe,
            "mirror_symmetric": self.mirror_symmetric,
        }
        if self.trunk:
            from imgsim.models.trunk import trunk_spec

            fields |= {
                "trunk": self.trunk,
                "trunk_sha256": trunk_spec(self.trunk).weights_sha256,
                "trunk_dims": self.trunk_dims,
                "thumb_size": self.thumb_size,
            }
            # --dim D: the whole embedding; the trunk keeps half, the thumbnail a quarter
            if "dim" in overrides:
                fields |= {"trunk_dims": overrides["dim"] // 2, "thumb_size": thumb_side(overrides["dim"])}
        return ModelConfig(**(fields | overrides))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Images whose shorter side is at most this (median of a sample) count as small, like Fashion-MNIST.
SMALL_IMAGE_SIDE = 48
#: "lite0": the trunk's input side (its native one) and the embedding's size: the head's 256, the
#: trunk's 512 and the 16 x 16 thumbnail (`imgsim.models.trunk_head`).
TRUNK_IMAGE_SIZE = 224
TRUNK_EMBEDDING_DIM = 1024
#: The input side and recipe an architecture gets when `--arch` picks it against the automatic choice.
DEFAULT_SIZE = {
    "small": lambda gpu: 32,
    "resnet": lambda gpu: 96 if gpu else 64,
    "lite0": lambda gpu: TRUNK_IMAGE_SIZE,
}
DEFAULT_RECIPE = {"small": "denoise-hog", "resnet": "copy", "lite0": "trunk-copy"}


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
        # The pretrained trunk with a head trained on these images: on the photo-tile copies P@1 0.878
        # (the 64 px "copy" model 0.916 in the same run), several unseen edits combined 0.755, photos it never saw
        # 0.879, in half the copy model's training time (docs/pretrained.md)
        auto_arch, auto_recipe, auto_size = "lite0", "trunk-copy", TRUNK_IMAGE_SIZE
        why = (
            f"{'colour' if channels == 3 else 'greyscale'} images of median shorter side {median} px: "
            "a pretrained trunk knows what photos and drawings show; a head trained here adds copy "
            "invariance (--arch resnet: the small 64 px copy model, trained from scratch)"
        )
    chosen_arch = arch or auto_arch
    chosen_size = image_size or (
        auto_size if chosen_arch == auto_arch else DEFAULT_SIZE[chosen_arch](use_gpu)
    )
    chosen_recipe = recipe or (auto_recipe if chosen_arch == auto_arch else DEFAULT_RECIPE[chosen_arch])
    flags = [f"--{k} {v}" for k, v in (("arch", arch), ("image-size", image_size), ("recipe", recipe)) if v]
    if flags:
        why += f"; overridden by {' '.join(flags)}"
    trunk, trunk_dims, thumb = "", 0, 0
    if chosen_arch in TRUNK_ARCHS:
        # the trunk's own features keep half of the embedding, the thumbnail a quarter (docs/pretrained.md, "Fusing")
        trunk, trunk_dims = TRUNK_ARCHS[chosen_arch], TRUNK_EMBEDDING_DIM // 2
        thumb = thumb_side(TRUNK_EMBEDDING_DIM)
        widths, dim, recon, proj = (), TRUNK_EMBEDDING_DIM, 32, 0
        channels = 3  # the trunk sees RGB (greyscale images as three equal channels)
    elif chosen_arch == "resnet":
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
    if chosen_arch in TRUNK_ARCHS:
        reason += (
            "; lite0: the pretrained EfficientNet-Lite0 trunk (ImageNet; frozen) with a head and decoder "
            "trained on these images"
        )
    if chosen_arch in TRUNK_ARCHS and use_gpu:
        reason += "; the trunk stays frozen on a GPU too (fine-tuning its last stages is not built yet)"
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
        trunk,
        trunk_dims,
        thumb,
    )
