"""Progress display for long steps: a tqdm bar on a terminal, sparse log lines otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(
    iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it"
) -> Iterator[T]:
    """Wrap `iterable` in a progress bar written to stderr (so `--json` stdout stays clean)."""
    return iter(bar(total, desc, unit, iterable))


def bar(total: int | None, desc: str = "", unit: str = "it", iterable: Iterable[T] | None = None) -> tqdm:
    """A manual progress bar (call `.update(n)`; close it or use it as a context manager)."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
    )


def log(message: str) -> None:
    """A status line for people, on stderr (stdout is kept for results, e.g. `--json`)."""
    print(message, file=sys.stderr, flush=True)
