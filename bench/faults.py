"""Faults injected from outside, as they happen to users, and what imgsim does about them.

    .venv/bin/python -m bench.faults                          # every fault; a table
    .venv/bin/python -m bench.faults --json                   # ... and the rows as JSON, last line
    .venv/bin/python -m bench.faults --only s3-outage,disk-full

Each fault is a real event, not a flag in the code: a process SIGKILLed by PID (found in the process
tree by the title Ray gives it), an S3 server stopped and started again on the same port, a
filesystem that fills up. One row per fault:

    {"fault", "recovered", "lost", "errors", "seconds_to_recover", "note"}

- train-worker-killed: a Ray Train worker of `imgsim train --workers 2`, after the first checkpoint;
  the run restarts from its last checkpoint by itself. Recovery: kill -> the next checkpoint.
- index-driver-killed: `imgsim index` itself, after it staged a part; a re-run resumes. Recovery:
  the re-run's seconds.
- embed-actor-killed: one of the Ray Data actors embedding for `imgsim index`; the job finishes by
  itself. Recovery: kill -> the next staged part.
- serve-replica-killed-haproxy / -proxy: one of 2 replicas of `imgsim serve` under a steady request
  loop on 127.0.0.1, behind HAProxy or Serve's own proxy. `errors`: failed requests while Serve
  replaces it (the target is <= 1 % of those requests, and none after). Recovery: kill -> the new
  replica answers.
- s3-outage: the S3 server (moto on 127.0.0.1) stopped for 5 s while `imgsim index` reads from it,
  then started again on the same port; one object deleted meanwhile. Recovery: restart -> the job's
  end. Every other image must be indexed, the deleted one in skipped.jsonl with its reason.
- disk-full: the run directory on a small filesystem (tmpfs, size=) that fills up while a second
  `imgsim index` writes the index; a one-line error, the previous index and model byte for byte as
  they were and still served. Recovery: the re-run once space is freed.

`lost`: images (or requests' answers) that should be there and are not; `recovered`: the fault's
promise held. The tests (tests/test_faults.py, test_train.py, test_build_index.py) assert the same.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.processes import free_port, kill_tree, latest_checkpoint, ray_processes, wait_for

REPO = Path(__file__).resolve().parent.parent
IMGSIM = str(Path(sys.executable).parent / "imgsim")
TINY_TRAIN = ["--image-size", "16", "--dim", "8", "--batch-size", "16"]


@dataclass
class Row:
    fault: str
    recovered: bool
    lost: int
    errors: int
    seconds_to_recover: float | None
    note: str
    details: dict[str, Any] = field(default_factory=dict)  # for the tests; not printed

    def as_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row.pop("details")
        return row


# -- processes --------------------------------------------------------------------------------------
def env() -> dict[str, str]:
    """The environment for the imgsim processes a fault runs: their own local Ray."""
    return {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        "RAY_USAGE_STATS_ENABLED": "0",
        "TQDM_DISABLE": "1",
    }


# -- data ---------------------------------------------------------------------------------------------
def images(root: Path, n: int, bad: int = 0) -> tuple[Path, list[Path]]:
    """`n` distinct small PNGs under root/d*/ (bench.scale's generator) plus `bad` broken files."""
    from bench.scale import generate

    generate(root, 0, n, 2)
    broken = []
    for i in range(bad):
        path = root / "d00000" / f"broken-{i}.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
        broken.append(path)
    return root, broken


def trained_run(work: Path) -> Path:
    """A small trained model (16x16, dim 8) with an index over 200 images, made once per `work`."""
    run = work / "tiny-run"
    if (run / "index" / "manifest.json").is_file():
        return run
    data, _ = images(work / "tiny-data", 200)
    subprocess.run([IMGSIM, "train", str(data), "--out", str(run), "--epochs", "2", *TINY_TRAIN],
                   env=env(), check=True, capture_output=True)  # fmt: skip
    subprocess.run(
        [IMGSIM, "index", str(data), "--model", str(run)], env=env(), check=True, capture_output=True
    )
    return run


def copy_run(run: Path, to: Path) -> Path:
    shutil.rmtree(to, ignore_errors=True)
    shutil.copytree(run, to)
    return to


def index_rows(run: Path) -> tuple[list[str], list[str]]:
    """(indexed paths, skipped paths) of a run."""
    import pyarrow.parquet as pq

    paths = pq.read_table(run / "index" / "embeddings.parquet", columns=["path"])["path"].to_pylist()
    skipped = [
        json.loads(line)["path"] for line in (run / "index" / "skipped.jsonl").read_text().splitlines()
    ]
    return paths, skipped


def staged_parts(run: Path) -> list[Path]:
    return sorted(run.glob(".index-staging-*/part-*.parquet"))


def _accounting(run: Path, good: set[str], bad: set[str]) -> tuple[int, int, str]:
    """(lost, duplicated, note): good images not indexed exactly once, bad ones not skipped."""
    paths, skipped = index_rows(run)
    missing = good - set(paths)
    unskipped = bad - set(skipped)
    duplicated = len(paths) - len(set(paths))
    extra = set(paths) - good
    note = (
        f"{len(set(paths) & good)}/{len(good)} indexed once, {len(set(skipped) & bad)}/{len(bad)} bad skipped"
    )
    if extra:
        note += f", {len(extra)} unexpected rows"
    return len(missing) + len(unskipped) + len(extra), duplicated, note


# -- 1. a Ray Train worker ------------------------------------------------------------------------------
def train_worker_killed(work: Path, epochs: int = 8) -> Row:
    data, _ = images(work / "train-data", 400)
    run = work / "train-run"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [
        IMGSIM,
        "train",
        str(data),
        "--out",
        str(run),
        "--epochs",
        str(epochs),
        "--workers",
        "2",
        *TINY_TRAIN,
    ]
    log = (work / "train.log").open("w")
    proc = subprocess.Popen(
        [*cmd, "--json"], stdout=log, stderr=subprocess.STDOUT, env=env(), start_new_session=True
    )
    try:
        at_kill = wait_for(lambda: latest_checkpoint(run), 1500, "a first checkpoint")
        victim = wait_for(lambda: ray_processes("RayTrainWorker", proc.pid), 60, "a Ray Train worker")[0]
        victim.kill()
        killed = time.monotonic()
        after = wait_for(
            lambda: (c := latest_checkpoint(run)) and c["epoch"] > at_kill["epoch"] and c,
            600,
            "a checkpoint after",
        )
        recovered_s = time.monotonic() - killed
        code = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
        log.close()
    summary = _last_json((work / "train.log").read_text())
    history = summary.get("history", [])
    epochs_done = [h["epoch"] for h in history]
    kept = history[: at_kill["epoch"]] == at_kill["history"]
    ok = (
        code == 0
        and (run / "model" / "model.pt").is_file()
        and epochs_done == list(range(1, epochs + 1))
        and kept
    )
    return Row(
        "train-worker-killed",
        ok,
        0 if ok else 1,
        0,
        round(recovered_s, 1),
        f"killed after epoch {at_kill['epoch']}; next checkpoint epoch {after['epoch']}; "
        f"{epochs_done[-1] if epochs_done else 0}/{epochs} epochs, exit {code}",
    )


# -- 2. the imgsim index driver ----------------------------------------------------------------------------
def index_driver_killed(work: Path, n: int = 14_000) -> Row:
    data, broken = images(work / "index-data", n, bad=3)
    run = copy_run(trained_run(work), work / "driver-run")
    before = (run / "index" / "knn.faiss").read_bytes()
    cmd = [IMGSIM, "index", str(data), "--model", str(run)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), start_new_session=True
    )
    try:
        wait_for(lambda: staged_parts(run), 600, "a staged part", 0.01)
    finally:
        kill_tree(proc.pid)
    proc.wait(timeout=60)
    untouched = (run / "index" / "knn.faiss").read_bytes() == before
    staged = len(staged_parts(run))
    t0 = time.monotonic()
    done = subprocess.run(cmd + ["--json"], env=env(), capture_output=True, text=True)
    rerun_s = time.monotonic() - t0
    good = {str(p) for p in data.rglob("*.png")} - {str(p) for p in broken}
    lost, duplicated, note = _accounting(run, good, {str(p) for p in broken})
    summary = _last_json(done.stdout)
    ok = (
        done.returncode == 0 and untouched and lost == 0 and duplicated == 0 and summary.get("resumed", 0) > 0
    )
    return Row(
        "index-driver-killed",
        ok,
        lost,
        duplicated,
        round(rerun_s, 1),
        f"killed after {staged} staged part(s); re-run resumed {summary.get('resumed')} rows, embedded "
        f"{summary.get('embedded')}; {note}; old index untouched: {untouched}",
    )


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                return value
    return {}


