"""`imgsim index`: the contract's files, incremental re-runs, resuming an interrupted run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_pattern_image
from PIL import Image

from bench.processes import kill_tree, wait_for
from imgsim.cli import main
from imgsim.data.rows import read_embeddings
from imgsim.models import autoencoder as model_lib
from pipelines.build_index import STAGING_ROWS, build_index

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


def test_added_images_are_appended_to_the_index_files(run_copy: tuple[Path, Path]) -> None:
    """Only new images: embeddings.parquet and files.parquet keep every previous row as it was and gain
    the new ones after them (`imgsim.io.parquet_append`: one more row group, not a rewrite), and a search
    finds a new image."""
    from imgsim.index.search import Searcher

    data, run = run_copy
    index = run / "index"
    before = {name: pq.read_table(index / name) for name in ("embeddings.parquet", "files.parquet")}
    groups = {name: pq.ParquetFile(index / name).metadata.num_row_groups for name in before}
    added = [data / "blob" / f"added{i}.png" for i in range(3)]
    for i, path in enumerate(added):
        make_pattern_image(i, seed=900 + i).save(path)
    summary = build_index(str(data), str(run))
    assert summary["embedded"] == 3 and summary["updated"] and summary["images"] == 35
    for name, old in before.items():
        now = pq.read_table(index / name)
        assert now.slice(0, old.num_rows).equals(old)
        assert sorted(now.slice(old.num_rows)["path"].to_pylist()) == sorted(map(str, added))
        assert pq.ParquetFile(index / name).metadata.num_row_groups == groups[name] + 1
    found = Searcher.load(run).search(str(added[1]), k=1)["results"][0]
    assert found["path"] == str(added[1]) and found["distance"] < 1e-4


def test_a_different_model_means_a_full_re_embed(run_copy: tuple[Path, Path]) -> None:
    data, run = run_copy
    m = model_lib.load(run)
    m.emb_mean.add_(1.0)
    model_lib.save(m, run)
    summary = build_index(str(data), str(run))
    assert summary["embedded"] == 32 and summary["reused"] == 0


@pytest.fixture(scope="module")
def many_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, list[Path]]:
    """(folder, good images, bad files): five staging parts' worth of small PNGs and 3 bad files
    (enough that a kill on the first staged part lands mid-run: a part takes ~0.6 s to embed)."""
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    good = 5 * STAGING_ROWS
    for i in range(good):
        folder = root / f"c{i % 4}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    bad = [root / "c0" / "broken.png", root / "c1" / "empty.jpg", root / "c2" / "text.png"]
    bad[0].write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    bad[1].write_bytes(b"")
    bad[2].write_text("not an image")
    return root, good, bad


def test_a_killed_index_run_resumes_from_what_it_staged(
    tiny_run: tuple[Path, Path], many_images: tuple[Path, int, list[Path]], tmp_path: Path
) -> None:
    # `imgsim index` is SIGKILLed once it has staged a part; the old index stays whole, and a
    # re-run embeds only the rest: every good image exactly once, exactly the bad ones skipped.
    data, good, bad = many_images
    run = tmp_path / "run"
    shutil.copytree(tiny_run[1], run)
    old_index = (run / "index" / "knn.faiss").read_bytes()
    driver = subprocess.Popen(
        [sys.executable, "-m", "imgsim.cli", "index", str(data), "--model", str(run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: list(run.glob(".index-staging-*/part-*.parquet")), 300, "a staged part", 0.01)
    finally:
        kill_tree(driver.pid)
    assert driver.wait(timeout=30) != 0
    assert (run / "index" / "knn.faiss").read_bytes() == old_index  # the old index is untouched
    staged = sum(pq.read_metadata(p).num_rows for p in run.glob(".index-staging-*/part-*.parquet"))
    assert 0 < staged < good + len(bad)
    summary = build_index(str(data), str(run))
    assert summary["resumed"] == staged and summary["embedded"] == good + len(bad) - staged
    table = pq.read_table(run / "index" / "embeddings.parquet", columns=["path"])
    paths = table["path"].to_pylist()
    assert len(paths) == len(set(paths)) == good
    skipped = [
        json.loads(line)["path"] for line in (run / "index" / "skipped.jsonl").read_text().splitlines()
    ]
    assert sorted(skipped) == sorted(str(p) for p in bad)
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
