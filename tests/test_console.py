"""The console a user sees: progress only, Ray's own logs kept in RUN/logs/.

The real `imgsim` command runs in a subprocess, once with its output in a pipe (as CI captures it)
and once on a pseudo-terminal: no Ray internals reach stdout/stderr by default, every stage's
progress reaches 100 %, and Ray's driver and worker logs are under RUN/logs/. With `--verbose`
Ray's logs appear live, and a failing job's last line names where they are.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from conftest import write_pattern_folder

from imgsim.console import output as console
from imgsim.console.progress import Progress

IMGSIM = [sys.executable, "-m", "imgsim.cli"]
TINY = ["--image-size", "16", "--dim", "8", "--batch-size", "8"]

#: What Ray prints by itself when nobody tells it otherwise (the lines that cluttered the console before), as patterns.
RAY_INTERNALS = re.compile(
    r"Execution plan|streaming_executor|Checkpoint successfully created|TrainingReport\(|core_worker"
    r"|does not have any available CPUs|[Dd]eprecat|Token authentication|\(\w+ pid=\d+\)"
    r"|^\d{4}-\d\d-\d\d[ T][\d:,.]+\s+(INFO|WARNING|ERROR)|\b(INFO|WARNING) \w+\.py:\d+ --",
    re.MULTILINE,
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", console.LOG_ENV, "RAY_ADDRESS")}
    return {**env, "PYTHONUNBUFFERED": "1"}


def run_piped(*argv: str, timeout_s: float = 400) -> subprocess.CompletedProcess[str]:
    """The command with stdout and stderr in one pipe, as CI (or `ray job submit`) captures it."""
    return subprocess.run(
        [*IMGSIM, *argv],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout_s,
    )


def run_on_terminal(*argv: str, timeout_s: float = 400) -> tuple[int, str]:
    """The command on a pseudo-terminal (100 columns): (exit status, everything it wrote)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    proc = subprocess.Popen([*IMGSIM, *argv], env=_env(), stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    out, deadline = b"", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the command ended
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    else:
        proc.kill()
    os.close(leader)
    return proc.wait(timeout=60), out.decode("utf-8", errors="replace")


def assert_quiet(output: str) -> None:
    found = RAY_INTERNALS.findall(output)
    assert not found, f"Ray internals on the console: {found}\n{output}"


def logs_of(run: Path, command: str) -> Path:
    """The newest log folder of `command` in `run`."""
    return sorted((run / "logs").glob(f"{command}-*"))[-1]


# -- the console, without Ray ----------------------------------------------------------------------
def test_plain_progress_prints_sparse_lines_and_a_summary_at_100_percent(capsys) -> None:
    with Progress(4, "embed", "images", interval_s=0.0) as p:
        for _ in range(4):
            p.update(1)
        p.note("read 0.1 s")
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("embed: 4/4 images (100%) in ") and lines[-1].endswith("read 0.1 s")
    assert any("ETA" in line for line in lines[:-1]) and len(lines) <= 5


def test_run_logs_keep_stderr_out_of_the_console_and_show_it_live_when_verbose(tmp_path: Path) -> None:
    script = (
        "import os, sys; from imgsim.console import output as console; from imgsim.console.progress import log\n"
        "with console.RunLogs(sys.argv[1], show_live=sys.argv[2] == 'live'):\n"
        "    os.write(2, b'raylet says hello\\n'); print('a warning', file=sys.stderr); log('progress')\n"
        "print('result')\n"
    )
    for mode in ("quiet", "live"):
        folder = tmp_path / mode
        done = subprocess.run(
            [sys.executable, "-c", script, str(folder), mode], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == "result\n"
        assert "progress" in done.stderr
        assert ("raylet says hello" in done.stderr) == (mode == "live")
        assert ("a warning" in done.stderr) == (mode == "live")
        kept = (folder / console.DRIVER_LOG).read_text()
        assert "raylet says hello" in kept and "a warning" in kept and "progress" not in kept


# -- the real command, with Ray --------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pattern_folder(tmp_path_factory.mktemp("console") / "data", per_class=6)


@pytest.fixture(scope="module")
def trained(data: Path) -> tuple[Path, str]:
    """(run, console output) of `imgsim train` with its output in a pipe."""
    run = data.parent / "run"
    done = run_piped("train", str(data), "--out", str(run), "--epochs", "1", *TINY)
    assert done.returncode == 0, done.stdout
    return run, done.stdout


def test_train_in_a_pipe_shows_progress_only_and_keeps_rays_logs(trained: tuple[Path, str]) -> None:
    run, output = trained
    assert_quiet(output)
    assert re.search(r"^train: \d+/\d+ steps \(100%\)", output, re.MULTILINE), output
    assert re.search(r"^decode: 24/24 images \(100%\)", output, re.MULTILINE), output
    assert "\r" not in output  # plain lines, no bars
    assert len(output.splitlines()) <= 15
    logs = logs_of(run, "train")
    assert f"Ray's logs: {logs}" in output
    assert (logs / console.DRIVER_LOG).is_file()
    ray_logs = logs / console.RAY_LOGS
    assert ray_logs.is_dir() and not ray_logs.is_symlink()  # a copy: it outlives Ray's temp dir
    assert list(ray_logs.glob("raylet.*")) and list(ray_logs.glob("worker-*.err"))
    workers = "".join(p.read_text(errors="replace") for p in ray_logs.glob("worker-*"))
    assert "[train] epoch 1/1 done" in workers  # the train worker's own output, kept in its log


def test_index_on_a_terminal_draws_bars_that_reach_100_percent(trained: tuple[Path, str], data: Path) -> None:
    run, _ = trained
    code, output = run_on_terminal("index", str(data), "--model", str(run))
    assert code == 0, output
    assert_quiet(output)
    assert "\r" in output and "█" in output  # live bars
    for stage in ("embed: 24/24 images", "KMeans: 24/24 embeddings", "KNN: 24/24 embeddings"):
        assert f"{stage} (100%)" in output, output
    # 24 images are embedded in this process (pipelines.build_index._in_process): no Ray was started,
    # so there are no Ray session logs to keep (the train fixture's run checks that they are kept)
    assert not (logs_of(run, "index") / console.RAY_LOGS).exists()


def test_a_failing_job_with_verbose_shows_rays_logs_live_and_names_them_last(
    trained: tuple[Path, str], tmp_path: Path
) -> None:
    run, _ = trained
    bad = tmp_path / "bad"
    (bad / "cls").mkdir(parents=True)
    for i in range(3):
        (bad / "cls" / f"{i}.png").write_bytes(b"not an image at all")
    # --gpu always runs the Ray Data job (a few images would otherwise be embedded in process, without
    # Ray); on this machine without a GPU it says so in one line and runs on the CPU
    done = run_piped("index", str(bad), "--model", str(run), "--verbose", "--gpu")
    assert done.returncode == 1, done.stdout
    assert RAY_INTERNALS.search(done.stdout), done.stdout  # Ray's own lines, shown live
    last = done.stdout.strip().splitlines()[-1]
    logs = logs_of(run, "index")
    assert last.startswith("imgsim: error: none of the 3 files") and last.endswith(f"Ray's logs: {logs}"), (
        last
    )
    assert "Execution plan" in (logs / console.DRIVER_LOG).read_text()


def test_gpu_asked_of_a_local_ray_without_one_falls_back_to_cpu_in_one_line(ray_session, capsys) -> None:
    import ray

    from pipelines.runtime import gpu_or_cpu

    if ray.cluster_resources().get("GPU"):
        pytest.skip("this machine's Ray has a GPU")
    assert gpu_or_cpu(True, "embedding") is False
    assert capsys.readouterr().err == "--gpu: this machine's Ray has no GPU, so embedding runs on the CPU\n"
    assert gpu_or_cpu(False, "embedding") is False