# -- 3. a Ray Data embedding actor ----------------------------------------------------------------------------
def _index_in_thread(data: str, run: Path) -> tuple[threading.Thread, dict[str, Any]]:
    from pipelines.build_index import build_index

    outcome: dict[str, Any] = {}

    def job() -> None:
        try:
            outcome["summary"] = build_index(data, str(run))
        except BaseException as e:  # reported by the caller
            outcome["error"] = e

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    return thread, outcome


#: The title Ray 2.60 gives the actor pool's workers: "ray::MapWorker(MapBatches(read_and_decode)->
#: MapBatches(Embedder))" (decode and embed are fused into one actor).
EMBED_ACTOR = "MapWorker"


def embed_actor_killed(work: Path, n: int = 24_000) -> Row:
    from pipelines.runtime import ensure_ray

    ensure_ray()
    data, broken = images(work / "embed-data", n, bad=2)
    run = copy_run(trained_run(work), work / "embed-run")
    thread, outcome = _index_in_thread(str(data), run)
    wait_for(lambda: staged_parts(run) or not thread.is_alive(), 900, "a staged part")
    parts_at_kill = len(staged_parts(run))
    victims = [p for p in ray_processes(EMBED_ACTOR) if "Embedder" in p.cmdline()[0]]
    if not victims or not thread.is_alive():
        thread.join()
        return Row("embed-actor-killed", False, 0, 0, None, "the job ended before an actor could be killed")
    victims[0].kill()
    killed = time.monotonic()
    recovered_s = None
    with contextlib.suppress(TimeoutError):
        wait_for(
            lambda: len(staged_parts(run)) > parts_at_kill or not thread.is_alive(), 900, "the next part"
        )
        recovered_s = time.monotonic() - killed
    thread.join(timeout=1800)
    if "error" in outcome or thread.is_alive():
        return Row("embed-actor-killed", False, n, 0, None, f"the job failed: {outcome.get('error')!r}"[:300])
    good = {str(p) for p in data.rglob("*.png")} - {str(p) for p in broken}
    lost, duplicated, note = _accounting(run, good, {str(p) for p in broken})
    return Row(
        "embed-actor-killed",
        lost == 0 and duplicated == 0,
        lost,
        duplicated,
        round(recovered_s, 1) if recovered_s is not None else None,
        f"actor pid {victims[0].pid} killed after {parts_at_kill} staged part(s); the job finished by "
        f"itself; {note}",
        {"run": run, "summary": outcome["summary"]},
    )


