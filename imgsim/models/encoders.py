"""The encoder interface, and encoders imported from a TorchScript or torch.export (.pt2) file.

Every run's model, trained or imported, is an `Encoder`: `.config` (at least `image_size`,
`channels`, `dim`), `.embed(uint8 (N, C, S, S)) -> float32 (N, D)` (scaling and normalisation
inside, batched, no gradients, on the device it was loaded on) and `.fingerprint` (a hash of the
stored files, which the index records). `imgsim.models.autoencoder.load(RUN)` returns a trained
`imgsim.models.autoencoder.AutoEncoder` when RUN/model/model.pt exists and an `ImportedEncoder` (this module)
when RUN/model/encoder.json does, so index, search, eval, serve and t-SNE never ask which one
they got.

An imported file maps a float32 batch (N, C, S, S) in [0, 1] (then `(x - mean) / std` when those
are given, one value or one per channel) to (N, D) float vectors. `import_encoder` refuses a file
that is not such a model, in one line naming the file and what to do, and writes nothing:

- it must be a TorchScript archive (`torch.jit.script`/`trace` + `torch.jit.save`) or a
  torch.export archive (`torch.export.export` + `torch.export.save`); a `torch.save` pickle (a
  state_dict or a whole module) holds no runnable graph and is refused;
- it must load on CPU and, on a probe batch (2, C, S, S), return one finite float (N, D) matrix
  whose rows do not depend on the rest of the batch (BatchNorm left in training mode would).

A .pt2 whose batch dimension was exported fixed (torch.export's default) is run in chunks of that
size, the last one padded. Accepted files are stored unchanged under RUN/model/ (`RunPaths.
encoder_file`) beside `encoder.json`, the directory swapped in whole (`imgsim.io.atomic`). Loading
runs the file's code: import only files you trust.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from imgsim.config import DEFAULTS
from imgsim.errors import ImgsimError, ModelMismatch
from imgsim.io.atomic import writing_dir
from imgsim.io.runs import RunPaths

#: The file formats `import_encoder` accepts: TorchScript (.pt) and torch.export (.pt2).
FORMATS = ("torchscript", "export")
#: A pretrained trunk from an installed package (`imgsim.models.trunk`): no file in the run, only its name
#: and the weights' checksum in encoder.json.
PRETRAINED = "pretrained"
FORMAT_NAMES = {"torchscript": "TorchScript", "export": "torch.export", PRETRAINED: "pretrained"}
HOW_TO_EXPORT = (
    "export the model with torch.jit.script (or trace) + torch.jit.save, or torch.export.export + "
    "torch.export.save (docs/usage.md: Bring your own encoder)"
)
PROBE_BATCH = 2


# -- the interface ------------------------------------------------------------------------------------
@runtime_checkable
class EncoderSettings(Protocol):
    """What every encoder's `.config` says: the input it expects and the embedding it gives."""

    image_size: int
    channels: int
    dim: int

    def to_dict(self) -> dict: ...


@runtime_checkable
class Encoder(Protocol):
    """A run's model, trained (`imgsim.models.autoencoder.AutoEncoder`) or imported (`ImportedEncoder`).

    `embed` takes the uint8 (N, C, S, S) batch `imgsim.data.decode.decode_image` produces (C =
    `config.channels`, S = `config.image_size`) and returns float32 (N, `config.dim`) vectors;
    `fingerprint` changes whenever the stored model does, so an index built with another model is
    refused or rebuilt. `imgsim.models.autoencoder.describe(encoder)` gives a one-line description of either.
    """

    config: EncoderSettings
    fingerprint: str

    def embed(self, images: np.ndarray | torch.Tensor, batch_size: int = ...) -> np.ndarray: ...


