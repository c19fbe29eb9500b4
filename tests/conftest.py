"""Shared fixtures: one local Ray runtime per session, tiny generated images, free ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.patterns import make_pattern_image
from bench.processes import free_port

os.environ.setdefault("RAY_ACCEPT_CALLABLE_ENTRYPOINT", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A real local Ray runtime shared by the session's tests (2 CPUs, like this machine)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def wait_healthy(url: str, timeout_s: float = 120.0, alive: Callable[[], None] | None = None) -> None:
    """Poll `url` until it answers 200; `alive()` (if given) raises when the server has died."""
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        if alive:
            alive()
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not become healthy in {timeout_s} s")
        time.sleep(0.25)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A labelled folder: 4 classes x 6 PNGs under tmp/<class>/, plus one unlabelled top-level image."""
    root = write_pattern_folder(tmp_path / "images", per_class=6)
    make_pattern_image(2, seed=999).save(root / "top.png")
    return root


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real S3-compatible HTTP server (moto) on 127.0.0.1, with the AWS settings pointing at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    try:
        yield endpoint
    finally:
        server.stop()


def write_pattern_folder(root: Path, per_class: int = 8) -> Path:
    """4 visually distinct classes x `per_class` PNGs under root/<class>/."""
    for kind, name in enumerate(["stripes-v", "stripes-h", "blob", "checks"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_pattern_image(kind, seed=kind * 100 + i).save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> tuple[Path, Path]:
    """(data folder, run dir): a real model trained by Ray Train and indexed by the Ray Data job.

    Tests must not modify it; copy it (shutil.copytree) to change anything.
    """
    from pipelines.build_index import build_index
    from pipelines.train import train

    base = tmp_path_factory.mktemp("tiny")
    data = write_pattern_folder(base / "data")
    run = base / "run"
    train(str(data), str(run), epochs=6, image_size=16, dim=8, batch_size=16, lr=3e-3)
    build_index(str(data), str(run), clusters=4)
    return data, run


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """An empty bucket on `s3_server` (AWS settings already point there); its name."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="imgsim-test")
    return "imgsim-test"


def upload_tree(bucket: str, folder: Path, prefix: str) -> list[str]:
    """Upload every file under `folder` to s3://bucket/prefix/<relative path>; the URIs, sorted.

    Uses the AWS settings of the environment (the `s3_server` fixture sets them).
    """
    import boto3

    s3 = boto3.client("s3")
    uris = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = f"{prefix.strip('/')}/{path.relative_to(folder).as_posix()}"
            s3.upload_file(str(path), bucket, key)
            uris.append(f"s3://{bucket}/{key}")
    return uris


class RayHead:
    """A real `ray start --head --block` cluster in its own process tree, temp dir and ports, with
    token authentication on (as Ray 2.60 does for a head that has a token). Stopped by killing its
    process tree by PID, so nothing else on the machine (`ray stop` would) is touched.

    `env` is what a client of this cluster needs: the venv first on PATH, the token's HOME,
    RAY_AUTH_MODE=token, RAY_ADDRESS (the dashboard).
    """

    def __init__(self, base: Path, num_cpus: int = 4) -> None:
        import subprocess
        import sys

        self.base = base
        self.home = base / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.temp_dir = Path(tempfile_short("imgsim-head-"))
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        venv_bin = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "HOME": str(self.home),
            "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_ADDRESS": f"http://127.0.0.1:{self.dashboard_port}",
            "TQDM_DISABLE": "1",
        }
        ray_cli = str(Path(venv_bin) / "ray")
        subprocess.run(
            [ray_cli, "get-auth-token", "--generate"],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.log = open(base / "ray-start.log", "wb")  # noqa: SIM115 (closed in stop())
        start_env = {k: v for k, v in self.env.items() if k != "RAY_ADDRESS"}
        self.process = subprocess.Popen(
            [
                ray_cli, "start", "--head", "--block", "--disable-usage-stats",
                f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
                "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}", f"--temp-dir={self.temp_dir}",
                "--include-dashboard=true",
            ],
            env=start_env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    @property
    def address(self) -> str:
        return self.env["RAY_ADDRESS"]

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {(self.home / '.ray' / 'auth_token').read_text().strip()}"}

    def job_status(self, submission_id: str) -> str:
        """A job's status from the job server's REST API ("SUCCEEDED", "FAILED", ...)."""
        import requests

        r = requests.get(f"{self.address}/api/jobs/{submission_id}", headers=self._auth(), timeout=30)
        r.raise_for_status()
        return str(r.json()["status"])

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        """Wait until the cluster runs a job (a trivial one, submitted with the token): the job
        server answers before the node's agent can take jobs ("No available agent")."""
        import requests

        auth = self._auth()
        deadline = time.monotonic() + timeout_s
        job = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited: {(self.base / 'ray-start.log').read_text()[-2000:]}")
            try:
                if job is None:
                    r = requests.post(
                        f"{self.address}/api/jobs/", json={"entrypoint": "true"}, headers=auth, timeout=10
                    )
                    job = r.json()["submission_id"] if r.status_code == 200 else None
                else:
                    status = requests.get(f"{self.address}/api/jobs/{job}", headers=auth, timeout=10).json()[
                        "status"
                    ]
                    if status == "SUCCEEDED":
                        return
                    if status in ("FAILED", "STOPPED"):
                        job = None
            except (requests.RequestException, ValueError, KeyError):
                pass
            time.sleep(1)
        raise TimeoutError(f"the Ray head at {self.address} did not run a job in {timeout_s} s")

    def pids(self) -> list[int]:
        """Every process of this cluster: `ray start` and its descendants (raylet, GCS, workers, jobs)."""
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            return [root.pid, *(p.pid for p in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        import psutil

        procs = []
        for pid in self.pids():
            with contextlib.suppress(psutil.NoSuchProcess):
                procs.append(psutil.Process(pid))
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(procs, timeout=30)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def tempfile_short(prefix: str) -> str:
    """A new directory with a short path under /tmp (Ray's socket paths must stay short)."""
    import tempfile

    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[RayHead]:
    """A `ray start --head` cluster with token authentication (see RayHead)."""
    head = RayHead(tmp_path / "cluster")
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()
