"""The GPU check: imgsim's `--gpu` path end to end on one GPU machine, with figures, in one command.

Drives the real CLI (`python -m imgsim.cli ...`) in subprocesses, so it keeps working while the
internals move, and writes one JSON report plus a log into `--out`:

    python -m bench.gpu_check --device cuda --out OUT         # on the GPU machine (bench/gpu_check.sh)
    python -m bench.gpu_check --device cpu --quick --out OUT  # here: the same stages on ~4,000 images

Stages, in priority order (a stage that no longer fits the time budget is skipped, with a reason):

    dataset            Fashion-MNIST as PNGs (`imgsim dataset`), or `--data` as given
    probe_kernels      the training step on synthetic batches already on the device: kernels alone,
                       with train.py's per-step host syncs, with a host-to-device copy per step,
                       and on 2 CPU threads (a 2-core figure on any machine)
    train_gpu          `imgsim train --gpu`, 1 worker, the default model and batch
    index_gpu          `imgsim index --gpu --concurrency 1` (one embedding actor on the GPU)
    eval               `imgsim eval --queries DATA/test`: P@1, P@10, mAP@10
    probe_shared_gpu   two processes on the one GPU: NCCL (refuses two ranks per GPU) and gloo
    train_gpu_shared   `imgsim train --gpu --workers 2`, each worker 0.5 GPU, DDP over gloo
    train_cpu          `imgsim train` on the machine's CPUs, 1 epoch (the baseline)
    index_cpu          `imgsim index` on the machine's CPUs
    train_gpu_large_batch  as train_gpu with a larger batch (per-step overhead vs GPU work)
    train_photo        the larger photo model (`--arch`, when it exists); without `--arch`, the
                       default model at 96x96 RGB as a stand-in for a heavier input

GPU utilisation and memory are sampled twice a second (NVML, else `nvidia-smi`), CPU utilisation
from /proc/stat; each stage reports them over its own window (training: over its epochs). With
`--device cpu` every stage runs on the CPU, so the report has the same fields (GPU ones null).
The probes and the shared-GPU training shim are in bench/gpu_probes.py; docs/cluster.md ("The GPU
check") has the device call, what travels, and what the report holds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCHEMA = 1

#: The 2-core CPU rate the ">= 20x" target is measured against: Ray Train, 1 worker, default model
#: and batch, `make demo` on the development machine (2 cores), docs/scaling.md, 2026-11-26.
REFERENCE_2CORE_TRAIN_IMG_S = 1700.0
TARGET_TRAIN_SPEEDUP = 20.0
TARGET_PHOTO_GPU_UTIL = 70.0

#: The sources whose hash says whether a carried imgsim wheel is this tree's code.
SOURCE_GLOBS = ("imgsim/**/*.py", "pipelines/**/*.py", "serve/**/*.py", "serve/static/*", "serve/config.yaml")

#: Both ranks of the shared-GPU stages are on this machine: gloo over the loopback interface, so that
#: it does not depend on how the machine's host name resolves.
LOOPBACK_GLOO = {"GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}

#: The train workers' own lines (in their logs; on the console with `--verbose`, which the check passes).
EPOCH_LINE = re.compile(r"\[train\] epoch (\d+)/(\d+) (step|done)")
#: The embedding stage's summary line (imgsim.console.progress): images, time, images per second.
EMBED_SUMMARY = re.compile(r"embed: ([\d,]+)/[\d,]+ images \(100%\) in ([^,]+), ([\d,.]+) images/s")
#: Every imgsim command of the check shows Ray's logs live (the check's log keeps them all).
VERBOSE = "--verbose"


def source_hash(root: Path = REPO) -> str:
    """sha256 over imgsim's package sources (path and bytes), as `bench/gpu_wheels.sh` records it."""
    h = hashlib.sha256()
    files = sorted({p for pattern in SOURCE_GLOBS for p in root.glob(pattern) if p.is_file()})
    for p in files:
        if "__pycache__" in p.parts:
            continue
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


# -- sampling ------------------------------------------------------------------------------------


