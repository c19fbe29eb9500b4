"""The fast inference path: any torch encoder module, run on CPU by ONNX Runtime, checked against eager.

`accelerate(module, image_size)` returns a callable with the module's contract (float (N, C, S, S) in
[0, 1] -> its output tensor) that runs the module's graph in ONNX Runtime on CPU: on 2 cores it was
the fastest of eager, channels_last, torch.compile and ONNX Runtime at every input size and batch
size measured, with the same embeddings (docs/pretrained.md, "Trunk and inference speed";
`python -m bench.trunk_speed`). The graph is exported in memory when the model is loaded (about a
second for EfficientNet-Lite0), not cached on disk: nothing to go stale when a run's model changes,
and a read-only run still loads.

Every accelerated module is checked once at load on a probe batch: each output row must have cosine
>= `MATCH_COSINE` with eager's. A module that cannot be exported, or whose outputs differ, runs
eagerly instead (one log line says why); so does any module on a GPU, where ONNX Runtime's CPU
build does not help. ONNX Runtime uses `threads` intra-op threads (default: torch's thread count,
which the Ray Data mapper and the in-process indexer set to 1 per actor).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

#: Least cosine between the fast path's output row and eager's for the fast path to be used.
MATCH_COSINE = 0.9999
PROBE_BATCH = 2
ONNX_OPSET = 17


class OnnxModule:
    """A torch module's graph in an ONNX Runtime CPU session: torch float tensor in, torch tensor out."""

    backend = "onnxruntime"

    def __init__(self, module: nn.Module, model: bytes, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: its warnings are not the user's business
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.threads = threads
        self.module = module  # for its parameter count; the session holds its own copy of the weights

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) == 0:
            return self.module(x)
        x = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0])

    def parameters(self) -> list[torch.Tensor]:
        return list(self.module.parameters())


class EagerModule:
    """The module as it is (the fallback, and the GPU path), with the same small interface."""

    backend = "eager"

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.module.parameters())


def export_onnx(module: nn.Module, image_size: int, channels: int = 3) -> bytes:
    """The module's graph as ONNX bytes, with a dynamic batch dimension."""
    probe = torch.rand(PROBE_BATCH, channels, image_size, image_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        torch.onnx.export(
            module,
            probe,
            buffer,
            input_names=["images"],
            output_names=["output"],
            dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,  # the torch.export-based exporter needs onnxscript, which is not installed
        )
    return buffer.getvalue()


def matches(fast: Callable[[torch.Tensor], torch.Tensor], eager: nn.Module, x: torch.Tensor) -> float:
    """The least cosine between the rows of `fast(x)` and `eager(x)` (flattened)."""
    with torch.inference_mode():
        a = fast(x).float().flatten(1)
        b = eager(x).float().flatten(1)
    if a.shape != b.shape:
        return -1.0
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).min())


def accelerate(
    module: nn.Module,
    image_size: int,
    channels: int = 3,
    device: str | torch.device = "cpu",
    threads: int | None = None,
) -> OnnxModule | EagerModule:
    """`module` (in eval mode, taking float (N, channels, image_size, image_size)) on its fastest
    path that gives the same outputs: ONNX Runtime on CPU, eager elsewhere (module docstring)."""
    module = module.eval()
    if torch.device(device).type != "cpu":
        return EagerModule(module.to(device))
    threads = threads or torch.get_num_threads()
    try:
        fast = OnnxModule(module, export_onnx(module, image_size, channels), threads)
    except Exception as e:  # an operator ONNX cannot express, a shape it cannot trace
        log.warning("ONNX Runtime cannot run this encoder (%s: %s); using eager PyTorch", type(e).__name__, e)
        return EagerModule(module)
    probe = torch.rand(
        PROBE_BATCH, channels, image_size, image_size, generator=torch.Generator().manual_seed(0)
    )
    cosine = matches(fast, module, probe)
    if cosine < MATCH_COSINE:
        log.warning("ONNX Runtime's outputs differ from eager PyTorch's (cosine %.6f); using eager", cosine)
        return EagerModule(module)
    return fast
