"""The deployment files: cluster.yaml passes the checks `ray up` runs before it contacts AWS, a
broken copy does not; the KubeRay manifests parse, run commands imgsim accepts, and the RayService's
Serve config passes Ray Serve's own schema and says what serve/config.yaml says."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"


def ray_up_checks(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does with the file before any cloud call (commands._bootstrap_config):
    merge the provider's defaults, then validate against ray/autoscaler/ray-schema.json and the
    node-type rules. Returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def kube_docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


# -- cluster.yaml (Ray cluster launcher) -----------------------------------------------------------


def test_cluster_yaml_passes_ray_up_validation() -> None:
    prepared = ray_up_checks(load_yaml(ROOT / "cluster.yaml"))

    assert prepared["provider"]["type"] == "aws"
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert not head["resources"].get("GPU"), "the head should be a CPU node"
    (gpu,) = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= prepared["max_workers"]

    # The working tree is mounted and installed on every node; torch is the CPU build on the head
    # and a CUDA build on the GPU workers (requirements.lock's pin alone would pull CUDA everywhere).
    assert prepared["file_mounts"].get("~/imgsim") == "."
    head_cmds = " ; ".join(prepared["head_setup_commands"])
    worker_cmds = " ; ".join(prepared["worker_setup_commands"])
    for cmds in (head_cmds, worker_cmds):
        assert "-r ~/imgsim/requirements.lock" in cmds and "-e ~/imgsim" in cmds
    assert "download.pytorch.org/whl/cpu" in head_cmds
    assert "download.pytorch.org/whl/cu" in worker_cmds
    for image in (prepared["docker"]["head_image"], prepared["docker"]["worker_image"]):
        assert f":{ray.__version__}-" in image, f"{image} does not match Ray {ray.__version__}"


def _typo_top_level(c: dict) -> None:
    c["max_worker"] = c.pop("max_workers")


def _no_node_config(c: dict) -> None:
    del c["available_node_types"]["gpu_worker"]["node_config"]


def _gpu_count_not_a_number(c: dict) -> None:
    c["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"


def _unknown_head_type(c: dict) -> None:
    c["head_node_type"] = "ray.head.default"


def _min_above_max(c: dict) -> None:
    c["available_node_types"]["gpu_worker"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize(
    ("breakage", "error"),
    [
        (_typo_top_level, "'max_worker' was unexpected"),
        (_no_node_config, "'node_config' is a required property"),
        (_gpu_count_not_a_number, "'one' is not of type 'integer'"),
        (_unknown_head_type, "must be one of `available_node_types`"),
        (_min_above_max, "smaller than the sum of `min_workers`"),
    ],
)
def test_broken_cluster_yaml_is_rejected(breakage: Any, error: str) -> None:
    import jsonschema

    config = load_yaml(ROOT / "cluster.yaml")
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(error)):
        ray_up_checks(config)


# -- KubeRay manifests ----------------------------------------------------------------------------


def test_kuberay_manifests_parse_and_agree() -> None:
    cluster_docs = kube_docs("raycluster.yaml")
    raycluster = by_kind(cluster_docs, "RayCluster")
    rayjob = by_kind(kube_docs("rayjob-index.yaml"), "RayJob")
    rayservice = by_kind(kube_docs("rayservice.yaml"), "RayService")
    claim = by_kind(cluster_docs, "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]

    for doc in (raycluster, rayjob, rayservice):
        assert doc["apiVersion"] == "ray.io/v1"
    cluster_specs = [raycluster["spec"], rayservice["spec"]["rayClusterConfig"]]
    for spec in cluster_specs:
        assert spec["rayVersion"] == ray.__version__
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            assert all(isinstance(v, str) for v in group["rayStartParams"].values())
            pod = group["template"]["spec"]
            claims = {
                v["persistentVolumeClaim"]["claimName"]
                for v in pod["volumes"]
                if "persistentVolumeClaim" in v
            }
            assert claims == {claim["metadata"]["name"]}, "every pod needs the shared run volume"
        for worker in spec["workerGroupSpecs"]:
            assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]

    gpu_groups = [
        g
        for g in raycluster["spec"]["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert len(gpu_groups) == 1 and gpu_groups[0]["minReplicas"] == 0
    assert rayjob["spec"]["clusterSelector"] == {"ray.io/cluster": raycluster["metadata"]["name"]}


def test_rayjob_entrypoint_is_a_valid_build_index_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parse the RayJob's entrypoint with the real `python -m pipelines.build_index` argument parser."""
    import pipelines.build_index as job
    from imgsim.cli import main_for

    rayjob = by_kind(kube_docs("rayjob-index.yaml"), "RayJob")
    raycluster = by_kind(kube_docs("raycluster.yaml"), "RayCluster")
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipelines.build_index"]

    calls: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(job, "build_index", lambda *a, **kw: calls.append((a, kw)) or {})
    monkeypatch.setattr("pipelines.commands.index.print_json", lambda obj: None)
    assert main_for("index", [*argv[3:], "--json"]) == 0
    ((data, run), options) = calls[0]
    assert data.startswith("s3://") and run.startswith("/mnt/imgsim/")
    if options["use_gpu"]:
        (gpu,) = [g for g in raycluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
        assert options["concurrency"] <= gpu["maxReplicas"], "more GPU actors than GPU pods"


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": [1]}} → {"a.b.0": 1}, so a mismatch names the setting that differs."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, v in items:
        out.update(_flatten(v, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _without_site_values(config: dict[str, Any]) -> dict[str, Any]:
    """The Serve config minus what must differ between a laptop and a pod: the run path, the host."""
    config = copy.deepcopy(config)
    config["http_options"].pop("host")
    for app in config["applications"]:
        app["args"].pop("run")
    return config


def test_rayservice_serve_config_is_valid_and_matches_serve_config_yaml() -> None:
    from ray.serve.schema import ServeDeploySchema

    rayservice = by_kind(kube_docs("rayservice.yaml"), "RayService")
    kube = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    local = load_yaml(ROOT / "serve" / "config.yaml")
    ServeDeploySchema.model_validate(kube)  # what `serve deploy` and KubeRay's PUT run
    ServeDeploySchema.model_validate(local)

    kube_flat, local_flat = _flatten(_without_site_values(kube)), _flatten(_without_site_values(local))
    differ = {k: (kube_flat.get(k), local_flat.get(k)) for k in kube_flat.keys() | local_flat.keys()}
    differ = {k: v for k, v in differ.items() if v[0] != v[1]}
    assert not differ, f"rayservice.yaml's serveConfigV2 vs serve/config.yaml (kube, local): {differ}"
    assert kube["http_options"]["host"] == "0.0.0.0"
    (app,) = kube["applications"]
    assert app["args"]["run"].startswith("/mnt/imgsim/"), "run must be on the shared volume"

    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(__import__(module, fromlist=[attr]), attr))


def test_broken_serve_config_is_rejected() -> None:
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    rayservice = by_kind(kube_docs("rayservice.yaml"), "RayService")
    kube = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    no_import = copy.deepcopy(kube)
    del no_import["applications"][0]["import_path"]
    bad_log = copy.deepcopy(kube)
    bad_log["logging_config"]["log_levle"] = "INFO"
    for broken in (no_import, bad_log):
        with pytest.raises(ValidationError):
            ServeDeploySchema.model_validate(broken)
