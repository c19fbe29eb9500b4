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

A cluster that does not answer is found out in seconds, not after Ray's minutes of retries: the
address Ray would join must accept a TCP connection within `RuntimeConfig.cluster_answer_s`. When
the address came from the file a `ray start` leaves behind (`/tmp/ray/ray_current_cluster`, still
there after that cluster was killed), it is stale: one line says so and a local Ray starts. When the
user named it (RAY_ADDRESS, `address=`), the command stops with one line saying what to do.

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
import socket
import sys
from types import ModuleType

from imgsim.config import DEFAULTS
from imgsim.console import output as console
from imgsim.console.progress import log, seconds, stage
from imgsim.errors import ImgsimError

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


def cluster_address(address: str | None = None) -> tuple[str, str] | None:
    """(host:port, where it came from) of the cluster `ray.init(address)` would join, or None when it
    would start a local Ray (or the address is one this check cannot judge: Ray will say)."""
    env = os.environ.get("RAY_ADDRESS") or None
    if "://" in (address if address not in (None, "auto") else env or ""):
        return None  # Ray Client (ray://) or a job server URL: Ray's own protocol and time-outs
    try:
        from ray._common.utils import get_ray_address_file
        from ray._private.services import canonicalize_bootstrap_address

        resolved = canonicalize_bootstrap_address(address)
    except Exception:
        return None
    if resolved is None:
        return None
    if address not in (None, "auto"):
        source = f"address={address!r}"
    elif env is not None and env != "auto":
        source = f"RAY_ADDRESS={env}"
    else:
        source = get_ray_address_file(None)
    return resolved, source


def answers(address: str, timeout_s: float) -> bool:
    """True if `host:port` accepts a TCP connection within `timeout_s`."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _skip_dead_cluster(kwargs: dict) -> None:
    """Start a local Ray instead of joining a stale `ray start` address; fail in one line for an
    address the user named that does not answer."""
    found = cluster_address(kwargs.get("address"))
    if found is None:
        return
    address, source = found
    timeout_s = DEFAULTS.runtime.cluster_answer_s
    if answers(address, timeout_s):
        return
    if os.path.isabs(source):  # the address file of an earlier `ray start`
        log(
            f"ray: ignoring {source}: the cluster it names ({address}) does not answer; starting a local "
            "Ray (delete that file, or run `ray stop`, to clear it)"
        )
        kwargs["address"] = "local"
        return
    raise ImgsimError(
        f"no Ray cluster answers at {address} (from {source}) within {timeout_s:g} s: start it, or "
        "set RAY_ADDRESS=local (or unset it) to run on a local Ray"
    )


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
    _skip_dead_cluster(kwargs)
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
