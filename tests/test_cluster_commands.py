"""The documented cluster commands (pipelines/jobs.py) are the ones the documents show, and they run.

The slow test starts a real `ray start --head` cluster with token authentication on (its own ports,
temp dir and HOME; stopped by PID), then submits every documented batch job with `ray job submit
--working-dir .` as a user would, on small local data, and deploys `serve/config.yaml` to it.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import RayHead, free_port, wait_healthy, write_pattern_folder

from pipelines.jobs import ENTRYPOINTS, entrypoint, submit_command

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
SERVE = str(Path(sys.executable).parent / "serve")


def _commands_shown(text: str) -> str:
    """`text` with shell line continuations joined and runs of whitespace collapsed."""
    return re.sub(r"\s+", " ", text.replace("\\\n", " "))


def test_the_documents_show_exactly_the_commands_of_pipelines_jobs() -> None:
    readme = _commands_shown((ROOT / "README.md").read_text())
    cluster_md = _commands_shown((ROOT / "docs" / "cluster.md").read_text())
    for job in ENTRYPOINTS:
        assert submit_command(job) in cluster_md, f"docs/cluster.md does not show the {job} job"
    for job in ("train", "index"):
        assert submit_command(job) in readme, f"README.md does not show the {job} job"
    rayjob = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayjob-index.yaml").read_text())
    assert _commands_shown(rayjob["spec"]["entrypoint"]).strip() == entrypoint("index")
    # every `ray job submit` in the documents is one of these commands
    for text in (readme, cluster_md):
        for shown in re.findall(
            r"ray job submit --address \S+ --working-dir \. -- python -m pipelines\.\S+", text
        ):
            assert any(submit_command(job).startswith(shown) for job in ENTRYPOINTS), shown


def _submit(
    head: RayHead, command: str, env: dict[str, str], timeout_s: float = 600
) -> subprocess.CompletedProcess:
    argv = shlex.split(command)
    argv[0] = RAY
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_documented_jobs_and_serve_config_run_on_a_token_authenticated_cluster(
    ray_head: RayHead, tmp_path: Path
) -> None:
    data = write_pattern_folder(tmp_path / "data", per_class=16)
    run, embeddings = tmp_path / "run", tmp_path / "embeddings"
    values = {
        "address": ray_head.address,
        "data": str(data),
        "queries": str(data),
        "run": str(run),
        "embeddings": str(embeddings),
        "workers": "2",
        "concurrency": "2",
        "gpu": "",
    }

    # Without RAY_AUTH_MODE=token the client is refused, as the README says.
    no_auth = {k: v for k, v in ray_head.env.items() if k != "RAY_AUTH_MODE"}
    refused = _submit(ray_head, submit_command("eval", **values), no_auth, timeout_s=120)
    assert refused.returncode != 0
    assert "uthentication" in refused.stdout + refused.stderr

    for job in ("train", "index", "eval", "eval-copies", "duplicates", "embed"):
        done = _submit(ray_head, submit_command(job, **values), ray_head.env)
        assert done.returncode == 0, f"{job}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        (job_id,) = set(re.findall(r"Job '(raysubmit_\w+)' submitted", done.stdout + done.stderr))
        assert ray_head.job_status(job_id) == "SUCCEEDED", done.stdout[-2000:]
        if job == "train":
            assert (run / "model" / "model.pt").is_file()
            assert json.loads((run / "checkpoints" / "train-state.json").read_text())["epochs"] == 6
        elif job == "index":
            assert pq.read_table(run / "index" / "embeddings.parquet").num_rows == 64
        elif job == "eval":
            assert "precision@1" in done.stdout
        elif job == "eval-copies":
            assert '"precision_at_1"' in done.stdout and '"per_edit"' in done.stdout
        elif job == "duplicates":
            assert (run / "duplicates" / "duplicates.jsonl").is_file()
            assert (run / "duplicates" / "calibration.json").is_file()
        else:
            assert pq.read_table(embeddings, columns=["path"]).num_rows == 64

    # The Serve config, deployed to the cluster with the run and a free port filled in.
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["run"] = str(run)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    deployed = subprocess.run(
        [SERVE, "deploy", str(tmp_path / "serve.yaml"), "--address", ray_head.address],
        cwd=ROOT, env=ray_head.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    wait_healthy(f"http://127.0.0.1:{port}/healthz", timeout_s=300)
    import requests

    health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["images"] == 64
    image = next(data.rglob("*.png"))
    answer = requests.post(
        f"http://127.0.0.1:{port}/search?k=3",
        data=image.read_bytes(),
        headers={"Content-Type": "image/png"},
        timeout=60,
    )
    assert answer.status_code == 200 and len(answer.json()["results"]) == 3
