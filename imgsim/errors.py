"""Exceptions for expected failures: the CLI prints their message as a one-line reason."""

from __future__ import annotations


class ImgsimError(Exception):
    """An expected failure whose message tells the user what went wrong and what to do next."""


class RunNotFound(ImgsimError):
    """A run directory lacks what a command needs (no model yet, no index yet)."""


class ModelMismatch(ImgsimError):
    """An index was built with a different model than the one loaded."""


class BadQuery(ImgsimError):
    """A query could not be turned into an image (not found, not an image, too large, bad URL).

    `reason` says why in a few words; the message is "<query>: <reason>" when the query is named.
    """

    def __init__(self, reason: str, query: str | None = None) -> None:
        super().__init__(f"{query}: {reason}" if query else reason)
        self.reason = reason
        self.query = query


class DiskFull(ImgsimError):
    """A write ran out of disk space; what was there before is unchanged."""


def disk_full(error: BaseException) -> bool:
    """True if `error` (an OSError, or faiss's RuntimeError from a failed write) means the disk is full."""
    import errno

    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left on device" in text or "Errno 28" in text or "Disk quota exceeded" in text