class Sampler:
    """GPU utilisation and memory of GPU 0 (NVML through pynvml, else an `nvidia-smi` loop) and CPU
    utilisation (/proc/stat), every `interval_s`, from threads of the check's own process."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.gpu: list[tuple[float, float, float]] = []  # (time, util %, memory used MiB)
        self.cpu: list[tuple[float, float]] = []  # (time, busy % of all cores)
        self.gpu_source: str | None = None
        self._stop = threading.Event()
        self._smi: subprocess.Popen | None = None
        self._threads: list[threading.Thread] = []

    def start(self, gpu: bool) -> None:
        if gpu:
            try:
                import pynvml  # nvidia-ml-py: on the GPU machine's image

                pynvml.nvmlInit()
                handle = pynvml.nvmlDeviceGetHandleByIndex(0)
                self.gpu_source = "pynvml"
                self._threads.append(
                    threading.Thread(target=self._read_nvml, args=(pynvml, handle), daemon=True)
                )
            except Exception:
                if shutil.which("nvidia-smi"):
                    self.gpu_source = "nvidia-smi"
                    self._smi = subprocess.Popen(
                        ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                         f"--loop-ms={int(self.interval_s * 1000)}"],
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                    )  # fmt: skip
                    self._threads.append(threading.Thread(target=self._read_smi, daemon=True))
        if Path("/proc/stat").is_file():
            self._threads.append(threading.Thread(target=self._read_cpu, daemon=True))
        for t in self._threads:
            t.start()

    def _read_nvml(self, pynvml: Any, handle: Any) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
            except Exception:
                continue
            self.gpu.append((time.time(), float(util), float(mem)))

    def _read_smi(self) -> None:
        assert self._smi and self._smi.stdout
        for line in self._smi.stdout:
            try:
                util, mem = (float(v) for v in line.strip().split(",")[:2])
            except ValueError:
                continue
            self.gpu.append((time.time(), util, mem))

    def _read_cpu(self) -> None:
        def snapshot() -> tuple[int, int]:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
            return sum(fields), idle

        last = snapshot()
        while not self._stop.wait(self.interval_s):
            now = snapshot()
            total, idle = now[0] - last[0], now[1] - last[1]
            if total > 0:
                self.cpu.append((time.time(), 100.0 * (total - idle) / total))
            last = now

    def stop(self) -> None:
        self._stop.set()
        if self._smi:
            self._smi.terminate()
            try:
                self._smi.wait(5)
            except subprocess.TimeoutExpired:
                self._smi.kill()

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """Utilisation and memory between t0 and t1 (None where nothing was sampled)."""
        gpu = [s for s in self.gpu if t0 <= s[0] <= t1]
        cpu = [s for s in self.cpu if t0 <= s[0] <= t1]
        utils = sorted(s[1] for s in gpu)
        return {
            "seconds": round(t1 - t0, 1),
            "gpu_samples": len(gpu),
            "gpu_util_mean": _round(sum(utils) / len(utils)) if utils else None,
            "gpu_util_p50": _round(utils[len(utils) // 2]) if utils else None,
            "gpu_util_max": _round(utils[-1]) if utils else None,
            "gpu_mem_used_max_mib": _round(max(s[2] for s in gpu)) if gpu else None,
            "cpu_util_mean": _round(sum(s[1] for s in cpu) / len(cpu)) if cpu else None,
        }

    def write_csv(self, path: Path) -> None:
        lines = ["time,gpu_util,gpu_mem_mib"] + [f"{t:.2f},{u:.0f},{m:.0f}" for t, u, m in self.gpu]
        _atomic_write(path, "\n".join(lines) + "\n")


def _round(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(float(x), nd)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- running commands ----------------------------------------------------------------------------


class Log:
    """The check's log: every subprocess line, timestamped, under a header per stage."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = path.open("a", buffering=1)
        self._lock = threading.Lock()
        self.t0 = time.time()

    def write(self, line: str, echo: bool = False) -> None:
        with self._lock:
            self._f.write(f"{time.time() - self.t0:8.1f} {line.rstrip()}\n")
        if echo:
            print(line.rstrip(), file=sys.stderr, flush=True)


class Result:
    """A finished command: exit code, stdout lines, every line with the time it arrived."""

    def __init__(self) -> None:
        self.rc: int | None = None
        self.timed_out = False
        self.stdout: list[str] = []
        self.lines: list[tuple[float, str]] = []
        self.t0 = self.t1 = time.time()

    def json(self) -> dict[str, Any] | None:
        """The last stdout line that is a JSON object (`--json` output)."""
        for line in reversed(self.stdout):
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except ValueError:
                    continue
        return None

    def times_of(self, pattern: re.Pattern[str]) -> list[tuple[float, re.Match[str]]]:
        return [(t, m) for t, line in self.lines if (m := pattern.search(line))]

    def tail(self, n: int = 25) -> list[str]:
        return [line for _, line in self.lines[-n:]]


