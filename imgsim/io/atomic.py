"""Atomic writes: readers see the old version of a file or directory, or the new one, never half.

- `atomic_write_bytes` / `atomic_write_json`: one file, written to a temporary name beside its
  target and renamed into place (`os.replace`).
- `temp_path_beside`: a temporary file name beside a target, for writers that need a path
  (matplotlib, pyarrow); the caller renames it into place.
- `staging_dir` + `replace_dir`: a whole directory (the index, the KMeans centroids), filled beside
  its target and swapped in: one atomic exchange on Linux (renameat2 RENAME_EXCHANGE), elsewhere
  two renames whose crash window `recover_dir` repairs by restoring the previous version.

Every model, index, plot and report imgsim writes goes through this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

#: Staging directories older than this (seconds) were left by a killed writer and are removed.
STALE_STAGING_S = 3600


def temp_path_beside(path: str | os.PathLike[str]) -> Path:
    """A fresh temporary path in the same directory as `path` (for writers that need a filename).

    Write there, then `os.replace(tmp, path)`; the caller removes it on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = temp_path_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# -- whole directories ----------------------------------------------------------------------------
def staging_dir(target: Path) -> Path:
    """A fresh empty directory beside `target`, to be filled and then swapped in by `replace_dir`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root`, and the directories, to disk before the swap."""
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover_dir(target: Path) -> None:
    """Put back the previous version of `target` if a save died between its two renames."""
    if target.exists():
        return
    aside = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if aside:
        with contextlib.suppress(OSError):  # another process may be recovering it right now
            os.replace(aside[-1], target)


def _remove_stale(target: Path) -> None:
    """Delete what killed writers left beside `target`: set-aside old versions, old staging dirs."""
    now = time.time()
    for p in target.parent.glob(f".{target.name}.*"):
        stale = ".old-" in p.name or (p.suffix == ".tmp" and now - p.stat().st_mtime > STALE_STAGING_S)
        if stale and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def replace_dir(tmp: Path, target: Path) -> None:
    """Swap the complete directory `tmp` into place at `target`, then delete the old version."""
    _fsync_tree(tmp)
    recover_dir(target)
    if target.exists() and _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old version
    else:
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    _remove_stale(target)


@contextlib.contextmanager
def writing_dir(target: str | os.PathLike[str]):
    """`with writing_dir(target) as tmp:` fill `tmp`; on a clean exit it replaces `target` whole,
    on an exception it is removed and `target` is untouched."""
    target = Path(target)
    tmp = staging_dir(target)
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
