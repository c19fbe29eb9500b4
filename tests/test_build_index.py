"""`imgsim index`: the contract's files, incremental re-runs, resuming an interrupted run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_pattern_image

from imgsim import model as model_lib
from imgsim.cli import main
from imgsim.runs import read_embeddings
from pipelines.build_index import build_index

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture
def run_copy(tiny_run: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    data, run = tiny_run
    shutil.copytree(data, tmp_path / "data")
    shutil.copytree(run, tmp_path / "run")
    build_index(str(tmp_path / "data"), str(tmp_path / "run"))  # index the copy's own paths
    return tmp_path / "data", tmp_path / "run"


def test_embeddings_parquet_follows_the_contract(tiny_run: tuple[Path, Path]) -> None:
    data, run = tiny_run
    table = pq.read_table(run / "index" / "embeddings.parquet")
    assert table.schema.field("path").type == pa.string()
    assert table.schema.field("label").type == pa.string()
    assert pa.types.is_integer(table.schema.field("cluster").type)
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    assert table.num_rows == 32
    assert set(table["label"].to_pylist()) == {"stripes-v", "stripes-h", "blob", "checks"}
    assert set(table["cluster"].to_pylist()) <= {0, 1, 2, 3}
    assert (run / "index" / "skipped.jsonl").read_text() == ""
    manifest = json.loads((run / "index" / "manifest.json").read_text())
    assert manifest["model_fingerprint"] == model_lib.fingerprint(run)


def test_incremental_rerun_embeds_only_what_changed(run_copy: tuple[Path, Path]) -> None:
    data, run = run_copy
    before, cols = read_embeddings(run, columns=("path",))
    old = dict(zip(cols["path"], before, strict=True))
    # one new image, one changed image, one removed image, one new bad file
    make_pattern_image(2, seed=4242).save(data / "blob" / "new.png")
    changed = data / "checks" / "00.png"
    make_pattern_image(0, seed=777).save(changed)
    os.utime(changed, ns=(10**18, 10**18))
    (data / "stripes-h" / "03.png").unlink()
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    summary = build_index(str(data), str(run))
    assert summary["embedded"] == 3  # new.png, changed 00.png, broken.png
    assert summary["reused"] == 30 and summary["removed"] == 1
    assert summary["images"] == 32 and summary["skipped"] == 1
    after, cols = read_embeddings(run, columns=("path",))
    new = dict(zip(cols["path"], after, strict=True))
    assert str(data / "stripes-h" / "03.png") not in new
    unchanged = [p for p in new if p in old and p != str(changed)]
    assert len(unchanged) == 30
    for p in unchanged:
        np.testing.assert_array_equal(new[p], old[p])  # reused, byte for byte
    skipped = [json.loads(line) for line in (run / "index" / "skipped.jsonl").read_text().splitlines()]
    assert skipped == [{"path": str(data / "broken.png"), "reason": skipped[0]["reason"]}]
    assert "truncated" in skipped[0]["reason"] or "not an image" in skipped[0]["reason"]
    # and a second re-run with nothing changed embeds nothing
    assert build_index(str(data), str(run))["embedded"] == 0


def test_a_different_model_means_a_full_re_embed(run_copy: tuple[Path, Path]) -> None:
    data, run = run_copy
    m = model_lib.load(run)
    m.emb_mean.add_(1.0)
    model_lib.save(m, run)
    summary = build_index(str(data), str(run))
    assert summary["embedded"] == 32 and summary["reused"] == 0


def test_an_interrupted_run_resumes_without_redoing_finished_parts(
    run_copy: tuple[Path, Path], monkeypatch
) -> None:
    data, run = run_copy
    import pipelines.build_index as bi

    monkeypatch.setattr(bi, "STAGING_ROWS", 8)
    old_index = (run / "index" / "knn.faiss").read_bytes()
    m = model_lib.load(run)  # a new model: every image must be embedded again
    m.emb_mean.add_(1.0)
    model_lib.save(m, run)
    with pytest.raises(RuntimeError, match="injected failure"):
        build_index(str(data), str(run), _fail_after_parts=2)
    # the old index is untouched by the failed run
    assert (run / "index" / "knn.faiss").read_bytes() == old_index
    staged = list(run.glob(".index-staging-*/part-*.parquet"))
    assert len(staged) == 2
    summary = build_index(str(data), str(run))
    assert summary["resumed"] == 16 and summary["embedded"] == 16
    assert not list(run.glob(".index-staging-*"))


def test_index_and_eval_through_the_cli(run_copy: tuple[Path, Path], capsys) -> None:
    data, run = run_copy
    assert main(["index", str(data), "--model", str(run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 32 and summary["embedded"] == 0
    assert main(["eval", "--model", str(run), "-k", "5", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for key in ("k", "queries", "database", "precision_at_1", "precision_at_k", "map_at_k"):
        assert key in metrics
    assert metrics["queries"] == 32 and metrics["database"] == 32
    assert metrics["precision_at_k"] > 0.5  # 4 distinct pattern classes are easy to tell apart
