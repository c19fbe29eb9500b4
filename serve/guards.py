"""What keeps one replica bounded under hostile input: memory for large decodes, and what results show.

- `LargeDecodes`: queries of more than `imgsim.data.decode.STRIP_REDUCE_PIXELS` decode a few at a time
  per replica (`ServeConfig.large_decodes`); each holds one full-size pixel buffer while it decodes
  (`imgsim.data.decode.prepare_image` reduces strip by strip), so the replica holds at most that many.
- `bound_allocator()`: glibc returns large blocks to the kernel as soon as they are freed (a fixed
  mmap threshold; its default rises after the first large free, after which freed pixel buffers
  stayed in the heap: a replica kept 3.5 GB after three large queries), and `release_memory()`
  trims the heaps after a large decode.
- `PathShown`: how a result's `path` is shown (`imgsim serve --paths relative|absolute|none`).

Imports no Ray; the replica (`serve.app.ImgsimSearch`) uses these.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
from collections.abc import Sequence

from imgsim.config import PATHS_CHOICES
from imgsim.errors import ImgsimError

#: glibc's mallopt parameter for the mmap threshold, and the threshold set: allocations at least this
#: large are mapped on their own and unmapped when freed.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def bound_allocator() -> bool:
    """Fix glibc's mmap threshold for this process (True if it could: glibc only)."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    return bool(mallopt and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def release_memory() -> None:
    """Hand freed heap memory back to the kernel (glibc's malloc_trim; nothing elsewhere)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


class LargeDecodes:
    """At most `limit` large decodes at once in this replica (an asyncio semaphore: waiting requests
    hold no thread)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._semaphore: asyncio.Semaphore | None = None

    def semaphore(self) -> asyncio.Semaphore:
        if self._semaphore is None:  # created on the replica's event loop, at the first large query
            self._semaphore = asyncio.Semaphore(self.limit)
        return self._semaphore


class PathShown:
    """A result's `path` as `imgsim serve --paths` says: "relative" to the indexed folder (an image
    outside it shows its file name only), "absolute" (as indexed), or "none" (null)."""

    def __init__(self, mode: str, root: str | None) -> None:
        if mode not in PATHS_CHOICES:
            raise ImgsimError(f"unknown --paths {mode!r}: choose one of {', '.join(PATHS_CHOICES)}")
        self.mode = mode
        self.root = root.rstrip("/") + "/" if root else None

    @classmethod
    def for_paths(cls, mode: str, data_root: str | None, paths: Sequence[str | None]) -> PathShown:
        """The indexed folder is the index's data root when it is known and holds the paths, else the
        folder the indexed paths share."""
        first, last = _extremes(paths)
        root = data_root
        if root and not data_root.startswith("s3://"):
            root = os.path.abspath(root)
        if first is not None and (not root or not (first.startswith(root) and last.startswith(root))):
            root = _shared_folder(first, last)
        return cls(mode, root)

    def __call__(self, path: str | None) -> str | None:
        if path is None or self.mode == "absolute":
            return path
        if self.mode == "none":
            return None
        if self.root and path.startswith(self.root):
            return path[len(self.root) :]
        return path.rsplit("/", 1)[-1]


def _extremes(paths: Sequence[str | None]) -> tuple[str | None, str | None]:
    """The lexicographically first and last path (their shared prefix is every path's)."""
    values = getattr(paths, "_values", None)  # imgsim.index.search.TextColumn: Arrow, no Python list
    if values is not None:
        import pyarrow.compute as pc

        extremes = pc.min_max(values)
        return extremes["min"].as_py(), extremes["max"].as_py()
    present = [p for p in paths if p is not None]
    return (min(present), max(present)) if present else (None, None)


def _shared_folder(a: str, b: str) -> str | None:
    prefix = os.path.commonprefix([a, b])
    cut = prefix.rfind("/")
    return prefix[: cut + 1] if cut >= 0 else None
