"""Progress for long steps, on the console (`imgsim.console.output.stream()`, the user's stderr).

- On a terminal: one live bar per stage (count, rate, ETA), replaced by one summary line when the
  stage ends.
- Otherwise (CI, `ray job submit` logs, a pipe): a plain line every `PLAIN_INTERVAL_S` seconds
  while the stage runs (at most about ten per stage), then the same summary line.

Every stage ends in one line `<stage>: <done>/<total> <unit> (100%) in <time>, <rate>/s[, notes]`,
so a log reader (or a test) sees each stage reach 100 %. stdout is never used: it carries results
(`--json`).

    with bar(len(todo), "embed", "images") as p:  p.update(n)
    for x in progress(items, len(items), "eval", "queries"): ...
    with stage("KMeans", len(emb), "embeddings") as p:  fit(...); p.note("4 clusters")
    log("skipped 3 files that are not images: list in RUN/index/skipped.jsonl")
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from imgsim.console import output as console

T = TypeVar("T")

PLAIN_INTERVAL_S = 10.0  # seconds between plain progress lines when the console is not a terminal ...
PLAIN_MIN_STEP = 0.1  # ... and the share of the total done between two of them (at most ~10 a stage)
TICK_S = 0.5  # a terminal bar of a step without intermediate counts is redrawn this often


def log(message: str) -> None:
    """One line for people on the console (stdout is kept for results, e.g. `--json`)."""
    out = console.stream()
    print(message, file=out, flush=True)


def debug(message: str) -> None:
    """A line shown only with `--verbose` / IMGSIM_LOG=debug."""
    if console.verbose():
        log(message)


def seconds(s: float) -> str:
    """A duration for people: 4.2 s, 3 min 05 s, 1 h 02 min."""
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _rate(n: float, elapsed: float, unit: str) -> str:
    r = n / elapsed if elapsed > 0 else 0.0
    return f"{r:,.0f} {unit}/s" if r >= 10 else f"{r:.1f} {unit}/s"


def _width() -> dict[str, Any]:
    """tqdm's width option: follow the terminal, or 100 columns for one that reports no size."""
    try:
        columns = os.get_terminal_size(console.stream().fileno()).columns
    except (AttributeError, ValueError, OSError):
        columns = 0
    return {"dynamic_ncols": True} if columns > 0 else {"ncols": 100}


class Progress:
    """One stage's progress: a live bar on a terminal, sparse plain lines otherwise; one summary
    line when it closes. `update(n)` adds, `set(n)` sets the count; `note(text)` adds details
    (shown beside the bar and in the summary). Thread-safe enough for one updating thread."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        *,
        show_rate: bool = True,
        tick: bool = False,
        interval_s: float = PLAIN_INTERVAL_S,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self.notes = ""
        self.summary: str | None = None  # replaces the summary line when set
        self.show_rate = show_rate
        self.interval_s = interval_s
        self.started = time.perf_counter()
        self._last_line = self.started
        self._n_last_line = 0
        self._first: tuple[int, float] | None = None  # (count, time) of the first update: ETA from there
        self._closed = False
        self._bar: Any = None
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        if console.is_terminal():
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total,
                desc=desc,
                unit=f" {unit}",
                file=console.stream(),
                leave=False,
                mininterval=0.2,
                # no total: the stage's clock ("start Ray: 00:04"; "list DATA: 00:02")
                bar_format=None if total is not None else "{desc}: {elapsed}",
                **_width(),
            )
            if tick:
                self._ticker = threading.Thread(target=self._tick, name="imgsim-progress", daemon=True)
                self._ticker.start()

    # -- updates -------------------------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        self.set(self.n + n)

    def set(self, n: int) -> None:
        """Set the count (it may go down, e.g. training restarted from a checkpoint)."""
        delta, self.n = n - self.n, n
        if self._first is None and n > 0:
            self._first = (n, time.perf_counter())
        if self._bar is not None:
            if delta >= 0:
                self._bar.update(delta)
            else:
                self._bar.n = n
                self._bar.refresh()
        elif (
            self.total is None or n < self.total
        ) and time.perf_counter() - self._last_line >= self.interval_s:
            self._last_line = time.perf_counter()
            log(self.line())

    def _plain_line_due(self) -> bool:
        if time.perf_counter() - self._last_line < self.interval_s:
            return False
        if self.total is None:
            return True
        return self.n < self.total and self.n - self._n_last_line >= PLAIN_MIN_STEP * self.total

    def set_total(self, total: int | None) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def note(self, text: str) -> None:
        """Details shown beside the count (e.g. "epoch 2/8, loss 0.0812")."""
        self.notes = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            if self._bar is not None:
                self._bar.refresh()

    # -- lines ---------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def line(self, *, final: bool = False) -> str:
        """The plain progress line, or (final) the summary line."""
        elapsed = time.perf_counter() - self.started
        parts = []
        if self.total is not None:
            pct = 100.0 * self.n / self.total if self.total else 100.0
            parts.append(f"{self.n:,}/{self.total:,} {self.unit} ({pct:.0f}%)")
        elif self.n:
            parts.append(f"{self.n:,} {self.unit}")
        if final:
            parts[-1:] = [f"{parts[-1]} in {seconds(elapsed)}"] if parts else [f"done in {seconds(elapsed)}"]
        if final and self.show_rate and self.n and elapsed > 0:
            parts.append(_rate(self.n, elapsed, self.unit))  # end to end
        rate = self._steady_rate()
        if not final and rate:
            if self.show_rate:
                parts.append(_rate(rate, 1.0, self.unit))
            if self.total:
                parts.append(f"ETA {seconds((self.total - self.n) / rate)}")
        if self.notes:
            parts.append(self.notes)
        return f"{self.desc}: " + ", ".join(parts)

    def _steady_rate(self) -> float:
        """Items per second since the first update (start-up time before it says nothing of the ETA)."""
        if self._first is None:
            return 0.0
        n0, t0 = self._first
        dt = time.perf_counter() - t0
        return (self.n - n0) / dt if self.n > n0 and dt > 0 else 0.0

    def close(self, failed: bool = False) -> None:
        """Remove the bar and print the summary line (or where the stage stopped, if it failed)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
        if self._bar is not None:
            self._bar.close()
        if failed:
            log(f"{self.line()} — stopped")
        else:
            log(self.summary or self.line(final=True))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(failed=exc_type is not None)


def bar(total: int | None, desc: str = "", unit: str = "it", show_rate: bool = True) -> Progress:
    """A stage's progress to update by hand (`.update(n)`); close it or use it as a context manager."""
    return Progress(total, desc, unit, show_rate=show_rate)


def progress(
    iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it"
) -> Iterator[T]:
    """Each item of `iterable`, counting them on a progress bar."""
    with Progress(total, desc, unit) as p:
        for item in iterable:
            yield item
            p.update(1)


@contextmanager
def stage(
    desc: str, total: int | None = None, unit: str = "it", show_rate: bool = False
) -> Iterator[Progress]:
    """A step measured only when it ends (KMeans, t-SNE: one library call): on a terminal a bar whose
    clock keeps running; when the block ends the count jumps to `total` and the summary is printed."""
    p = Progress(total, desc, unit, show_rate=show_rate, tick=True)
    try:
        yield p
    except BaseException:
        p.close(failed=True)
        raise
    if p.total is not None and p.n < p.total:
        p.set(p.total)
    p.close()
