"""Where imgsim's output goes: results on stdout, progress and notices on the console, Ray's own
output in the run's log folder.

- The **console** is the stderr the user started imgsim with (`stream()`): progress bars, stage
  lines and one-line notices (`imgsim.progress`). stdout carries results only (`--json`).
- **Verbosity**: `-v/--verbose` or `IMGSIM_LOG=debug` (`verbose()`) shows Ray's driver and worker
  logs live on the console as well.
- **RunLogs(folder)**: while a command that runs Ray jobs is running, this process's stderr (file
  descriptor 2, so Python warnings, Ray's Python loggers and its C++ core worker alike) goes to
  `folder/driver.log`, and the console stays reachable through `stream()`. When Ray starts
  (`ray_started()`, called by whoever calls `ray.init`) the Ray session's log folder is linked as
  `folder/ray`, and replaced by a copy when the command ends; joining a running cluster,
  `folder/cluster.txt` says where the cluster keeps its workers' logs instead.

Ray is imported lazily and only once it is initialised: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

LOG_ENV = "IMGSIM_LOG"  # "debug" (or "verbose") shows Ray's logs live
_DEBUG_VALUES = ("debug", "verbose", "1", "true")
DRIVER_LOG = "driver.log"
RAY_LOGS = "ray"
CLUSTER_NOTE = "cluster.txt"

_ACCESS_LOG = re.compile(r"\b(GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS) /\S* [1-5][0-9][0-9]\b")

_console: IO[str] | None = None  # the user's stderr while stderr goes to a log file
_active: RunLogs | None = None


def verbose() -> bool:
    """True when Ray's own logs should be shown live (`-v/--verbose`, or IMGSIM_LOG=debug)."""
    return os.environ.get(LOG_ENV, "").strip().lower() in _DEBUG_VALUES


def set_verbose(on: bool = True) -> None:
    """Turn live Ray logs on or off for this process (and the processes it starts)."""
    if on:
        os.environ[LOG_ENV] = "debug"
    elif verbose():
        os.environ.pop(LOG_ENV, None)


def stream() -> IO[str]:
    """The console: the user's stderr, even while this process's stderr goes to a log file."""
    return _console if _console is not None else sys.stderr


def is_terminal() -> bool:
    """True when the console is an interactive terminal (live bars), False for a pipe, file or CI."""
    try:
        return stream().isatty()
    except (AttributeError, ValueError, OSError):
        return False


def is_access_log_line(line: str) -> bool:
    """True for a Ray Serve access-log line ("GET /healthz 200 1.2ms")."""
    return bool(_ACCESS_LOG.search(line))


def active_logs() -> RunLogs | None:
    """The RunLogs of the command running now, if any."""
    return _active


def ray_started() -> None:
    """Tell the active RunLogs (if any) that this process has just initialised Ray."""
    if _active is not None:
        _active.attach_ray()


class _Follower(threading.Thread):
    """Copies what is appended to a file onto the console as it arrives (`--verbose`); with
    `only`, just the lines it accepts."""

    def __init__(self, path: Path, out: IO[str], only: Callable[[str], bool] | None = None) -> None:
        super().__init__(name="imgsim-log-follower", daemon=True)
        self.path, self.out, self.only = path, out, only
        self.stopping = threading.Event()

    def run(self) -> None:
        pending = b""
        with open(self.path, "rb") as f:
            while True:
                stopping = self.stopping.is_set()
                data = f.read()
                if not data:
                    if stopping:
                        return
                    time.sleep(0.1)
                elif self.only is None:
                    self._show(data)
                else:
                    *lines, pending = (pending + data).split(b"\n")
                    for line in lines:
                        if self.only(line.decode("utf-8", errors="replace")):
                            self._show(line + b"\n")

    def _show(self, data: bytes) -> None:
        self.out.write(data.decode("utf-8", errors="replace"))
        self.out.flush()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)