def run_command(cmd: Sequence[str], log: Log, timeout_s: float, cwd: Path, env: dict[str, str]) -> Result:
    """Run `cmd` in its own process group; log both streams; kill the whole group on time-out."""
    res = Result()
    log.write("$ " + shlex.join(cmd), echo=True)
    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )

    def pump(stream: Any, keep: list[str] | None) -> None:
        for line in stream:
            res.lines.append((time.time(), line.rstrip("\n")))
            log.write(line)
            if keep is not None:
                keep.append(line.rstrip("\n"))

    threads = [
        threading.Thread(target=pump, args=(proc.stdout, res.stdout), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, None), daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        res.rc = proc.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        res.timed_out = True
        _kill_group(proc)
        res.rc = proc.returncode
    except BaseException:  # interrupted or terminated: take the command (and its local Ray) along
        _kill_group(proc)
        raise
    for t in threads:
        t.join(10)
    res.t1 = time.time()
    log.write(
        f"exit {res.rc}{' (timed out)' if res.timed_out else ''} after {res.t1 - res.t0:.1f} s", echo=True
    )
    return res


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM then SIGKILL to the command's own process group (its local Ray included)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


# -- the check -----------------------------------------------------------------------------------


class Check:
    """Plans and runs the stages, keeps the report current on disk after every stage."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cuda = args.device == "cuda"
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = (
            Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="imgsim-gpu-check-"))
        )
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = Log(self.out / "gpu_check.log")
        self.sampler = Sampler()
        self.started = time.time()
        self.deadline = self.started + args.time_limit
        self.data = Path(args.data).resolve() if args.data else self.work / "data"
        self.env = self._env()
        self.report: dict[str, Any] = {
            "schema": SCHEMA,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "finished": None,
            "wall_s": None,
            "complete": False,
            "mode": {
                "device": args.device,
                "quick": args.quick,
                "time_limit_s": args.time_limit,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "large_batch_size": args.large_batch_size,
                "arch": args.arch,
                "photo_args": args.photo_args,
                "train_args": args.train_args,
                "command": shlex.join([sys.executable, "-m", "bench.gpu_check", *sys.argv[1:]]),
            },
            "machine": {},
            "stages": {},
            "summary": {},
        }

    # -- plumbing ---------------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PYTHONUNBUFFERED="1",
            IMGSIM_DEBUG="1",  # full tracebacks in the log when a command fails
            RAY_USAGE_STATS_ENABLED="0",
            RAY_DEDUP_LOGS="0",  # every worker's progress line reaches the log
            TQDM_DISABLE=env.get("TQDM_DISABLE", "1"),
            # as imgsim gives its Ray workers (pipelines/runtime.py), so the probes' CPU figures compare
            OMP_WAIT_POLICY=env.get("OMP_WAIT_POLICY", "PASSIVE"),
        )
        return env

    def remaining(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        self.report["summary"] = summarize(self.report)
        self.report["wall_s"] = round(time.time() - self.started, 1)
        _atomic_write(self.out / "gpu_check.json", json.dumps(self.report, indent=2, default=str) + "\n")

    def imgsim(self, *args: str) -> list[str]:
        """The CLI as a module of whichever imgsim this Python imports (an installed wheel, or the tree)."""
        return [sys.executable, "-m", "imgsim.cli", *args]

    def helper(self, *args: str) -> list[str]:
        """bench/gpu_probes.py as a script (the probes, the shared-GPU training shim)."""
        return [sys.executable, str(HERE / "gpu_probes.py"), *args]

    def run(
        self, stage: str, cmd: Sequence[str], timeout_s: float, env: dict[str, str] | None = None
    ) -> Result:
        """Run one command of a stage; `timeout_s` is for the GPU machine (x3 in quick mode, which
        runs on small shared machines where one command can take minutes)."""
        timeout_s *= 3 if self.args.quick else 1
        self.log.write(f"==== {stage} ====", echo=True)
        # cwd outside the repository: the commands import imgsim as installed (PYTHONPATH/site-packages)
        return run_command(
            cmd, self.log, min(timeout_s, max(5.0, self.remaining())), self.work, {**self.env, **(env or {})}
        )

    def stage_record(self, res: Result, window: tuple[float, float] | None = None) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "status": "ok" if res.rc == 0 else ("timed out" if res.timed_out else "failed"),
            "wall_s": round(res.t1 - res.t0, 1),
            "util": self.sampler.window(res.t0, res.t1),
        }
        if window:
            rec["util_window"] = self.sampler.window(*window)
        if res.rc != 0:
            rec["error_tail"] = res.tail()
        return rec

    # -- stages -----------------------------------------------------------------------------------

    def stage_dataset(self) -> dict[str, Any]:
        if self.args.data:
            return {"status": "ok", "source": str(self.data), "written": False, **_count_images(self.data)}
        limit = ["--limit", str(self.args.limit)] if self.args.limit else []
        res = self.run("dataset", self.imgsim("dataset", "fashion-mnist", str(self.data), *limit), 300)
        return {
            **self.stage_record(res),
            "source": str(self.data),
            "written": True,
            **_count_images(self.data),
        }

    def stage_probe_kernels(self) -> dict[str, Any]:
        configs = [{"name": "default", "batch_size": self.args.batch_size}]
        if not self.args.quick:  # quick: the default and the photo config are enough to prove the probe
            configs.append({"name": "large_batch", "batch_size": self.args.large_batch_size})
        configs.append(self._photo_probe_config())
        cmd = self.helper(
            "kernels", "--device", self.args.device, "--configs", json.dumps(configs),
            "--seconds", str(1.0 if self.args.quick else 4.0),
        )  # fmt: skip
        res = self.run("probe_kernels", cmd, 240)
        return {**self.stage_record(res), **(res.json() or {})}

    def _photo_probe_config(self) -> dict[str, Any]:
        if self.args.arch:
            return {"name": "photo", "arch": self.args.arch, "batch_size": self.args.photo_batch_size,
                    "image_size": self.args.photo_image_size, "channels": 3}  # fmt: skip
        return {"name": "large_input", "batch_size": self.args.photo_batch_size,
                "image_size": self.args.photo_image_size, "channels": 3}  # fmt: skip

    def train(
        self,
        stage: str,
        run: str,
        *,
        gpu: bool,
        workers: int = 1,
        batch_size: int,
        epochs: int,
        extra: Sequence[str] = (),
        shared_gpu: float | None = None,
        timeout_s: float = 300,
    ) -> dict[str, Any]:
        args = ["train", str(self.data / "train"), "--out", str(self.work / run), "--epochs", str(epochs),
                "--batch-size", str(batch_size), "--workers", str(workers), "--json", VERBOSE,
                *(["--gpu"] if gpu and self.cuda else []), *shlex.split(self.args.train_args), *extra]  # fmt: skip
        how = "cli"
        if shared_gpu is not None and {"--gpus-per-worker", "--backend"} <= self.train_options():
            cmd = self.imgsim(*args, "--gpus-per-worker", str(shared_gpu), "--backend", "gloo")
        elif shared_gpu is not None:
            # Two workers on one GPU need a fractional GPU each and gloo (NCCL refuses two ranks on
            # one device); `imgsim train` has no option for either yet, so a shim sets them.
            how = "shim (pipelines.train ScalingConfig/TorchTrainer patched: GPU per worker, gloo)"
            cmd = self.helper(
                "train-shim", "--gpus-per-worker", str(shared_gpu), "--backend", "gloo", "--", *args
            )
        else:
            cmd = self.imgsim(*args)
        res = self.run(stage, cmd, timeout_s, env=LOOPBACK_GLOO if shared_gpu is not None else None)
        epochs_seen = res.times_of(EPOCH_LINE)
        window = (epochs_seen[0][0], epochs_seen[-1][0]) if len(epochs_seen) >= 2 else None
        rec = {**self.stage_record(res, window), "device": "cuda" if gpu and self.cuda else "cpu",
               "workers": workers, "batch_size": batch_size, "epochs": epochs, "how": how,
               "extra_args": list(extra)}  # fmt: skip
        if shared_gpu is not None:
            rec.update(gpus_per_worker=shared_gpu if gpu and self.cuda else None, backend="gloo")
        summary = res.json()
        if summary:
            history = summary.get("history") or []
            rec.update(
                images=summary.get("images"),
                final_loss=summary.get("final_loss"),
                train_seconds=summary.get("seconds"),
                history=history,
                images_per_s=_rate(history),
                images_per_s_after_first_epoch=_rate(history[1:]) if len(history) > 1 else None,
                seconds_before_first_epoch=round(epochs_seen[0][0] - res.t0, 1) if epochs_seen else None,
            )
        return rec

    def train_options(self) -> set[str]:
        """The options `imgsim train --help` lists (read once)."""
        if not hasattr(self, "_train_options"):
            res = subprocess.run(
                self.imgsim("train", "--help"), capture_output=True, text=True, env=self.env, cwd=self.work
            )
            self._train_options = set(re.findall(r"--[a-z][a-z-]+", res.stdout))
        return self._train_options

    def stage_train_gpu(self) -> dict[str, Any]:
        return self.train(
            "train_gpu", "run-gpu", gpu=True, batch_size=self.args.batch_size, epochs=self.args.epochs
        )

    def stage_train_gpu_shared(self) -> dict[str, Any]:
        return self.train(
            "train_gpu_shared", "run-gpu-shared", gpu=True, workers=2, batch_size=2 * self.args.batch_size,
            epochs=1 if self.args.quick else max(1, self.args.epochs - 1), shared_gpu=0.5,
        )  # fmt: skip

    def stage_train_cpu(self) -> dict[str, Any]:
        return self.train("train_cpu", "run-cpu", gpu=False, batch_size=self.args.batch_size, epochs=1)

    def stage_train_gpu_large_batch(self) -> dict[str, Any]:
        return self.train(
            "train_gpu_large_batch", "run-gpu-large-batch", gpu=True, batch_size=self.args.large_batch_size,
            epochs=1 if self.args.quick else 2,
        )  # fmt: skip

    def stage_train_photo(self) -> dict[str, Any]:
        extra = ["--image-size", str(self.args.photo_image_size), "--channels", "3"]
        if self.args.arch:
            if "--arch" not in self.train_options():
                return {
                    "status": "skipped",
                    "reason": "`imgsim train` has no --arch yet (the photo model has not landed)",
                }
            extra = ["--arch", self.args.arch, *extra]
        extra += shlex.split(self.args.photo_args)
        rec = self.train("train_photo", "run-photo", gpu=True, batch_size=self.args.photo_batch_size,
                         epochs=1 if self.args.quick else 2, extra=extra, timeout_s=240)  # fmt: skip
        rec["model"] = self.args.arch or "default model at 96x96 RGB (stand-in: no --arch given)"
        return rec

    def index(self, stage: str, run: str, *, gpu: bool) -> dict[str, Any]:
        run_dir = self.work / run
        model_from = "run-gpu"
        if not (run_dir / "model").is_dir():
            # train_gpu's model; if it failed, another stage's; else an untrained one, so that the
            # embedding path (and faiss) is still exercised on the GPU (its P@10 then means nothing)
            trained = [
                self.work / r / "model"
                for r in ("run-gpu", "run-gpu-large-batch", "run-gpu-shared", "run-cpu")
            ]
            found = next((m for m in trained if m.is_dir()), None)
            if found:
                model_from = found.parent.name
                shutil.copytree(found, run_dir / "model")
            else:
                model_from = "untrained (no training stage finished)"
                res = self.run(f"{stage} (untrained model)", self.helper("init-model", str(run_dir)), 120)
                if res.rc != 0:
                    return {**self.stage_record(res), "status": "failed", "model": model_from}
        cpus = os.cpu_count() or 1
        concurrency = 1 if gpu and self.cuda else max(1, min(cpus - 1, 15))
        args = ["index", str(self.data / "train"), "--model", str(run_dir), "--clusters", "10", "--json",
                VERBOSE, "--concurrency", str(concurrency), *(["--gpu"] if gpu and self.cuda else [])]  # fmt: skip
        res = self.run(stage, self.imgsim(*args), 300)
        embed = res.times_of(EMBED_SUMMARY)
        rec = {
            **self.stage_record(res),
            "device": "cuda" if gpu and self.cuda else "cpu",
            "concurrency": concurrency,
            "model": model_from,
        }
        summary = res.json()
        if summary:
            seconds = summary.get("seconds") or 0
            rec.update(
                images=summary.get("images"),
                embedded=summary.get("embedded"),
                index_seconds=seconds,
                images_per_s_end_to_end=round(summary["images"] / seconds, 1) if seconds else None,
                stage_worker_seconds=summary.get("stage_seconds"),
                index_kind=summary.get("index_kind"),
            )
        if embed:
            # imgsim's own figure: images over the embedding job's wall time (after Ray's start)
            rec["embed_job_images_per_s"] = float(embed[-1][1].group(3).replace(",", ""))
        return rec

    def stage_index_gpu(self) -> dict[str, Any]:
        return self.index("index_gpu", "run-gpu", gpu=True)

    def stage_index_cpu(self) -> dict[str, Any]:
        return self.index("index_cpu", "run-cpu-index", gpu=False)

    def stage_eval(self) -> dict[str, Any]:
        run_dir = self.work / "run-gpu"
        if not (run_dir / "index").is_dir():
            return {"status": "skipped", "reason": "no index (index_gpu did not finish)"}
        res = self.run("eval", self.imgsim("eval", "--model", str(run_dir), "--queries", str(self.data / "test"),
                                           "-k", "10", "--json"), 240)  # fmt: skip
        return {**self.stage_record(res), "metrics": res.json()}

    def stage_probe_shared_gpu(self) -> dict[str, Any]:
        cmd = self.helper("shared", "--device", self.args.device)
        res = self.run("probe_shared_gpu", cmd, 120, env=LOOPBACK_GLOO)
        return {**self.stage_record(res), **(res.json() or {})}

    # -- driver -----------------------------------------------------------------------------------

    STAGES: tuple[tuple[str, float, float], ...] = (
        # name, estimated seconds on the GPU machine, in quick mode here (2 cores)
        ("dataset", 40, 30),
        ("probe_kernels", 40, 40),
        ("train_gpu", 75, 60),
        ("index_gpu", 45, 40),
        ("eval", 30, 40),
        ("probe_shared_gpu", 20, 20),
        ("train_gpu_shared", 70, 70),
        ("train_cpu", 45, 50),
        ("index_cpu", 40, 40),
        ("train_gpu_large_batch", 50, 50),
        ("train_photo", 70, 60),
    )

    def machine(self) -> dict[str, Any]:
        res = subprocess.run(
            self.helper("machine", "--device", self.args.device),
            capture_output=True, text=True, env=self.env, cwd=self.work, timeout=120,
        )  # fmt: skip
        self.log.write(res.stderr)
        info: dict[str, Any] = {"hostname": socket.gethostname(), "cpus": os.cpu_count()}
        for line in reversed(res.stdout.splitlines()):
            if line.startswith("{"):
                info.update(json.loads(line))
                break
        else:
            info["error"] = (res.stderr or "no output").strip().splitlines()[-5:]
        wheel_hash = os.environ.get("IMGSIM_WHEEL_SOURCE_HASH")
        info["imgsim_tree_source_hash"] = source_hash()
        info["imgsim_wheel_source_hash"] = wheel_hash
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True, text=True,
            )  # fmt: skip
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        return info

    def main(self) -> int:
        # `timeout` (bench/gpu_check.sh) sends SIGTERM: unwind as for Ctrl-C, so that the running
        # command is killed and the report is written.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        wanted = set(self.args.stages.split(",")) if self.args.stages else None
        self.log.write(f"gpu_check: device {self.args.device}, work {self.work}, out {self.out}", echo=True)
        self.sampler.start(gpu=self.cuda)
        try:
            self.report["machine"] = {**self.machine(), "gpu_sampler": self.sampler.gpu_source}
            self.save()
            if self.cuda and not self.report["machine"].get("cuda_available"):
                # `imgsim train --gpu` would wait for a GPU Ray does not have: stop here instead.
                self.report["error"] = "--device cuda, but torch.cuda.is_available() is False (see machine)"
                self.log.write(self.report["error"], echo=True)
                wanted = set()
            for name, est_gpu, est_quick in self.STAGES:
                if wanted is not None and name not in wanted:
                    continue
                est = est_quick if self.args.quick else est_gpu
                if self.remaining() < est:
                    rec: dict[str, Any] = {
                        "status": "skipped",
                        "reason": f"time budget: {self.remaining():.0f} s left, the stage needs about {est} s",
                    }
                else:
                    try:
                        rec = getattr(self, f"stage_{name}")()
                    except KeyboardInterrupt:  # Ctrl-C or the time limit's SIGTERM: say so, then stop
                        self.report["stages"][name] = {"status": "interrupted"}
                        raise
                    except Exception as e:  # a bug in the check must not lose the other stages
                        rec = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
                self.report["stages"][name] = rec
                self.log.write(f"---- {name}: {rec.get('status')} {rec.get('reason', '')}", echo=True)
                self.save()
        finally:
            self.sampler.stop()
            self.sampler.write_csv(self.out / "gpu_samples.csv")
            self.report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            ran = [s for s in self.report["stages"].values() if s.get("status") != "skipped"]
            self.report["complete"] = (
                bool(ran) and "error" not in self.report and all(s.get("status") == "ok" for s in ran)
            )
            self.save()
            if not self.args.keep_work and not self.args.work:
                shutil.rmtree(self.work, ignore_errors=True)
        print(format_summary(self.report))
        print(f"report: {self.out / 'gpu_check.json'}; log: {self.out / 'gpu_check.log'}")
        return 0 if self.report["complete"] else 1


def _count_images(data: Path) -> dict[str, int]:
    return {f"{split}_images": sum(1 for p in (data / split).rglob("*.png")) for split in ("train", "test")}


def _rate(history: list[dict[str, Any]]) -> float | None:
    seconds = sum(h.get("seconds", 0) for h in history)
    return round(sum(h.get("images", 0) for h in history) / seconds, 1) if seconds else None


# -- the summary: targets and where the time goes -------------------------------------------------


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The figures someone checks first, the targets, and where the training time goes."""
    st = report.get("stages", {})
    mode = report.get("mode", {})

    def get(stage: str, *keys: str) -> Any:
        v: Any = st.get(stage) or {}
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        return v

    probe = {r.get("name"): r for r in (get("probe_kernels", "results") or [])}
    default_probe = probe.get("default") or {}
    train_rate = get("train_gpu", "images_per_s_after_first_epoch") or get("train_gpu", "images_per_s")
    cpu2 = default_probe.get("cpu_2_threads_img_s")
    summary: dict[str, Any] = {
        "device_name": (report.get("machine") or {}).get("cuda_device_name"),
        "train_img_s": {
            "gpu_1_worker": train_rate,
            "gpu_1_worker_large_batch": get("train_gpu_large_batch", "images_per_s_after_first_epoch")
            or get("train_gpu_large_batch", "images_per_s"),
            "gpu_2_workers_shared": get("train_gpu_shared", "images_per_s"),
            "cpu_all_cores": get("train_cpu", "images_per_s"),
            "photo": get("train_photo", "images_per_s"),
            "reference_2core_cpu": REFERENCE_2CORE_TRAIN_IMG_S,
            "probe_kernels_only": default_probe.get("kernels_img_s"),
            "probe_2_cpu_threads": cpu2,
        },
        "gpu_util_train_epochs": get("train_gpu", "util_window", "gpu_util_mean"),
        "gpu_util_photo_epochs": get("train_photo", "util_window", "gpu_util_mean"),
        "index_img_s": {
            "gpu": get("index_gpu", "images_per_s_end_to_end"),
            "gpu_embed_job": get("index_gpu", "embed_job_images_per_s"),
            "cpu": get("index_cpu", "images_per_s_end_to_end"),
            "cpu_embed_job": get("index_cpu", "embed_job_images_per_s"),
        },
        "precision_at_10": get("eval", "metrics", "precision_at_k"),
        "wall_s": {name: rec.get("wall_s") for name, rec in st.items()},
    }
    on_gpu = mode.get("device") == "cuda"
    speedup = train_rate / REFERENCE_2CORE_TRAIN_IMG_S if train_rate else None
    photo_util = summary["gpu_util_photo_epochs"]
    summary["targets"] = {
        "train_speedup_vs_2core_cpu": {
            "value": _round(speedup, 2),
            "target": TARGET_TRAIN_SPEEDUP,
            "met": (speedup >= TARGET_TRAIN_SPEEDUP) if (speedup is not None and on_gpu) else None,
            "against": f"{REFERENCE_2CORE_TRAIN_IMG_S:.0f} img/s (Ray Train, 1 worker, 2 cores, docs/scaling.md)",
            "vs_probe_2_cpu_threads": _round(train_rate / cpu2, 2) if (train_rate and cpu2) else None,
        },
        "photo_gpu_util": {
            "value": photo_util,
            "target": TARGET_PHOTO_GPU_UTIL,
            "met": (photo_util >= TARGET_PHOTO_GPU_UTIL) if (photo_util is not None and on_gpu) else None,
            "model": get("train_photo", "model"),
        },
    }
    summary["where_time_goes"] = where_time_goes(st, probe)
    return summary


def where_time_goes(st: dict[str, Any], probe: dict[str, dict[str, Any]]) -> list[str]:
    """Plain sentences comparing the real loop with the probe's kernels-only rate, per training stage."""
    notes = []
    for stage, name in (
        ("train_gpu", "default"),
        ("train_gpu_large_batch", "large_batch"),
        ("train_photo", None),
    ):
        rec = st.get(stage) or {}
        p = probe.get(name) if name else (probe.get("photo") or probe.get("large_input"))
        rate = rec.get("images_per_s_after_first_epoch") or rec.get("images_per_s")
        if not rate or not p or not p.get("kernels_img_s"):
            continue
        k, synced, h2d = p["kernels_img_s"], p.get("as_train_loop_img_s"), p.get("with_h2d_img_s")
        util = (rec.get("util_window") or {}).get("gpu_util_mean")
        share = rate / k
        text = (
            f"{stage}: {rate:.0f} img/s in the epochs vs {k:.0f} img/s for the same step on synthetic batches "
            f"already in device memory ({share:.0%} of it"
            + (f", GPU busy {util:.0f}% of the time" if util is not None else "")
            + "). "
        )
        if synced:
            text += f"With train.py's two host syncs per step the probe runs {synced:.0f} img/s"
            text += f", with a host-to-device copy per step too {h2d:.0f} img/s. " if h2d else ". "
        if share < 0.7:
            text += (
                "The rest is the input side (Ray Data shard iteration, batch collation, pinned copy) "
                "and the Python loop: the device waits for data."
            )
        else:
            text += "The loop is close to the step's own rate: the computation itself is the limit."
        pre = rec.get("seconds_before_first_epoch")
        if pre is not None:
            text += f" Start-up before the first epoch (Ray, workers, decoding the data once): {pre:.0f} s."
        notes.append(text)
    idx = st.get("index_gpu") or {}
    if idx.get("stage_worker_seconds"):
        s = idx["stage_worker_seconds"]
        notes.append(
            f"index_gpu: worker seconds read {s.get('read')}, decode {s.get('decode')}, encode {s.get('encode')}, "
            f"driver write {s.get('write')}; {idx.get('embed_job_images_per_s')} img/s over the embedding job, "
            f"{idx.get('images_per_s_end_to_end')} img/s end to end."
        )
    return notes


def format_summary(report: dict[str, Any]) -> str:
    """A short table for the end of the output (what the device tool's reply shows)."""
    s = report.get("summary", {})
    lines = [f"gpu_check ({report['mode']['device']}{', quick' if report['mode']['quick'] else ''}) "
             f"on {s.get('device_name') or 'CPU'}: {report.get('wall_s')} s"]  # fmt: skip
    for name, rec in report.get("stages", {}).items():
        rate = rec.get("images_per_s") or rec.get("images_per_s_end_to_end")
        util = (rec.get("util_window") or rec.get("util") or {}).get("gpu_util_mean")
        lines.append(
            f"  {name:<22} {rec.get('status', '?'):<9} {rec.get('wall_s') or 0:>6} s"
            + (f"  {rate:>9.0f} img/s" if rate else "")
            + (f"  GPU {util:.0f}%" if util is not None else "")
            + (f"  ({rec.get('reason')})" if rec.get("reason") else "")
        )
    t = s.get("targets", {})
    sp, pu = t.get("train_speedup_vs_2core_cpu", {}), t.get("photo_gpu_util", {})
    lines.append(
        f"  train speed-up vs 2-core CPU: {sp.get('value')} (target {sp.get('target')}, met {sp.get('met')})"
    )
    lines.append(
        f"  photo-model GPU utilisation: {pu.get('value')} (target {pu.get('target')}, met {pu.get('met')})"
    )
    lines.append(f"  P@10: {s.get('precision_at_10')}")
    lines += [f"  - {n}" for n in s.get("where_time_goes", [])]
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where the GPU stages run")
    p.add_argument("--quick", action="store_true", help="a few thousand images, 1 epoch: the CPU test")
    p.add_argument("--out", help="folder for gpu_check.json, gpu_check.log, gpu_samples.csv")
    p.add_argument("--work", help="folder for the data and the runs (default: a temporary one, removed)")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary work folder")
    p.add_argument(
        "--data", help="a Fashion-MNIST-like folder with train/ and test/ (default: imgsim dataset)"
    )
    p.add_argument("--limit", type=int, help="images per split written by `imgsim dataset` (default: all)")
    p.add_argument("--time-limit", type=float, help="seconds for all stages (default 480; quick 1800)")
    p.add_argument("--stages", help="comma-separated subset of the stages (default: all)")
    p.add_argument("--epochs", type=int, help="train_gpu epochs (default 2; quick 1)")
    p.add_argument("--batch-size", type=int, help="train_gpu batch (default imgsim's 256; quick 64)")
    p.add_argument(
        "--large-batch-size", type=int, help="train_gpu_large_batch batch (default 1024; quick 128)"
    )
    p.add_argument("--arch", help="the photo model (`imgsim train --arch NAME`) for train_photo")
    p.add_argument("--photo-image-size", type=int, help="train_photo --image-size (default 96; quick 48)")
    p.add_argument("--photo-batch-size", type=int, help="train_photo batch (default 512; quick 64)")
    p.add_argument("--photo-args", default="", help="more `imgsim train` arguments for train_photo")
    p.add_argument("--train-args", default="", help="more `imgsim train` arguments for every training stage")
    p.add_argument("--source-hash", action="store_true", help="print the imgsim source hash and exit")
    a = p.parse_args(argv)
    q = a.quick
    defaults = {"time_limit": 1800.0 if q else 480.0, "epochs": 1 if q else 2, "batch_size": 64 if q else 256,
                "large_batch_size": 128 if q else 1024, "photo_image_size": 48 if q else 96,
                "photo_batch_size": 64 if q else 512, "limit": 2000 if q and not a.data else None}  # fmt: skip
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if not (a.source_hash or a.out):
        p.error("--out is required")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if a.source_hash:
        print(source_hash())
        return 0
    return Check(a).main()


if __name__ == "__main__":
    sys.exit(main())
