"""`imgsim serve` as users run it: the real command in a subprocess, its own local Ray, real HTTP,
Ctrl-C. Once per HTTP front end: HAProxy in front of the replicas, and Serve's Python proxy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import free_port, wait_healthy
from test_serve import build_small_run

from serve import ingress

IMGSIM = str(Path(sys.executable).parent / "imgsim")


def _haproxy_processes(below: int | None = None) -> set[int]:
    """HAProxy processes on this machine, or only those started (directly or not) by `below`: the
    machine is shared, and other sessions' servers run HAProxy too."""
    if below is not None:
        import psutil

        try:
            return {p.pid for p in psutil.Process(below).children(recursive=True) if p.name() == "haproxy"}
        except psutil.Error:
            return set()
    done = subprocess.run(["pgrep", "-x", "haproxy"], capture_output=True, text=True)
    return {int(pid) for pid in done.stdout.split()}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_small_run(tmp_path_factory.mktemp("serve-cli"))


@pytest.mark.parametrize("front_end", ["haproxy", "proxy"])
def test_imgsim_serve_answers_searches_and_stops_cleanly_on_ctrl_c(
    small_run: Path, front_end: str, tmp_path: Path
) -> None:
    if front_end == "haproxy" and not ingress.find_haproxy():
        pytest.skip("no haproxy binary (apt-get install haproxy; `make test` installs it as root)")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [IMGSIM, "serve", "--model", str(small_run), "--port", str(port), "--ingress", front_end],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def alive() -> None:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]

        wait_healthy(base + "/healthz", timeout_s=180, alive=alive)
        ours = _haproxy_processes(below=proc.pid)
        if front_end == "haproxy":
            assert ours, "no HAProxy process runs in front of the replicas"
        else:
            assert not ours, "an HAProxy process runs with --ingress proxy"

        query = sorted((small_run.parent / "images" / "blob").glob("*.png"))[0]
        for _ in range(5):  # a few in a row: HAProxy reloads its backends once the replica is up
            r = requests.post(
                base + "/search?k=3", files={"image": (query.name, query.read_bytes())}, timeout=30
            )
            assert r.status_code == 200, r.text
            answer = r.json()
            assert [hit["rank"] for hit in answer["results"]] == [1, 2, 3]
            assert answer["results"][0]["label"] == "blob"
        bad = requests.post(base + "/search", data=b"not an image", headers={"Content-Type": "image/png"})
        assert bad.status_code == 400 and "error" in bad.json()
        image = requests.get(base + f"/images/{answer['results'][0]['id']}", timeout=30)
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert "<html" in requests.get(base + "/", timeout=30).text.lower()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            log.close()
    output = (tmp_path / "serve.log").read_text()
    assert code == 0, output[-3000:]
    assert f"via {front_end} (Ctrl-C to stop)" in output  # the start-up line names the front end
    time.sleep(1)
    assert not (ours & _haproxy_processes()), "HAProxy outlived imgsim serve"
    with pytest.raises(requests.ConnectionError):
        requests.get(base + "/healthz", timeout=5)