# -- imported encoders --------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderConfig:
    """An imported encoder's settings, stored in RUN/model/encoder.json."""

    format: str  # "torchscript" | "export"
    image_size: int
    channels: int
    dim: int
    mean: tuple[float, ...] = (0.0,)  # one value, or one per channel
    std: tuple[float, ...] = (1.0,)
    batch_size: int = 0  # 0: any batch size; else the fixed batch size a .pt2 was exported with
    sha256: str = ""  # of the encoder file
    source: str = ""  # the file it was imported from (for people; not part of the fingerprint)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EncoderConfig:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["mean"], d["std"] = tuple(d.get("mean", (0.0,))), tuple(d.get("std", (1.0,)))
        return cls(**d)

    def fingerprint(self) -> str:
        """A short hash of the encoder file and every setting that changes its embeddings."""
        keys = ("format", "image_size", "channels", "dim", "mean", "std", "sha256")
        text = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class ImportedEncoder:
    """A TorchScript or torch.export module behind the `Encoder` interface."""

    def __init__(self, module: Callable[[torch.Tensor], Any], config: EncoderConfig, device: str = "cpu"):
        self.module = module
        self.config = config
        self.device = torch.device(device)
        self.fingerprint = config.fingerprint()
        shape = (1, -1, 1, 1)
        self._mean = torch.tensor(config.mean, dtype=torch.float32, device=self.device).view(shape)
        self._std = torch.tensor(config.std, dtype=torch.float32, device=self.device).view(shape)

    def forward(self, x: torch.Tensor) -> Any:
        """The module on float (N, C, S, S) in [0, 1] (normalised here), in chunks of a fixed batch size."""
        x = (x - self._mean) / self._std
        fixed = self.config.batch_size
        if not fixed or len(x) == fixed:
            return self.module(x)
        outs = []
        for start in range(0, len(x), fixed):
            chunk = x[start : start + fixed]
            pad = fixed - len(chunk)
            if pad:
                chunk = torch.cat([chunk, chunk.new_zeros((pad, *chunk.shape[1:]))])
            out = self.module(chunk)
            if not isinstance(out, torch.Tensor):
                return out  # checked by the caller
            outs.append(out[: fixed - pad])
        return torch.cat(outs)

    @torch.inference_mode()
    def embed(
        self, images: np.ndarray | torch.Tensor, batch_size: int = DEFAULTS.index.embed_batch_size
    ) -> np.ndarray:
        """uint8 (N, C, S, S) images (or float in [0, 1]) → float32 (N, D)."""
        x_all = torch.as_tensor(images)
        if x_all.ndim == 3:
            x_all = x_all.unsqueeze(0)
        out = []
        for start in range(0, len(x_all), batch_size):
            x = x_all[start : start + batch_size].to(self.device, non_blocking=True)
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            out.append(self.forward(x).float().cpu())
        if not out:
            return np.zeros((0, self.config.dim), dtype=np.float32)
        return torch.cat(out).numpy().astype(np.float32, copy=False)

    def parameters(self) -> list[torch.Tensor]:
        params = getattr(self.module, "parameters", None)
        return list(params()) if callable(params) else []

    def describe(self) -> str:
        """One line: format, input, embedding size, normalisation, parameters."""
        c = self.config
        if c.format == PRETRAINED:
            backend = getattr(self.module, "backend", "eager")
            return f"pretrained {c.source} trunk, pooled ({c.channels}x{c.image_size}x{c.image_size} -> {c.dim}, {backend})"
        n = sum(p.numel() for p in self.parameters())
        batch = f"fixed batch {c.batch_size}" if c.batch_size else "any batch"
        return (
            f"imported {FORMAT_NAMES[c.format]} encoder {Path(c.source).name or '?'} "
            f"({c.channels}x{c.image_size}x{c.image_size} -> {c.dim}, mean {list(c.mean)}, std {list(c.std)}, "
            f"{batch}, {n:,} parameters)"
        )


# -- reading a file -----------------------------------------------------------------------------------
def _refuse(file: str | os.PathLike[str], what: str, todo: str = HOW_TO_EXPORT) -> ImgsimError:
    return ImgsimError(f"{file}: {what}; {todo}")


