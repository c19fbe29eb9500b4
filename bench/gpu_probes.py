"""The GPU check's helpers, each run by `bench/gpu_check.py` as a script in its own process:

    python bench/gpu_probes.py machine --device cuda            versions, the GPU (JSON on stdout)
    python bench/gpu_probes.py kernels --device cuda --configs JSON --seconds 4
                                                                 the training step on synthetic batches
    python bench/gpu_probes.py shared --device cuda             two ranks on one GPU, NCCL and gloo
    python bench/gpu_probes.py train-shim --gpus-per-worker 0.5 --backend gloo -- train DATA ...
                                                                 `imgsim train` with both set
    python bench/gpu_probes.py init-model RUN                   an untrained model, for the index stages

A process of their own: a probe's CUDA context and memory go when it exits, before the next stage.
They import imgsim as installed (the check runs them outside the repository), like the CLI it drives.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def probe_machine(device: str) -> dict[str, Any]:
    """Versions and the device (`gpu_probes.py machine`)."""
    import platform

    info: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable}
    for name in ("torch", "ray", "faiss", "numpy", "pyarrow", "imgsim"):
        try:
            mod = __import__(name)
            info[f"{name}_version"] = getattr(mod, "__version__", None)
            info[f"{name}_path"] = str(Path(mod.__file__).parent) if getattr(mod, "__file__", None) else None
        except Exception as e:  # a missing module is a finding, not a crash
            info[f"{name}_error"] = f"{type(e).__name__}: {e}"
    try:
        import torch

        info["cuda_available"] = torch.cuda.is_available()
        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(
                cuda_device_name=p.name,
                cuda_capability=f"{p.major}.{p.minor}",
                cuda_memory_gib=round(p.total_memory / 2**30, 1),
                cuda_multiprocessors=p.multi_processor_count,
                nccl_version=".".join(map(str, torch.cuda.nccl.version())),
            )
    except Exception as e:
        info["cuda_error"] = f"{type(e).__name__}: {e}"
    return info


def probe_kernels(device: str, configs: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The training step on synthetic uint8 batches, timed four ways per config:

    kernels_img_s         batches already on the device, loss kept on the device (no host sync)
    as_train_loop_img_s   + `training_loss` and `float(loss)` as train.py does (two host syncs a step)
    with_h2d_img_s        + a pinned host batch copied to the device each step (non_blocking)
    cpu_2_threads_img_s   as_train_loop on the CPU with 2 threads (the 2-core figure), default config only
    """
    import torch

    from imgsim.models.autoencoder import ModelConfig

    dev = torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
    cores = os.cpu_count() or 1
    results = []
    for cfg in configs:
        fields = dict(image_size=cfg.get("image_size", 32), channels=cfg.get("channels", 1))
        row: dict[str, Any] = dict(cfg)
        if cfg.get("arch"):
            if "arch" not in ModelConfig.__dataclass_fields__:
                results.append({**row, "skipped": "ModelConfig has no `arch` yet"})
                continue
            fields["arch"] = cfg["arch"]
        try:
            mcfg = ModelConfig(**fields)
            torch.set_num_threads(cores)
            row.update(_time_step(mcfg, int(cfg["batch_size"]), dev, seconds))
            if cfg.get("name") == "default":  # the 2-core figure, on any machine
                if dev.type == "cpu" and cores <= 2:
                    row["cpu_2_threads_img_s"] = row["as_train_loop_img_s"]
                else:
                    torch.set_num_threads(2)
                    two = _time_step(
                        mcfg, int(cfg["batch_size"]), torch.device("cpu"), seconds, loop_only=True
                    )
                    row["cpu_2_threads_img_s"] = two["as_train_loop_img_s"]
                    torch.set_num_threads(cores)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
        results.append(row)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return {"device": str(dev), "results": results}


