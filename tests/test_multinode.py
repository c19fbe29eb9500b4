"""Multi-node for real: a three-node Ray cluster on this machine (`ray.cluster_utils.Cluster`).

Every node is a separate raylet with its own object store, 1 CPU and a custom resource naming it,
so anything that needs two CPUs at once must use two nodes, and a task asking for a node's resource
proves where it ran. On it: Ray Train puts its two workers on different nodes and the run learns;
`build_index` runs its embedding actors on different nodes and stores the embeddings a single
process computes for the same files.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_pattern_folder

NODE_NAMES = ("node_head", "node_a", "node_b")  # custom resource per node: {name: 1}
OBJECT_STORE_BYTES = 100 * 1024**2  # per node; Ray's minimum is 75 MiB


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A head and two worker nodes, the driver connected; the session's runtime restored after."""
    import ray
    import ray._common.utils
    import ray._private.utils
    from ray.cluster_utils import Cluster

    had_session_runtime = ray.is_initialized()
    if had_session_runtime:
        ray.shutdown()  # a driver talks to one cluster at a time
    temp_dir = tempfile.mkdtemp(prefix="imgsim-mn-", dir="/tmp")  # short: socket paths live here
    with pytest.MonkeyPatch.context() as mp:
        # Cluster records its address in ray_current_cluster in Ray's temp folder, where every `ray.init()`
        # on this machine (other test runs, other users) would find and join it. Keep it private.
        mp.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
        mp.setattr(ray._common.utils, "reset_ray_address", lambda *args, **kwargs: None)
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "object_store_memory": OBJECT_STORE_BYTES,
                "resources": {NODE_NAMES[0]: 1},
                "include_dashboard": False,
                "temp_dir": temp_dir,
            },
        )
        try:
            for name in NODE_NAMES[1:]:
                cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES, resources={name: 1})
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
    if had_session_runtime:  # as tests/conftest.py's ray_session started it
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)


def node_names() -> dict[str, str]:
    """Node ID → our name for it, from the custom resource each node carries."""
    import ray

    names = {}
    for node in ray.nodes():
        if node["Alive"]:
            (name,) = [n for n in NODE_NAMES if n in node["Resources"]]
            names[node["NodeID"]] = name
    return names


def actor_nodes(class_fragment: str) -> list[str]:
    """Names of the nodes that ran actors whose class name contains `class_fragment` (dead ones too).

    Reads the GCS actor table, which keeps finished actors with the node they ran on. (The public
    `ray.util.state.list_actors` reads the same table but needs the dashboard, which this cluster
    does not start: on two CPU cores it costs more than the rest of the test.)
    """
    import ray._private.state

    names = node_names()
    return [
        names.get(info["Address"]["NodeID"], info["Address"]["NodeID"])
        for info in ray._private.state.actors().values()
        if class_fragment in info["ActorClassName"]
    ]


@pytest.fixture(scope="module")
def multinode_run(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Train on the cluster with 2 workers; record where the workers ran."""
    from pipelines.train import train

    base = tmp_path_factory.mktemp("multinode")
    data = write_pattern_folder(base / "data", per_class=4)
    run = base / "run"
    summary = train(
        str(data),
        str(run),
        epochs=2,
        image_size=16,
        dim=8,
        batch_size=8,
        lr=3e-3,
        workers=2,
        threads_per_worker=1,
    )
    return {"data": data, "run": run, "summary": summary, "worker_nodes": actor_nodes("RayTrainWorker")}


def test_cluster_has_three_nodes_each_reachable_by_its_resource(cluster: Any) -> None:
    import ray

    @ray.remote(num_cpus=0)
    def where() -> str:
        return ray.get_runtime_context().get_node_id()

    names = node_names()
    assert sorted(names.values()) == sorted(NODE_NAMES)
    ran_on = ray.get([where.options(resources={n: 0.01}).remote() for n in NODE_NAMES])
    assert [names[node_id] for node_id in ran_on] == list(NODE_NAMES)
    assert ray.cluster_resources()["CPU"] == len(NODE_NAMES)


def test_training_spreads_workers_across_nodes_and_learns(multinode_run: dict[str, Any]) -> None:
    from imgsim.models import autoencoder as model_lib

    workers = multinode_run["worker_nodes"]
    assert len(workers) >= 2, f"expected 2 Ray Train workers in the actor table, found {workers}"
    assert len(set(workers)) >= 2, f"both training workers ran on one node: {workers}"
    assert set(workers) <= set(NODE_NAMES), f"workers on unknown nodes: {workers}"

    summary = multinode_run["summary"]
    losses = [h["loss"] for h in summary["history"]]
    assert summary["epochs"] == 2 and len(losses) == 2
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], f"loss did not decrease: {losses}"

    model = model_lib.load(multinode_run["run"])
    images = np.random.default_rng(0).integers(
        0, 256, size=(3, model.config.channels, 16, 16), dtype=np.uint8
    )
    emb = model.embed(images)
    assert emb.shape == (3, 8) and emb.dtype == np.float32 and np.isfinite(emb).all()


def test_index_embeds_across_nodes_same_as_one_process(multinode_run: dict[str, Any]) -> None:
    from imgsim.data.decode import decode_image
    from imgsim.models import autoencoder as model_lib
    from pipelines.build_index import build_index

    data, run = multinode_run["data"], multinode_run["run"]
    summary = build_index(str(data), str(run), clusters=4, concurrency=2)
    assert summary["images"] == 16 and summary["skipped"] == 0

    embedders = actor_nodes("Embedder")
    assert len(set(embedders)) >= 2, f"embedding actors did not spread across nodes: {embedders}"

    table = pq.read_table(Path(run) / "index" / "embeddings.parquet")
    paths = table["path"].to_pylist()
    stored = np.asarray(table["embedding"].to_pylist(), dtype=np.float32)
    model = model_lib.load(run)
    cfg = model.config
    images = np.stack([decode_image(Path(p).read_bytes(), cfg.image_size, cfg.channels) for p in paths])
    expected = model.embed(images)
    assert sorted(paths) == sorted(str(p) for p in Path(data).rglob("*.png"))
    np.testing.assert_allclose(stored, expected, atol=1e-5, rtol=0)