def _reason(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line: its last "XError: ..." line (TorchScript wraps the real error
    in an interpreter traceback), else its first line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception): ", line)]
    text = errors[-1] if errors else lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def sniff_format(data: bytes, file: str | os.PathLike[str] = "model file") -> str:
    """The format ("torchscript" or "export") from the archive's entries; refuses anything else."""
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except zipfile.BadZipFile:
        raise _refuse(file, "not a TorchScript or torch.export (.pt2) file (not a zip archive)") from None
    inner = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if "archive_format" in inner or any(n.startswith("models/") for n in inner):
        return "export"
    if "constants.pkl" in inner and any(n.startswith("code/") for n in inner):
        return "torchscript"
    if "data.pkl" in inner:
        raise _refuse(
            file,
            "a torch.save pickle (a state_dict or a whole module): weights without a runnable graph",
        )
    raise _refuse(file, "a zip archive, but not a TorchScript or torch.export (.pt2) file")


def load_module(data: bytes, format: str, device: str = "cpu") -> Callable[[torch.Tensor], Any]:
    """The runnable module of a TorchScript or torch.export archive, on `device`, in eval mode."""
    if format == "torchscript":
        module = torch.jit.load(io.BytesIO(data), map_location=device)
        return module.eval()
    program = torch.export.load(io.BytesIO(data))
    if torch.device(device).type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    return program.module()  # exported in eval mode or not, its graph is fixed: no .eval() to call


def exported_input_shape(data: bytes) -> tuple[int | None, ...] | None:
    """The input shape a .pt2 was exported for (None for a dynamic dimension), or None when it does
    not take exactly one tensor."""
    program = torch.export.load(io.BytesIO(data))
    names = list(program.graph_signature.user_inputs)
    if len(names) != 1:
        return None
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == names[0])
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(s if isinstance(s, int) else None for s in val.shape)


def _per_channel(
    values: Sequence[float] | None, default: float, channels: int, name: str
) -> tuple[float, ...]:
    if values is None:
        return (default,)
    values = tuple(float(v) for v in values)
    if len(values) not in (1, channels):
        raise ImgsimError(f"--{name} takes one value or one per channel ({channels}), got {len(values)}")
    if not all(math.isfinite(v) for v in values) or (name == "std" and min(values) <= 0):
        raise ImgsimError(
            f"--{name} must be finite{' and positive' if name == 'std' else ''}: {list(values)}"
        )
    return values


def _check_output(out: Any, n: int, file: str | os.PathLike[str], shape: tuple[int, ...]) -> torch.Tensor:
    """The probe's output if it is a finite float (n, D) matrix; else a one-line refusal."""
    todo = "export a module whose forward returns the (N, D) embedding tensor"
    if not isinstance(out, torch.Tensor):
        raise _refuse(
            file, f"returns a {type(out).__name__}, not a tensor, for a batch of shape {shape}", todo
        )
    if not out.is_floating_point():
        raise _refuse(file, f"returns {out.dtype} values for a batch of shape {shape}, not floats", todo)
    if out.ndim != 2 or out.shape[0] != n or out.shape[1] < 1:
        got = tuple(out.shape)
        raise _refuse(file, f"returns shape {got} for a batch of shape {shape}, not ({n}, D)", todo)
    if not torch.isfinite(out).all():
        raise _refuse(
            file,
            f"returns NaN or infinite values for a batch of shape {shape}",
            "check the model and --mean/--std",
        )
    return out.float()


