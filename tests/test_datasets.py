"""The Fashion-MNIST reader and writer, on tiny IDX files the test writes itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgsim.data.datasets import (
    FASHION_MNIST_CLASSES,
    balanced_first,
    read_idx,
    write_fashion_mnist,
    write_idx,
)


def _fake_fashion_mnist(folder: Path, n_train: int = 40, n_test: int = 20) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)


def test_idx_round_trip(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    back = read_idx(tmp_path / "a.gz")
    assert back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, arr)


def test_idx_rejects_truncated_and_bad_magic(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    # header promises 10 bytes, body has 3
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="promises"):
        read_idx(tmp_path / "short")


def test_balanced_first_takes_each_class_equally() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 1, 2])
    idx = balanced_first(labels, 6)
    assert sorted(np.bincount(labels[idx]).tolist()) == [2, 2, 2]
    assert list(idx) == sorted(idx)
    assert len(balanced_first(labels, None)) == len(labels)


def test_write_fashion_mnist_folders(tmp_path: Path) -> None:
    src = tmp_path / "idx"
    src.mkdir()
    _fake_fashion_mnist(src)
    written = write_fashion_mnist(tmp_path / "out", limit=20, source_dir=str(src))
    assert written.counts == {"train": 20, "test": 20}
    for split in ("train", "test"):
        classes = sorted(p.name for p in (tmp_path / "out" / split).iterdir())
        assert classes == sorted(FASHION_MNIST_CLASSES)
        pngs = list((tmp_path / "out" / split).rglob("*.png"))
        assert len(pngs) == 20
        assert all(len(list((tmp_path / "out" / split / c).glob("*.png"))) == 2 for c in classes)
    img = Image.open(next((tmp_path / "out" / "train" / "t-shirt").glob("*.png")))
    assert img.size == (28, 28) and img.mode == "L"
    # pixels are the IDX pixels, not re-encoded approximations
    first = sorted((tmp_path / "out" / "train" / "t-shirt").glob("*.png"))[0]
    raw = read_idx(src / "train-images-idx3-ubyte.gz")[int(first.stem)]
    np.testing.assert_array_equal(np.asarray(Image.open(first)), raw)
