"""The run-directory layout: the one place that knows where a run keeps each file."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunPaths:
    """Paths inside a run directory (see docs/architecture.md)."""

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def embeddings(self) -> Path:
        return self.index_dir / "embeddings.parquet"

    @property
    def skipped(self) -> Path:
        return self.index_dir / "skipped.jsonl"

    @property
    def manifest(self) -> Path:
        return self.index_dir / "manifest.json"


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def temp_path_beside(path: str | os.PathLike[str]) -> Path:
    """A fresh temporary path in the same directory as `path` (for writers that need a filename).

    Write there, then `os.replace(tmp, path)`; the caller removes it on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def embedding_matrix(table: Any) -> Any:
    """The `embedding` column of a pyarrow table as a float32 (N, D) array."""
    import numpy as np

    col = table["embedding"].combine_chunks()
    if len(col) == 0:
        return np.zeros((0, 0), np.float32)
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), -1)


def read_embeddings(
    run: str | os.PathLike[str], columns: tuple[str, ...] = ("path", "label", "cluster")
) -> tuple[Any, dict[str, list]]:
    """(embeddings (N, D) float32, {column: values}) from RUN/index/embeddings.parquet."""
    import pyarrow.parquet as pq

    from imgsim.errors import RunNotFound

    path = RunPaths(run).embeddings
    if not path.is_file():
        raise RunNotFound(f"no index in {run} — run `imgsim index DATA --model {run}` first")
    table = pq.read_table(path, columns=["embedding", *columns])
    return embedding_matrix(table), {c: table[c].to_pylist() for c in columns}