# -- 4. a Serve replica under load ------------------------------------------------------------------------
@dataclass
class LoadLog:
    """Every request's end time and outcome, and what /healthz said, under a steady loop."""

    requests: list[tuple[float, bool, str]] = field(default_factory=list)
    replicas: list[tuple[float, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


def _load_loop(base: str, body: bytes, log: LoadLog) -> None:
    import requests

    with requests.Session() as session:
        while not log.stop.is_set():
            try:
                r = session.post(base + "/search?k=5", files={"image": ("q.png", body)}, timeout=30)
                log.requests.append((time.monotonic(), r.status_code == 200, f"HTTP {r.status_code}"))
            except requests.RequestException as e:
                log.requests.append((time.monotonic(), False, type(e).__name__))
                time.sleep(0.05)


def _health_loop(base: str, log: LoadLog) -> None:
    import requests

    while not log.stop.is_set():
        with contextlib.suppress(requests.RequestException, ValueError, KeyError):
            r = requests.get(base + "/healthz", timeout=5)
            if r.status_code == 200:
                log.replicas.append((time.monotonic(), r.json()["replica"]))
        time.sleep(0.1)


def wait_healthy(base: str, proc: subprocess.Popen, log: Path, timeout_s: float = 600) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"imgsim serve exited: {log.read_text()[-1500:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(base + "/healthz", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{base} did not become healthy in {timeout_s} s")


@contextlib.contextmanager
def serving(run: Path, ingress: str, replicas: int, work: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`imgsim serve` in its own process group; (base URL, process); stopped with Ctrl-C after."""
    for attempt in range(1, 4):  # on an overloaded machine Ray's start-up deadlines (30 s) can pass
        port = free_port()
        log = (work / f"serve-{ingress}.log").open("w")
        cmd = [IMGSIM, "serve", "--model", str(run), "--port", str(port), "--replicas", str(replicas)]
        proc = subprocess.Popen(
            [*cmd, "--ingress", ingress],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env(),
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(base, proc, work / f"serve-{ingress}.log")
            break
        except RuntimeError:
            log.close()
            if attempt == 3:
                raise
            print(f"[faults] imgsim serve did not start (attempt {attempt}); starting it again", flush=True)
    try:
        yield base, proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def serve_replica_killed(work: Path, ingress: str, clients: int = 4, after_s: float = 10.0) -> Row:
    fault = f"serve-replica-killed-{ingress}"
    if ingress == "haproxy":
        from serve.ingress import find_haproxy

        if not find_haproxy():
            return Row(fault, False, 0, 0, None, "skipped: no haproxy binary (apt-get install haproxy)")
    run = trained_run(work)
    query = sorted((work / "tiny-data").rglob("*.png"))[0].read_bytes()
    with serving(run, ingress, 2, work) as (base, proc):
        log = LoadLog()
        threads = [
            threading.Thread(target=_load_loop, args=(base, query, log), daemon=True) for _ in range(clients)
        ]
        threads.append(threading.Thread(target=_health_loop, args=(base, log), daemon=True))
        for t in threads:
            t.start()
        try:
            # steady state: both replicas have answered
            wait_for(lambda: len({r for _, r in log.replicas}) >= 2, 120, "both replicas answering")
            time.sleep(3)
            before = {r for _, r in log.replicas}
            victim = wait_for(lambda: ray_processes("ServeReplica", proc.pid), 30, "a replica process")[0]
            victim.kill()
            killed = time.monotonic()
            new = wait_for(
                lambda: next((t for t, r in log.replicas if t > killed and r not in before), None),
                300,
                "a replacement replica answering",
            )
            time.sleep(after_s)
        finally:
            log.stop.set()
            for t in threads:
                t.join(timeout=60)
    during = [r for r in log.requests if killed <= r[0] <= new]
    after = [r for r in log.requests if r[0] > new]
    failed_during = [r for r in during if not r[1]]
    failed_after = [r for r in after if not r[1]]
    kinds = sorted({r[2] for r in failed_during + failed_after})
    share = len(failed_during) / max(1, len(during))
    ok = share <= 0.01 and not failed_after and len(after) > 0
    return Row(
        fault,
        ok,
        0,
        len(failed_during) + len(failed_after),
        round(new - killed, 1),
        f"2 replicas, {clients} clients: {len(failed_during)} of {len(during)} requests failed while the "
        f"replica was replaced ({100 * share:.2f} %), {len(failed_after)} of {len(after)} after"
        + (f" ({', '.join(kinds)})" if kinds else ""),
        {"during": len(during), "failed_during": len(failed_during), "after": len(after)},
    )


# -- 5. the S3 server stopped mid-ingest ----------------------------------------------------------------------
class S3Server:
    """moto's S3 server on 127.0.0.1 that can be stopped and started again on the same port (its
    buckets live in this process, so they survive); `settings` point the AWS variables at it."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.settings = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
        }
        self._server: Any = None

    def start(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

        deadline = time.monotonic() + 30
        while True:
            try:
                self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
                self._server.start()
                return
            except OSError:  # the port is still being released
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@contextlib.contextmanager
def aws_settings(settings: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in [*settings, "AWS_PROFILE"]}
    os.environ.update(settings)
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3_outage(work: Path, n: int = 6000, outage_s: float = 5.0) -> Row:
    import boto3

    data, _ = images(work / "s3-data", n)
    server = S3Server()
    server.start()
    try:
        with aws_settings(server.settings):
            s3 = boto3.client("s3")
            s3.create_bucket(Bucket="imgsim-faults")
            files = sorted(data.rglob("*.png"))
            from concurrent.futures import ThreadPoolExecutor

            def upload(p: Path) -> str:
                key = f"photos/{p.relative_to(data).as_posix()}"
                s3.upload_file(str(p), "imgsim-faults", key)
                return f"s3://imgsim-faults/{key}"

            with ThreadPoolExecutor(8) as pool:
                uris = list(pool.map(upload, files))
            run = copy_run(trained_run(work), work / "s3-run")
            thread, outcome = _index_in_thread("s3://imgsim-faults/photos", run)
            wait_for(lambda: staged_parts(run) or not thread.is_alive(), 900, "a staged part")
            gone = uris[-1]  # read last: deleted after the listing, it cannot be read any more
            s3.delete_object(Bucket="imgsim-faults", Key=gone.split("/", 3)[3])
            midway = thread.is_alive()
            server.stop()
            time.sleep(outage_s)
            server.start()
            restarted = time.monotonic()
            thread.join(timeout=1800)
            recovered_s = time.monotonic() - restarted
    finally:
        server.stop()
    if "error" in outcome or thread.is_alive():
        return Row("s3-outage", False, n, 0, None, f"the job failed: {outcome.get('error')!r}"[:300])
    paths, skipped = index_rows(run)
    reasons = {
        json.loads(line)["path"]: json.loads(line)["reason"]
        for line in (run / "index" / "skipped.jsonl").read_text().splitlines()
    }
    good = set(uris) - {gone}
    lost, duplicated, note = _accounting(run, good, {gone})
    ok = lost == 0 and duplicated == 0 and midway
    return Row(
        "s3-outage",
        ok,
        lost,
        len(skipped) - 1 + duplicated,
        round(recovered_s, 1),
        f"server down {outage_s:g} s after {len(staged_parts(run)) or 'the first'} staged part; reads retried with "
        f"backoff; {note}; the deleted object skipped as {reasons.get(gone)!r}",
        {"run": run, "reasons": reasons, "gone": gone, "indexed": paths},
    )


# -- 6. the disk filling up while the index is written -----------------------------------------------------
@contextlib.contextmanager
def small_filesystem(size_mb: int) -> Iterator[Path | None]:
    """A tmpfs of `size_mb` mounted on a new temporary folder, or None if mounting is not permitted."""
    where = Path(tempfile.mkdtemp(prefix="imgsim-full-"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        where.rmdir()
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
        with contextlib.suppress(OSError):
            where.rmdir()


def fill(folder: Path, leave_bytes: int) -> Path:
    """A file that takes all the free space of `folder`'s filesystem but `leave_bytes`."""
    filler = folder / "filler"
    free = shutil.disk_usage(folder).free
    with filler.open("wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        left = max(0, free - leave_bytes)
        while left > 0:
            f.write(chunk[: min(len(chunk), left)])
            left -= min(len(chunk), left)
    return filler


def _tree_digest(root: Path) -> dict[str, bytes]:
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.blake2b(p.read_bytes(), digest_size=16).digest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def disk_full(work: Path, n: int = 6000) -> Row:
    with small_filesystem(64) as mount:
        if mount is None:
            return Row("disk-full", False, 0, 0, None, "skipped: mounting a tmpfs is not permitted here")
        run = copy_run(trained_run(work), mount / "run")
        data, _ = images(work / "full-data", n)
        model_before, index_before = _tree_digest(run / "model"), _tree_digest(run / "index")
        with serving(run, "proxy", 1, work) as (base, _proc):
            import requests

            query = sorted((work / "tiny-data").rglob("*.png"))[0].read_bytes()

            def ask() -> list[str]:
                r = requests.post(base + "/search?k=5", files={"image": ("q.png", query)}, timeout=60)
                r.raise_for_status()
                return [hit["path"] for hit in r.json()["results"]]

            answer_before = ask()
            # room for the staged embeddings (n rows of 4·dim bytes + ~120 of path and metadata)
            # but not for the new index written beside the old one (over twice that)
            from imgsim.models import autoencoder as model_lib

            dim = model_lib.load(run).config.dim
            filler = fill(mount, leave_bytes=int(n * (4 * dim + 120) * 1.3))
            done = subprocess.run(
                [IMGSIM, "index", str(data), "--model", str(run)], env=env(), capture_output=True, text=True
            )
            stderr_lines = [line for line in done.stderr.splitlines() if line.startswith("imgsim: error")]
            answer_after = ask()
        intact = _tree_digest(run / "model") == model_before and _tree_digest(run / "index") == index_before
        from imgsim.index.search import Searcher

        reload_ok = Searcher.load(run).search(query, k=5)["results"][0]["path"] == answer_before[0]
        filler.unlink()
        t0 = time.monotonic()
        again = subprocess.run(
            [IMGSIM, "index", str(data), "--model", str(run)], env=env(), capture_output=True
        )
        rerun_s = time.monotonic() - t0
        reindexed = again.returncode == 0 and len(index_rows(run)[0]) == n
    one_line = done.returncode != 0 and len(stderr_lines) == 1 and "no space left" in stderr_lines[0]
    stage = "staging" if "staging" in done.stderr else "index" if "writing the index" in done.stderr else "?"
    ok = one_line and intact and answer_after == answer_before and reload_ok and reindexed
    return Row(
        "disk-full",
        ok,
        0 if intact else 1,
        0 if answer_after == answer_before else 1,
        round(rerun_s, 1),
        f"full while {stage}; exit {done.returncode}: "
        f"{stderr_lines[0] if stderr_lines else done.stderr.strip()[-200:]!r}; model and "
        f"index unchanged: {intact}; served the same answers: {answer_after == answer_before}; re-run after "
        f"freeing space: {'ok' if reindexed else 'failed'}",
        {"stderr": done.stderr, "intact": intact},
    )


# -- the table ---------------------------------------------------------------------------------------------
FAULTS: dict[str, Callable[[Path], Row]] = {
    "train-worker-killed": train_worker_killed,
    "index-driver-killed": index_driver_killed,
    "embed-actor-killed": embed_actor_killed,
    "serve-replica-killed-haproxy": lambda work: serve_replica_killed(work, "haproxy"),
    "serve-replica-killed-proxy": lambda work: serve_replica_killed(work, "proxy"),
    "s3-outage": s3_outage,
    "disk-full": disk_full,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help=f"comma-separated faults (default all: {', '.join(FAULTS)})")
    p.add_argument("--work", default=None, help="working folder (default: a new temporary one)")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list on the last line")
    args = p.parse_args()
    names = [n for n in args.only.split(",") if n] or list(FAULTS)
    unknown = set(names) - set(FAULTS)
    if unknown:
        p.error(f"unknown faults: {', '.join(sorted(unknown))}")
    work = Path(args.work or tempfile.mkdtemp(prefix="imgsim-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TQDM_DISABLE", "1")
    print(f"[faults] {time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores; work in {work}", flush=True)  # fmt: skip
    rows = []
    for name in names:
        t0 = time.monotonic()
        try:
            row = FAULTS[name](work)
        except Exception as e:  # a fault the code did not survive is a row too
            row = Row(name, False, -1, -1, None, f"{type(e).__name__}: {e}"[:300])
        rows.append(row)
        print(f"[faults] {row.fault}: recovered={row.recovered} lost={row.lost} errors={row.errors} "
              f"recover={row.seconds_to_recover} s ({time.monotonic() - t0:.0f} s) — {row.note}", flush=True)  # fmt: skip
    if args.json:
        print(json.dumps([r.as_dict() for r in rows]))


if __name__ == "__main__":
    main()
