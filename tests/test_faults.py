"""Faults injected from outside, as they happen to users: an embedding actor SIGKILLed, a Serve
replica SIGKILLed under load, the S3 server stopped mid-ingest, the disk filling up while the index
is written. The scenarios are `bench.faults`' (which also times them); these tests assert what
users rely on. (The Ray Train worker and the `imgsim index` driver are killed in test_train.py and
test_build_index.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bench import faults


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder shared by the module's faults: the small trained run is made once."""
    return tmp_path_factory.mktemp("faults")


@pytest.mark.slow
def test_a_killed_embedding_actor_is_replaced_and_every_image_is_indexed_once(
    work: Path, ray_session: None
) -> None:
    row = faults.embed_actor_killed(work, n=14_000)
    assert row.recovered, row.note
    assert row.lost == 0 and row.errors == 0  # every good image exactly once, the bad ones skipped
    summary = row.details["summary"]
    assert summary["images"] == 14_000 and summary["skipped"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("ingress", ["haproxy", "proxy"])
def test_a_killed_serve_replica_is_replaced_under_load(work: Path, ingress: str) -> None:
    row = faults.serve_replica_killed(work, ingress)
    if row.note.startswith("skipped"):
        pytest.skip(row.note)
    assert row.details["during"] > 0 and row.details["after"] > 0
    assert row.details["failed_during"] <= 0.01 * row.details["during"], row.note
    assert row.recovered, row.note  # and no error once the new replica answers
    assert row.seconds_to_recover is not None


@pytest.mark.slow
def test_reads_are_retried_while_the_s3_server_is_down(work: Path) -> None:
    row = faults.s3_outage(work, n=6000)
    assert row.recovered, row.note
    run = row.details["run"]
    # the object deleted during the outage is skipped with its reason, never silently missing
    assert "vanished" in row.details["reasons"][row.details["gone"]]
    assert len(row.details["reasons"]) == 1
    indexed = pq.read_table(run / "index" / "embeddings.parquet", columns=["path"])["path"].to_pylist()
    assert len(indexed) == len(set(indexed)) == 5999


@pytest.mark.slow
def test_a_full_disk_while_indexing_leaves_the_previous_index_served(work: Path) -> None:
    row = faults.disk_full(work, n=6000)
    if row.note.startswith("skipped"):
        pytest.skip(row.note)
    lines = [line for line in row.details["stderr"].splitlines() if line.startswith("imgsim: error")]
    assert len(lines) == 1 and "no space left" in lines[0], row.details["stderr"][-2000:]
    assert row.details["intact"], row.note  # model and index byte for byte as before
    assert row.recovered, row.note  # still served the same answers; a re-run works once there is room


def test_rows_are_json_with_the_contract_fields() -> None:
    row = faults.Row("x", True, 0, 0, 1.5, "note", {"run": Path("/tmp")})
    assert json.loads(json.dumps([row.as_dict()])) == [
        {"fault": "x", "recovered": True, "lost": 0, "errors": 0, "seconds_to_recover": 1.5, "note": "note"}
    ]