def probe(encoder: ImportedEncoder, file: str | os.PathLike[str]) -> int:
    """Run a probe batch; the embedding size D, or a one-line refusal (see the module docstring)."""
    c = encoder.config
    shape = (PROBE_BATCH, c.channels, c.image_size, c.image_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = images.float() / 255.0
    with torch.inference_mode():
        try:
            batch = encoder.forward(x)
        except Exception as e:
            raise _refuse(
                file,
                f"fails on a probe batch of shape {shape} ({_reason(e)})",
                "check --image-size and --channels against the input the model expects",
            ) from None
        batch = _check_output(batch, PROBE_BATCH, file, shape)
        try:
            alone = torch.cat(
                [_check_output(encoder.forward(x[i : i + 1]), 1, file, shape) for i in range(len(x))]
            )
        except ImgsimError:
            raise
        except Exception as e:
            raise _refuse(
                file,
                f"fails on a batch of one image ({_reason(e)})",
                "export it with a dynamic batch dimension (torch.export dynamic_shapes)",
            ) from None
    scale = float(batch.abs().max().clamp(min=1.0))
    if float((batch - alone).abs().max()) > 1e-3 * scale:
        raise _refuse(
            file,
            "gives an image a different vector depending on the other images of its batch",
            "call model.eval() before exporting (BatchNorm in training mode does this)",
        )
    return int(batch.shape[1])


def inspect_file(
    file: str | os.PathLike[str],
    image_size: int,
    channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[bytes, EncoderConfig]:
    """Read and validate a model file on CPU: (its bytes, the settings to store). Refusals are
    `ImgsimError`s whose one-line message names the file and what to do."""
    path = Path(file)
    if not path.is_file():
        raise ImgsimError(
            f"{file}: no such file; give the path of a TorchScript (.pt) or torch.export (.pt2) file"
        )
    if image_size < 1:
        raise ImgsimError(f"--image-size must be at least 1, got {image_size}")
    data = path.read_bytes()
    format = sniff_format(data, file)
    batch_size = 0
    if format == "export":
        try:
            shape = exported_input_shape(data)
        except Exception as e:
            raise _refuse(file, f"cannot be loaded as a torch.export program ({_reason(e)})") from None
        if shape is None or len(shape) != 4:
            raise _refuse(
                file,
                f"takes {'inputs other than one tensor' if shape is None else f'a {len(shape)}-d input'}, "
                "not one (N, C, S, S) image batch",
                "export a module whose forward takes one image tensor",
            )
        batch_size, c, h, w = (s or 0 for s in shape)
        channels = channels or c or None
        for name, want, got in (
            ("--channels", c, channels),
            ("--image-size", h, image_size),
            ("--image-size", w, image_size),
        ):
            if want and want != got:
                raise _refuse(
                    file,
                    f"was exported for input shape {tuple(s if s else 'N' for s in shape)}, not "
                    f"{channels or 3}x{image_size}x{image_size}",
                    f"pass {name} {want}, or export it again for the size you want",
                )
    channels = channels or 3
    if channels not in (1, 3):
        raise ImgsimError(f"--channels must be 1 or 3, got {channels}")
    config = EncoderConfig(
        format=format,
        image_size=image_size,
        channels=channels,
        dim=0,
        mean=_per_channel(mean, 0.0, channels, "mean"),
        std=_per_channel(std, 1.0, channels, "std"),
        batch_size=batch_size,
        sha256=hashlib.sha256(data).hexdigest(),
        source=str(path.resolve()),
    )
    try:
        module = load_module(data, format, "cpu")
    except Exception as e:
        raise _refuse(file, f"cannot be loaded as a {FORMAT_NAMES[format]} file ({_reason(e)})") from None
    dim = probe(ImportedEncoder(module, config), file)
    return data, EncoderConfig.from_dict({**config.to_dict(), "dim": dim})


# -- a run's imported encoder ------------------------------------------------------------------------
def is_imported(run: str | os.PathLike[str]) -> bool:
    """Whether RUN/model holds an imported encoder."""
    return RunPaths(run).encoder_manifest.is_file()


def read_config(run: str | os.PathLike[str]) -> EncoderConfig:
    return EncoderConfig.from_dict(json.loads(RunPaths(run).encoder_manifest.read_text()))


def fingerprint(run: str | os.PathLike[str]) -> str:
    """The imported encoder's fingerprint, without loading it."""
    return read_config(run).fingerprint()


def load(run: str | os.PathLike[str], device: str = "cpu") -> ImportedEncoder:
    """RUN's imported encoder on `device` ("cpu", "cuda", "cuda:1")."""
    paths = RunPaths(run)
    config = read_config(run)
    if config.format == PRETRAINED:
        return _load_pretrained(config, device)
    data = paths.encoder_file(config.format).read_bytes()
    if hashlib.sha256(data).hexdigest() != config.sha256:
        raise ModelMismatch(
            f"{paths.encoder_file(config.format)} does not match {paths.encoder_manifest} (changed or truncated); "
            f"import the encoder again with `imgsim import-encoder FILE --out {run} --force`"
        )
    return ImportedEncoder(load_module(data, config.format, device), config, device)


def _load_pretrained(config: EncoderConfig, device: str) -> ImportedEncoder:
    """The trunk named in encoder.json, pooled, on its fast path; refused if the installed weights differ."""
    from imgsim.models.fast import accelerate
    from imgsim.models.trunk import PooledTrunk, load_trunk

    trunk = load_trunk(config.source, device)
    if trunk.weights_sha256 != config.sha256:
        raise ModelMismatch(
            f"the installed {config.source} weights differ from those this run was made with; "
            f"make the run again with `imgsim import-encoder --pretrained {config.source} --out RUN --force`"
        )
    module = accelerate(PooledTrunk(trunk), config.image_size, config.channels, device)
    return ImportedEncoder(module, config, device)


def check_trainable(run: str | os.PathLike[str]) -> None:
    """Refuse to train into (or resume) a run whose model was imported, in one line."""
    paths = RunPaths(run)
    if is_imported(paths.root):
        raise ImgsimError(
            f"{paths.root} holds an imported encoder ({paths.encoder_manifest.name}), which imgsim train "
            "cannot train or resume; train into another --out RUN"
        )


def _refuse_existing(paths: RunPaths, force: bool) -> None:
    existing = paths.model_file if paths.model_file.is_file() else None
    existing = existing or (paths.encoder_manifest if paths.encoder_manifest.is_file() else None)
    if existing and not force:
        kind = "an imported encoder" if existing == paths.encoder_manifest else "a trained model"
        raise ImgsimError(
            f"{paths.model_dir} already holds {kind}; choose another --out, or pass --force to replace it "
            "(the next imgsim index then embeds everything again)"
        )


def _write_manifest(paths: RunPaths, config: EncoderConfig, data: bytes | None) -> None:
    """RUN/model whole or not at all: encoder.json (and the encoder file, when there is one)."""
    created = not paths.root.exists()
    try:
        with writing_dir(paths.model_dir) as tmp:
            if data is not None:
                (tmp / paths.encoder_file(config.format).name).write_bytes(data)
            manifest = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
            (tmp / paths.encoder_manifest.name).write_text(manifest)
    except BaseException:
        if created:
            shutil.rmtree(paths.root, ignore_errors=True)
        raise


def import_encoder(
    file: str | os.PathLike[str],
    run: str | os.PathLike[str],
    *,
    image_size: int,
    channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Validate `file` (see the module docstring) and store it as RUN's model; a summary.

    RUN/model is written whole or not at all; a refused file leaves RUN as it was (not even created).
    """
    started = time.perf_counter()
    paths = RunPaths(Path(run).resolve())
    _refuse_existing(paths, force)
    data, config = inspect_file(file, image_size, channels, mean, std)
    _write_manifest(paths, config, data)
    return {
        "run": str(paths.root),
        "model_dir": str(paths.model_dir),
        "file": str(file),
        "fingerprint": config.fingerprint(),
        "seconds": round(time.perf_counter() - started, 2),
        **{k: v for k, v in config.to_dict().items() if k not in ("source",)},
    }


def import_pretrained(name: str, run: str | os.PathLike[str], *, force: bool = False) -> dict[str, Any]:
    """Make RUN a zero-training run: the pretrained trunk `name` alone, its feature map averaged.

    Nothing is copied: encoder.json names the trunk and its weights' checksum (part of the
    fingerprint), and loading takes the weights from the installed package (`imgsim.models.trunk`).
    """
    from imgsim.models.trunk import load_trunk, trunk_spec

    started = time.perf_counter()
    spec = trunk_spec(name)
    load_trunk(name)  # refuses a missing or corrupt package before anything is written
    paths = RunPaths(Path(run).resolve())
    _refuse_existing(paths, force)
    config = EncoderConfig(
        format=PRETRAINED,
        image_size=spec.native_size,
        channels=3,
        dim=spec.channels,
        sha256=spec.weights_sha256,
        source=name,
    )
    _write_manifest(paths, config, data=None)
    return {
        "run": str(paths.root),
        "model_dir": str(paths.model_dir),
        "pretrained": name,
        "fingerprint": config.fingerprint(),
        "seconds": round(time.perf_counter() - started, 2),
        **{k: v for k, v in config.to_dict().items() if k not in ("source",)},
    }
