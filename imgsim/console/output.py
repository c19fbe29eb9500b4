"""Where imgsim's output goes: results on stdout, progress and notices on the console, Ray's own
output in the run's log folder.

- The **console** is the stderr the user started imgsim with (`stream()`): progress bars, stage
  lines and one-line notices (`imgsim.console.progress`). stdout carries results only (`--json`).
- **Verbosity**: `-v/--verbose` or `IMGSIM_LOG=debug` (`verbose()`) shows Ray's driver and worker
  logs live on the console as well.
- **RunLogs(folder)**: while a command that runs Ray jobs is running, this process's stderr (file
  descriptor 2, so Python warnings, Ray's Python loggers and its C++ core worker alike) goes to
  `folder/driver.log`, and the console stays reachable through `stream()`; so does what Ray's own
  threads print to stdout (stdout otherwise stays the user's: results). When Ray starts
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

_ACCESS_LOG = re.compile(
    r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)[,.]\d+ .* -- ((?:GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS) /\S* [1-5]\d\d .*)$"
)
SERVE_REPLICA_LOGS = "serve/replica_*.log"  # inside a Ray session's log folder

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


def access_log_line(line: str) -> str | None:
    """A Ray Serve replica's access-log line as "<time> POST /search 200 18.9ms"; None for others."""
    m = _ACCESS_LOG.search(line.strip())
    return f"{m.group(1)} {m.group(2)}" if m else None


def active_logs() -> RunLogs | None:
    """The RunLogs of the command running now, if any."""
    return _active


def ray_started() -> None:
    """Tell the active RunLogs (if any) that this process has just initialised Ray."""
    if _active is not None:
        _active.attach_ray()


class _Follower(threading.Thread):
    """Copies what is appended to some files onto the console as it arrives. `files()` is asked
    again at every poll (new files are followed from their start); with `transform`, only the
    lines it turns into text are shown (`--access-log`), else everything as it is (`--verbose`)."""

    def __init__(
        self,
        files: Callable[[], list[Path]],
        out: IO[str],
        transform: Callable[[str], str | None] | None = None,
    ) -> None:
        super().__init__(name="imgsim-log-follower", daemon=True)
        self.files, self.out, self.transform = files, out, transform
        self.stopping = threading.Event()
        self.offsets: dict[Path, int] = {}
        self.pending: dict[Path, bytes] = {}

    def run(self) -> None:
        while True:
            stopping = self.stopping.is_set()
            if not any([self._read(path) for path in self.files()]):
                if stopping:
                    return
                time.sleep(0.1)

    def _read(self, path: Path) -> bool:
        try:
            with open(path, "rb") as f:
                f.seek(self.offsets.get(path, 0))
                data = f.read()
        except OSError:  # not there yet, or gone
            return False
        if not data:
            return False
        self.offsets[path] = self.offsets.get(path, 0) + len(data)
        if self.transform is None:
            self._show(data.decode("utf-8", errors="replace"))
            return True
        *lines, self.pending[path] = (self.pending.get(path, b"") + data).split(b"\n")
        for line in lines:
            text = self.transform(line.decode("utf-8", errors="replace"))
            if text is not None:
                self._show(text + "\n")
        return True

    def _show(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)


class _RayThreadsToLog:
    """`sys.stdout` while RunLogs is active: what Ray's own threads print there (names "ray_...":
    forwarded worker output, the raylet's error messages, which Ray prints to stdout whatever
    `log_to_driver` says) goes to the log; everything else to the real stdout, which keeps
    results (`--json`) clean."""

    def __init__(self, real: IO[str], log: IO[str]) -> None:
        self.real, self.log = real, log

    def _target(self) -> IO[str]:
        return self.log if threading.current_thread().name.startswith("ray_") else self.real

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self.real.flush()
        self.log.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class RunLogs:
    """Ray's driver and worker logs of one command, kept in `folder` (see the module docstring).

    Use as a context manager around the command. Only one is active at a time; it does nothing
    to stderr when stderr has no file descriptor (an embedding host that replaced sys.stderr).
    """

    def __init__(
        self, folder: str | os.PathLike[str], show_live: bool | None = None, access_log: bool = False
    ) -> None:
        self.folder = Path(folder)
        self.show_live = verbose() if show_live is None else show_live
        self.access_log = access_log and not self.show_live  # verbose shows them anyway
        self.session_logs: Path | None = None  # the Ray session's log folder, once Ray started
        self.local_ray = False  # Ray was started by this process (not a cluster it joined)
        self.ray_attached = False  # this process initialised Ray while these logs were active
        self._saved_fd: int | None = None
        self._real_stdout: IO[str] | None = None
        self._followers: list[_Follower] = []

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
            self._real_stdout = sys.stdout
            sys.stdout = _RayThreadsToLog(sys.stdout, sys.stderr)  # type: ignore[assignment]
            if self.show_live:
                self._follow(lambda: [self.driver_log])
        _active = self
        return self

    def _follow(self, files: Callable[[], list[Path]], transform: Any = None) -> None:
        if _console is not None:
            follower = _Follower(files, _console, transform)
            follower.start()
            self._followers.append(follower)

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
            if self.access_log:
                session = self.session_logs
                self._follow(lambda: sorted(session.glob(SERVE_REPLICA_LOGS)), access_log_line)
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
            if self._real_stdout is not None and isinstance(sys.stdout, _RayThreadsToLog):
                sys.stdout = self._real_stdout
            if self._saved_fd is not None:
                os.dup2(self._saved_fd, 2)
            for follower in self._followers:
                follower.stop()
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