class RunLogs:
    """Ray's driver and worker logs of one command, kept in `folder` (see the module docstring).

    Use as a context manager around the command. Only one is active at a time; it does nothing
    to stderr when stderr has no file descriptor (an embedding host that replaced sys.stderr).
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        show_live: bool | None = None,
        live_filter: Callable[[str], bool] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.show_live = verbose() if show_live is None else show_live
        self.live_filter = live_filter
        self.session_logs: Path | None = None  # the Ray session's log folder, once Ray started
        self.local_ray = False  # Ray was started by this process (not a cluster it joined)
        self.ray_attached = False  # this process initialised Ray while these logs were active
        self._saved_fd: int | None = None
        self._follower: _Follower | None = None

    @property
    def driver_log(self) -> Path:
        return self.folder / DRIVER_LOG

    @property
    def ray_logs(self) -> Path:
        return self.folder / RAY_LOGS

    def __enter__(self) -> RunLogs:
        global _active, _console
        if _active is not None:
            raise RuntimeError("RunLogs is already active")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.driver_log.touch()
        try:
            fd = sys.stderr.fileno()
        except (AttributeError, ValueError, OSError):
            fd = None
        if fd == 2:
            sys.stderr.flush()
            self._saved_fd = os.dup(2)
            _console = open(  # noqa: SIM115 -- closed in __exit__
                self._saved_fd,
                "w",
                buffering=1,
                encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                errors="replace",
                closefd=False,
            )
            log_fd = os.open(self.driver_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log_fd, 2)
            os.close(log_fd)
            if self.show_live:
                self._follower = _Follower(self.driver_log, _console, self.live_filter)
                self._follower.start()
        _active = self
        return self

    def attach_ray(self) -> None:
        """Ray was just initialised by this process: link (local) or describe (cluster) its logs."""
        self.ray_attached = True
        node = _ray_node()
        if node is None:
            return
        try:
            self.session_logs = Path(node.get_logs_dir_path())
        except Exception:  # a Ray without this private API: the driver log is all we keep
            return
        self.local_ray = bool(getattr(node, "head", False))
        if self.local_ray:
            _replace_with_link(self.ray_logs, self.session_logs)
        else:
            self._write_cluster_note()

    def _write_cluster_note(self) -> None:
        import ray

        job = ray.get_runtime_context().get_job_id()
        note = (
            f"This command ran as Ray job {job} on a cluster it joined ({os.environ.get('RAY_ADDRESS', 'auto')}).\n"
            f"{DRIVER_LOG} beside this file is the driver's output. The workers' logs stay on the cluster: on\n"
            f"each node under {self.session_logs} (worker-*-{job}-*.out/.err), also shown by the\n"
            "Ray dashboard and `ray logs` (e.g. `ray logs cluster` lists them).\n"
        )
        (self.folder / CLUSTER_NOTE).write_text(note)

    def __exit__(self, *exc: Any) -> None:
        global _active, _console
        try:
            self._shutdown_ray()
        finally:
            sys.stderr.flush()
            if self._saved_fd is not None:
                os.dup2(self._saved_fd, 2)
            if self._follower is not None:
                self._follower.stop()
            if _console is not None:
                _console.flush()
                _console.close()
            if self._saved_fd is not None:
                os.close(self._saved_fd)
            _console, _active, self._saved_fd = None, None, None

    def _shutdown_ray(self) -> None:
        """Disconnect from Ray (stopping a local Ray), then keep a copy of a local session's logs."""
        if not self.ray_attached:
            return
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self.local_ray and self.session_logs is not None and self.session_logs.is_dir():
            copy = self.folder / f".{RAY_LOGS}-copying"
            shutil.rmtree(copy, ignore_errors=True)
            with contextlib.suppress(shutil.Error):  # a file that vanished while copying: keep the rest
                shutil.copytree(self.session_logs, copy, symlinks=True, ignore_dangling_symlinks=True)
            if self.ray_logs.is_symlink() or self.ray_logs.is_file():
                self.ray_logs.unlink()
            shutil.rmtree(self.ray_logs, ignore_errors=True)
            os.replace(copy, self.ray_logs)

    def where(self) -> str:
        """The folder to name in a failure's last line."""
        return str(self.folder)

    def used(self) -> bool:
        """True when there is something to look at: Ray ran, or the driver wrote to its log."""
        try:
            return self.ray_attached or self.driver_log.stat().st_size > 0
        except OSError:
            return False


def _ray_node() -> Any:
    """Ray's node object of this process (private API), or None when Ray is not initialised."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        return ray._private.worker._global_node
    except AttributeError:
        return None


def _replace_with_link(link: Path, target: Path) -> None:
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link, ignore_errors=True)
    with contextlib.suppress(OSError):  # a file system without symbolic links: the copy at the end will do
        link.symlink_to(target, target_is_directory=True)


def log_folder(root: str | os.PathLike[str], command: str) -> Path:
    """A new folder `root/<command>-<date>-<time>` for one command's logs (`root` is RUN/logs)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = Path(root) / f"{command}-{stamp}"
    n = 1
    while folder.exists():
        n += 1
        folder = Path(root) / f"{command}-{stamp}-{n}"
    return folder
