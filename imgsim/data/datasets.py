"""The built-in default data set: Fashion-MNIST, written out as PNG folders.

The IDX files come from Debian's `dataset-fashion-mnist` package when it is installed, else from
the data set's official URLs (cached under ~/.cache/imgsim), else we fail with instructions.
"""

from __future__ import annotations

import gzip
import os
import struct
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from imgsim.console import progress

FASHION_MNIST_DIRS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DatasetUnavailable(RuntimeError):
    """The data set's files could be found neither on disk nor online."""


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array of its declared type and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{type_code:02x}")
    header_end = 4 + 4 * ndim
    if len(data) < header_end:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header_end])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header_end != expected:
        raise ValueError(f"{path}: IDX body is {len(data) - header_end} bytes, header promises {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header_end).reshape(shape)


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write `array` as a gzipped IDX file (used by tests and tooling)."""
    codes = {np.dtype(v).str: k for k, v in _IDX_DTYPES.items()}
    arr = np.asarray(array)
    big_endian = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    code = codes[np.dtype(big_endian.dtype).str]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + big_endian.tobytes())


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imgsim" / "fashion-mnist"


def find_fashion_mnist(search_dirs: Iterable[str] = FASHION_MNIST_DIRS, download: bool = True) -> Path:
    """Return a folder holding the four Fashion-MNIST IDX files, downloading them if needed."""
    names = [name for pair in _FILES.values() for name in pair]
    for d in [*search_dirs, str(_cache_dir())]:
        if all((Path(d) / n).is_file() for n in names):
            return Path(d)
    if not download:
        raise DatasetUnavailable("Fashion-MNIST not found")
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    try:
        for name in names:
            target = cache / name
            if target.is_file():
                continue
            tmp = target.with_suffix(".part")
            with urllib.request.urlopen(FASHION_MNIST_URL + name, timeout=60) as r, open(tmp, "wb") as f:
                f.write(r.read())
            os.replace(tmp, target)
    except OSError as e:
        raise DatasetUnavailable(
            f"Fashion-MNIST is not installed and could not be downloaded ({e}). "
            "Install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu) "
            f"or put the four IDX .gz files from {FASHION_MNIST_URL} into {cache}."
        ) from e
    return cache


def balanced_first(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Indices of the first `limit` items, balanced across classes (in original order)."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    classes = np.unique(labels)
    per_class, extra = divmod(limit, len(classes))
    chosen: list[np.ndarray] = []
    for i, c in enumerate(classes):
        take = per_class + (1 if i < extra else 0)
        chosen.append(np.flatnonzero(labels == c)[:take])
    return np.sort(np.concatenate(chosen))


@dataclass(frozen=True)
class WrittenDataset:
    root: Path
    counts: dict[str, int]


def write_fashion_mnist(
    out: str | os.PathLike[str], limit: int | None = None, source_dir: str | None = None
) -> WrittenDataset:
    """Write Fashion-MNIST as `out/{train,test}/<class>/<n>.png`; `limit` caps each split, balanced."""
    src = Path(source_dir) if source_dir else find_fashion_mnist()
    out = Path(out)
    counts: dict[str, int] = {}
    for split, (images_name, labels_name) in _FILES.items():
        images = read_idx(src / images_name)
        labels = read_idx(src / labels_name)
        if len(images) != len(labels):
            raise ValueError(f"{src}: {split} has {len(images)} images but {len(labels)} labels")
        keep = balanced_first(labels, limit)
        for name in FASHION_MNIST_CLASSES:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        for i in progress(keep, total=len(keep), desc=f"dataset {split}", unit="images"):
            target = out / split / FASHION_MNIST_CLASSES[int(labels[i])] / f"{int(i):05d}.png"
            if not target.exists():  # resumable; the rename means a present file is complete
                tmp = target.with_name(f".{target.name}.tmp")
                Image.fromarray(images[i]).save(tmp, format="PNG")
                os.replace(tmp, target)
        counts[split] = len(keep)
    return WrittenDataset(root=out, counts=counts)
