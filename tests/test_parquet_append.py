"""Appending row groups to a copy of a Parquet file (`imgsim.io.parquet_append`): what an incremental
`imgsim index` does to embeddings.parquet and files.parquet instead of writing them whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgsim.data.rows import embedding_array
from imgsim.io.parquet_append import append_rows


def _rows(start: int, n: int) -> pa.Table:
    rng = np.random.default_rng(start)
    return pa.table(
        {
            "path": pa.array([f"/data/d{i % 7}/{i:06d}.png" for i in range(start, start + n)], pa.string()),
            "label": pa.array(
                [None if i % 5 == 0 else f"d{i % 7}" for i in range(start, start + n)], pa.string()
            ),
            "cluster": pa.array(np.arange(start, start + n) % 4, pa.int64()),
            "embedding": embedding_array(rng.standard_normal((n, 8)).astype(np.float32)),
        }
    )


@pytest.fixture
def old(tmp_path: Path) -> Path:
    path = tmp_path / "old.parquet"
    with pq.ParquetWriter(path, _rows(0, 1).schema, use_dictionary=["label", "cluster"]) as w:
        for start in range(0, 3000, 1000):  # three row groups
            w.write_table(_rows(start, 1000))
    return path


def test_appended_file_reads_as_old_rows_then_new(old: Path, tmp_path: Path) -> None:
    target = tmp_path / "new.parquet"
    new = [_rows(3000, 500), _rows(3500, 250)]
    before = old.read_bytes()
    assert append_rows(old, new, target, use_dictionary=["label", "cluster"])
    assert old.read_bytes() == before  # the old file is only read
    expected = pa.concat_tables([pq.read_table(old), *new])
    assert pq.read_table(target).equals(expected)
    assert pq.ParquetFile(target).metadata.num_row_groups == 3 + 2
    # filters and column reads go through the new footer's offsets too
    got = pq.read_table(target, columns=["path"], filters=[("cluster", "==", 3)])["path"].to_pylist()
    assert got == expected.filter(pa.compute.equal(expected["cluster"], 3))["path"].to_pylist()
    # and a file made this way can be appended to again
    again = tmp_path / "again.parquet"
    assert append_rows(target, [_rows(4000, 10)], again)
    assert pq.read_table(again).equals(pa.concat_tables([expected, _rows(4000, 10)]))


def test_nothing_new_gives_the_same_rows(old: Path, tmp_path: Path) -> None:
    target = tmp_path / "new.parquet"
    assert append_rows(old, [], target)
    assert pq.read_table(target).equals(pq.read_table(old))


def test_what_it_does_not_handle_is_left_to_the_caller(old: Path, tmp_path: Path) -> None:
    """False, and no target file, for rows of another schema, a file with page indexes (their page
    offsets would move) and a file that is not Parquet: the caller then writes the file whole."""
    target = tmp_path / "new.parquet"
    assert not append_rows(old, [_rows(3000, 10).drop_columns(["label"])], target)
    assert not append_rows(old, [_rows(3000, 10).append_column("extra", pa.array(range(10)))], target)
    indexed = tmp_path / "indexed.parquet"
    pq.write_table(_rows(0, 100), indexed, write_page_index=True)
    assert not append_rows(indexed, [_rows(100, 10)], target)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all, just some bytes")
    assert not append_rows(junk, [_rows(0, 10)], target)
    assert not target.exists()


def test_a_full_disk_is_an_os_error_and_the_old_file_stays(tmp_path: Path) -> None:
    """On a filesystem without room for the copy, the disk's error reaches the caller (which ends the
    index run with its one-line DiskFull error and removes the half-written directory)."""
    from bench.faults import fill, small_filesystem
    from imgsim.errors import disk_full

    with small_filesystem(8) as mount:
        if mount is None:
            pytest.skip("mounting a tmpfs is not permitted here")
        old = mount / "old.parquet"
        pq.write_table(_rows(0, 20_000), old)  # ~1 MB
        before = old.read_bytes()
        fill(mount, leave_bytes=len(before) // 2)
        with pytest.raises(OSError) as raised:
            append_rows(old, [_rows(20_000, 10)], mount / "new.parquet")
        assert disk_full(raised.value)
        assert old.read_bytes() == before
