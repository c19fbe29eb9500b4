"""pipelines.runtime.ensure_ray: the worker environment reaches real Ray workers, whether the job
starts a local Ray (through the inherited process environment) or joins a running cluster (through
the job's runtime environment), and a value the caller set wins.

Each case runs in its own Python process: a process talks to one Ray at a time, and the session's
shared runtime (tests/conftest.py) must stay as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, os, sys, tempfile, shutil
import ray
from pipelines.runtime import ensure_ray, starts_local_ray

@ray.remote(num_cpus=0)
def worker_env():
    return {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "RAY_TRAIN_ENABLE_PRINT_PATCH")}

if sys.argv[1] == "local":
    local = starts_local_ray()
    ensure_ray(num_cpus=1, include_dashboard=False, log_to_driver=False)
    out = {"local": local, "worker": ray.get(worker_env.remote()), "runtime_env": ray.get_runtime_context().runtime_env}
    ray.shutdown()
else:  # join a running single-node cluster, kept out of Ray's ray_current_cluster file
    import ray._common.utils, ray._private.utils
    from ray.cluster_utils import Cluster
    ray._private.utils.write_ray_address = lambda *a, **k: None
    ray._common.utils.reset_ray_address = lambda *a, **k: None
    temp_dir = tempfile.mkdtemp(prefix="imgsim-rt-", dir="/tmp")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, "temp_dir": temp_dir})
    try:
        local = starts_local_ray(cluster.address)
        ensure_ray(address=cluster.address, log_to_driver=False)
        out = {"local": local, "worker": ray.get(worker_env.remote()), "driver_omp": os.environ.get("OMP_WAIT_POLICY")}
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
print("RESULT " + json.dumps(out))
"""


def run_case(case: str, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OMP_WAIT_POLICY")}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, case],
        cwd=ROOT,
        env={**base, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.parametrize(
    ("preset", "expected"),
    [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE")],
    ids=["default", "caller-wins"],
)
def test_local_ray_workers_inherit_the_worker_env(preset: dict[str, str], expected: str) -> None:
    out = run_case("local", **preset)
    assert out["local"] is True
    assert out["worker"] == {"OMP_WAIT_POLICY": expected, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    # no job runtime environment: the workers Ray prestarted at ray.init stay usable
    assert not out["runtime_env"].get("env_vars")


def test_joining_a_cluster_sends_the_worker_env_in_the_runtime_env() -> None:
    out = run_case("join")
    assert out["local"] is False
    assert out["worker"] == {"OMP_WAIT_POLICY": "PASSIVE", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    assert out["driver_omp"] is None  # the driver's own environment is left alone


STALE = r"""
import json, sys, time
import ray
from imgsim.errors import ImgsimError
from pipelines.runtime import ensure_ray

started = time.monotonic()
try:
    ensure_ray()  # as every pipeline calls it: no arguments (num_cpus would refuse to join a cluster)
except ImgsimError as e:
    out = {"error": str(e)}
else:
    out = {"nodes": len(ray.nodes()), "head": ray.nodes()[0]["NodeManagerAddress"]}
    ray.shutdown()
out["took"] = time.monotonic() - started
print("RESULT " + json.dumps(out))
"""


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stale(tmp_dir: Path, **env: str) -> tuple[dict, str]:
    """`ensure_ray` in a fresh process whose Ray temp folder (RAY_TMPDIR) is `tmp_dir`, so its
    `ray_current_cluster` file is this test's and no other Ray on the machine is touched."""
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR", "TMPDIR")}
    proc = subprocess.run(
        [sys.executable, "-c", STALE],
        cwd=ROOT,
        env={**base, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(tmp_dir), **env},
        capture_output=True,
        text=True,
        timeout=150,  # Ray alone retries a dead address for many minutes
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :]), proc.stderr


@pytest.fixture
def stale_cluster_file() -> Iterator[tuple[Path, str]]:
    """A Ray temp folder whose address file names a cluster that is gone (a killed `ray start`).
    Short and under /tmp: Ray's socket paths inside it must stay under 108 characters."""
    tmp_dir = Path(tempfile.mkdtemp(prefix="imgsim-stale-", dir="/tmp"))
    (tmp_dir / "ray").mkdir()
    address = f"127.0.0.1:{closed_port()}"
    (tmp_dir / "ray" / "ray_current_cluster").write_text(address + "\n")
    yield tmp_dir, address
    shutil.rmtree(tmp_dir, ignore_errors=True)


def test_a_stale_ray_start_address_file_is_ignored_with_one_line(
    stale_cluster_file: tuple[Path, str],
) -> None:
    tmp_dir, address = stale_cluster_file
    out, stderr = run_stale(tmp_dir)
    assert out.get("nodes") == 1, out  # a local Ray started instead of hanging on the dead address
    notes = [line for line in stderr.splitlines() if "does not answer" in line]
    port = address.rsplit(":", 1)[1]  # Ray names 127.0.0.1 by this machine's own address
    assert len(notes) == 1 and f":{port})" in notes[0]
    assert str(tmp_dir / "ray" / "ray_current_cluster") in notes[0]


def test_a_dead_ray_address_the_user_set_fails_in_one_line(stale_cluster_file: tuple[Path, str]) -> None:
    tmp_dir, _ = stale_cluster_file
    dead = f"127.0.0.1:{closed_port()}"
    out, _ = run_stale(tmp_dir, RAY_ADDRESS=dead)
    port = dead.rsplit(":", 1)[1]  # Ray names 127.0.0.1 by this machine's own address
    assert "\n" not in out["error"] and out["error"].startswith("no Ray cluster answers at ")
    assert f":{port} (from RAY_ADDRESS={dead})" in out["error"]
    assert "RAY_ADDRESS=local" in out["error"]
    assert out["took"] < 10