def _time_step(mcfg: Any, b: int, dev: Any, seconds: float, loop_only: bool = False) -> dict[str, Any]:
    """Images/s of one config's training step on `dev` (see probe_kernels for the variants)."""
    import torch
    import torch.nn.functional as F

    from imgsim.models.autoencoder import Augment, AutoEncoder, training_loss

    cuda = dev.type == "cuda"
    model = AutoEncoder(mcfg).to(dev)
    model.projector.requires_grad_(False)  # as train.py does without the contrastive term
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    aug = Augment()
    shape = (b, mcfg.channels, mcfg.image_size, mcfg.image_size)
    pool = [torch.randint(0, 256, shape, dtype=torch.uint8, device=dev) for _ in range(4)]
    host = [t.cpu().pin_memory() if cuda else t.cpu() for t in pool]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step_kernels(i: int) -> None:
        x = pool[i % len(pool)]
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cuda):
            xf = model.to_float(x)
            out = model(aug(xf))
            loss = F.mse_loss(out.recon, xf[..., : mcfg.image_size, : mcfg.image_size])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def step_loop(i: int, x: Any = None) -> None:
        x = pool[i % len(pool)] if x is None else x
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = training_loss(model, x, aug, 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        float(loss.detach())

    def step_h2d(i: int) -> None:
        step_loop(i, host[i % len(host)].to(dev, non_blocking=True))

    def rate(step: Callable[[int], None]) -> float:
        i, t0 = 0, time.perf_counter()  # warm-up: cuDNN/oneDNN algorithm choice, the allocator
        while i < 3 or time.perf_counter() - t0 < seconds / 3:
            step(i)
            i += 1
            if i % 5 == 0:
                sync()
        sync()
        n, t0 = 0, time.perf_counter()
        while True:
            step(n)
            n += 1
            if n % 5 == 0:
                sync()
                if time.perf_counter() - t0 >= seconds:
                    break
        sync()
        return round(n * b / (time.perf_counter() - t0), 1)

    if loop_only:
        return {"as_train_loop_img_s": rate(step_loop)}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    row = {"kernels_img_s": rate(step_kernels), "as_train_loop_img_s": rate(step_loop)}
    if cuda:
        row["with_h2d_img_s"] = rate(step_h2d)
        row["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def _shared_rank(rank: int, world: int, port: int, backend: str, device: str, out: Any) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dev = torch.device("cuda:0" if device == "cuda" else "cpu")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=40))
        t = torch.full((1024,), float(rank + 1), device=dev)
        dist.all_reduce(t)
        gathered = [torch.zeros(4, device=dev) for _ in range(world)]
        dist.all_gather(gathered, torch.full((4,), float(rank), device=dev))
        dist.broadcast(t, src=0)
        ok = float(t[0]) == world * (world + 1) / 2 and [float(g[0]) for g in gathered] == list(range(world))
        out.put((rank, "ok" if ok else "wrong result", None))
        dist.destroy_process_group()
    except Exception as e:
        out.put(
            (
                rank,
                "failed",
                f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}",
            )
        )


def probe_shared(device: str) -> dict[str, Any]:
    """Two processes on one device: all_reduce, all_gather, broadcast with each backend.

    NCCL refuses two ranks on one GPU ("Duplicate GPU detected"); this records what the machine says,
    and that gloo (which train_gpu_shared uses) works on CUDA tensors there.
    """
    import multiprocessing as mp

    backends = ["nccl", "gloo"] if device == "cuda" else ["gloo"]
    ctx = mp.get_context("spawn")
    found: dict[str, Any] = {}
    for backend in backends:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        q = ctx.Queue()
        procs = [ctx.Process(target=_shared_rank, args=(r, 2, port, backend, device, q)) for r in range(2)]
        for p in procs:
            p.start()
        results = {}
        deadline = time.time() + 50
        while len(results) < 2 and time.time() < deadline:
            try:
                rank, status, err = q.get(timeout=1)
                results[rank] = {"status": status, "error": err}
            except Exception:
                if not any(p.is_alive() for p in procs):
                    break
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        ok = len(results) == 2 and all(r["status"] == "ok" for r in results.values())
        found[backend] = {
            "works_with_two_ranks_on_one_device": ok,
            "ranks": results or "no answer",
            "exit_codes": [p.exitcode for p in procs],  # NCCL may abort a process rather than raise
        }
    return {"device": device, "backends": found}


def train_shim(gpus_per_worker: float, backend: str, argv: list[str]) -> int:
    """`imgsim train ...` with each worker asking for `gpus_per_worker` GPUs and DDP over `backend`.

    pipelines/train.py asks for {"GPU": 1} per worker and lets TorchTrainer pick NCCL; until it has
    options for both, this patches the two names it calls, in its own module, for this process only.
    """
    patch_train_module(gpus_per_worker, backend)
    from imgsim.cli import main

    return main(argv)


def patch_train_module(gpus_per_worker: float, backend: str) -> None:
    from ray.train.torch import TorchConfig

    import pipelines.train as train_mod

    scaling_cls, trainer_cls = train_mod.ScalingConfig, train_mod.TorchTrainer

    def scaling_config(**kwargs: Any) -> Any:
        if kwargs.get("use_gpu"):
            kwargs["resources_per_worker"] = {
                **(kwargs.get("resources_per_worker") or {}),
                "GPU": gpus_per_worker,
            }
        return scaling_cls(**kwargs)

    def torch_trainer(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("torch_config", TorchConfig(backend=backend))
        return trainer_cls(*args, **kwargs)

    train_mod.ScalingConfig, train_mod.TorchTrainer = scaling_config, torch_trainer


def init_model(run: str) -> dict[str, Any]:
    """Save an untrained default model as RUN's model (index stages without a trained one)."""
    from imgsim.models import autoencoder as model_lib
    from imgsim.models.autoencoder import AutoEncoder, ModelConfig

    path = model_lib.save(AutoEncoder(ModelConfig()), run, extra={"untrained": True})
    return {"model": str(path)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probe", choices=["machine", "kernels", "shared", "train-shim", "init-model"])
    p.add_argument("run", nargs="?", help="init-model: the run directory")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument(
        "--configs", default="[]", help="kernels: JSON list of {name, batch_size, image_size, channels, arch}"
    )
    p.add_argument("--seconds", type=float, default=4.0, help="kernels: timed seconds per variant")
    p.add_argument(
        "--gpus-per-worker", type=float, default=0.5, help="train-shim: GPUs per worker with --gpu"
    )
    p.add_argument("--backend", default="gloo", help="train-shim: torch.distributed backend")
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1 :] if "--" in argv else []  # train-shim: `imgsim` arguments
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if a.probe == "train-shim":
        return train_shim(a.gpus_per_worker, a.backend, rest)
    probes: dict[str, Callable[[], dict[str, Any]]] = {
        "machine": lambda: probe_machine(a.device),
        "kernels": lambda: probe_kernels(a.device, json.loads(a.configs), a.seconds),
        "shared": lambda: probe_shared(a.device),
        "init-model": lambda: init_model(a.run),
    }
    print(json.dumps(probes[a.probe](), default=str), flush=True)
    return 0


if __name__ == "__main__":
    # Run as a script: drop bench/ from the import path, where bench/train.py, bench/serve.py ...
    # would shadow real modules of those names (`serve` is imgsim's Serve package).
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.exit(main())
