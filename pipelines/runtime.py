"""One place that starts (or joins) Ray for the batch jobs.

`ray job submit` and a user's own `ray.init` come first: when Ray is already initialised nothing
changes. Otherwise we join `RAY_ADDRESS` (a cluster) or start a local one, with these environment
variables in every worker process:

- `OMP_WAIT_POLICY=PASSIVE`: PyTorch's OpenMP threads sleep instead of spinning while they wait.
  Ray runs raylet, the object store, Ray Data tasks and the train workers on the same cores, and
  spinning threads slowed training measurably (docs/scaling.md, "Figures behind decisions"). The
  variable must be set before the worker process loads libgomp, which is why it goes in the
  worker's environment rather than in the loop.
- `RAY_TRAIN_ENABLE_PRINT_PATCH=0`: Ray Train 2.60 copies every `print` in a train worker to its
  logger *and* to the worker's stderr, so each progress line reached the driver twice.

A value already in the caller's environment wins.

What Ray prints is not the user's console (`imgsim.console.output`): workers' output stays in their log
files unless `--verbose` (`log_to_driver`), Ray Data's own progress bars are off (imgsim draws one
bar per stage), and once Ray is up the command's `RunLogs` links the session's log folder into
RUN/logs/.

How the environment reaches the workers depends on who starts Ray. Joining a running cluster, it
goes in the job's runtime environment. Starting a local Ray, it goes in this process's environment,
which the local raylet and every worker inherit: a job runtime environment there would make Ray
discard the workers it prestarts at `ray.init` (they were started without it) and start new ones
for the first tasks and actors, which delayed an embedding job's first batch by seconds
(docs/scaling.md, "Figures behind decisions").
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

from imgsim.console import output as console
from imgsim.console.progress import log, seconds, stage

WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def worker_env() -> dict[str, str]:
    """Environment variables for Ray worker processes (the caller's own values take precedence)."""
    return {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}


def starts_local_ray(address: str | None = None) -> bool:
    """True if `ray.init(address)` would start a new local Ray rather than join a running one.

    Asks Ray's own address resolution (RAY_ADDRESS, then a `ray start` cluster on this machine),
    a private API: if it is gone or fails, the answer is False, and the worker environment then
    travels in a runtime environment, which works either way.
    """
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(address) is None
    except Exception:  # an address Ray cannot parse or reach (ray.init will say so), or a newer Ray
        return False


def initialised_ray() -> ModuleType | None:
    """The `ray` module where Ray is initialised in this process, else None, without importing Ray
    (not imported means not initialised either)."""
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


def ensure_ray(**kwargs) -> None:
    """`ray.init` unless Ray is already initialised; joins RAY_ADDRESS when it is set. Says so in
    one line on the console, with where Ray's logs go."""
    import ray  # here, not at the top: a pipeline that needs no Ray this time does not pay its import

    if ray.is_initialized():
        return
    kwargs.setdefault("log_to_driver", console.verbose())
    local = starts_local_ray(kwargs.get("address"))
    with stage("start Ray" if local else "join Ray") as p:
        if local:
            os.environ.update(worker_env())
            ray.init(configure_logging=False, **kwargs)
        else:
            ray.init(configure_logging=False, runtime_env={"env_vars": worker_env()}, **kwargs)
        quiet_ray_data()
        console.ray_started()
        p.summary = _ray_line(local, p.elapsed())


def _ray_line(local: bool, took: float) -> str:
    import ray

    res = ray.cluster_resources()
    size = f"{res.get('CPU', 0):g} CPUs" + (f", {res['GPU']:g} GPUs" if res.get("GPU") else "")
    what = f"started a local Ray ({size})" if local else f"joined the Ray cluster ({size})"
    logs = console.active_logs()
    where = f"; Ray's logs: {logs.where()}" if logs is not None else ""
    return f"ray: {what} in {seconds(took)}{where}"


def gpu_or_cpu(use_gpu: bool, what: str) -> bool:
    """`use_gpu`, unless a local Ray has no GPU: then `what` runs on the CPU, said in one line (a
    cluster may still add GPU nodes, so there we ask for them and wait)."""
    import ray

    if not use_gpu or ray.cluster_resources().get("GPU", 0) > 0:
        return use_gpu
    node = getattr(getattr(ray, "_private", None), "worker", None)
    local = bool(getattr(getattr(node, "_global_node", None), "head", False))
    if local:
        log(f"--gpu: this machine's Ray has no GPU, so {what} runs on the CPU")
        return False
    log(f"--gpu: the Ray cluster has no GPU node yet; {what} waits for one")
    return True


def quiet_ray_data() -> None:
    """Turn off Ray Data's own progress output in this driver (imgsim shows one bar per stage)
    unless Ray's logs are shown live."""
    if not console.verbose():
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
