"""Process and checkpoint helpers shared by the fault benchmarks (`bench/faults.py`) and the tests
that inject the same faults from outside (tests/test_train.py, test_build_index.py, test_serve.py).

Nothing here imports imgsim: a fault is injected and observed the way a user's machine would see it
(a process killed by PID, a port taken, a checkpoint file on disk).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def descendants(pid: int | None = None) -> list[Any]:
    """psutil.Process objects of every process started, directly or not, by `pid` (default: this one)."""
    import psutil

    try:
        return psutil.Process(pid or os.getpid()).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def ray_processes(name: str, pid: int | None = None) -> list[Any]:
    """Ray worker processes below `pid` (default: this one) whose title starts "ray::<name>" (Ray sets
    it to "ray::<Actor>...")."""
    import psutil

    found = []
    for p in descendants(pid):
        with contextlib.suppress(psutil.Error):
            if any(part.startswith(f"ray::{name}") for part in p.cmdline()[:1]):
                found.append(p)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` first (the fault), then everything it had started (clean-up)."""
    import psutil

    rest = descendants(pid)
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).kill()
    for p in rest:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(rest, timeout=30)


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    """Poll `condition()` until it returns something truthy; that value, or TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"{what} did not happen in {timeout_s} s")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def latest_checkpoint(run: Path) -> dict | None:
    """The state in the checkpoint Ray Train has registered last (the one a restart resumes from, as
    its checkpoint_manager_snapshot.json records), or None before the first."""
    import torch

    for snapshot in run.glob("checkpoints/train-*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
            return torch.load(
                snapshot.parent / latest / "checkpoint.pt", map_location="cpu", weights_only=False
            )
        except (OSError, ValueError, KeyError, TypeError, RuntimeError):  # being written or rotated
            continue
    return None
