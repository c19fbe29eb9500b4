"""Argument types and flags that several commands share, and how `--help` prints them.

Each command's own flags live with the job that runs it (`pipelines/commands/`, `serve/launch.py`);
what more than one of them accepts is defined once here, so `imgsim X` and `python -m pipelines.X`
validate the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from imgsim.config import DEFAULTS


# --- argument types ------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, got {text}")
    return value


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def channels(text: str) -> int | None:
    if text == "auto":
        return None
    if text in ("1", "3"):
        return int(text)
    raise argparse.ArgumentTypeError("channels must be 1, 3 or auto")


# --- flags shared by several commands ------------------------------------------------------------
def add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="local folder or s3://bucket/prefix of images")


def add_model(p: argparse.ArgumentParser, needs: str = "a model and an index") -> None:
    p.add_argument("--model", required=True, metavar="RUN", help=f"run directory with {needs}")


def add_json(p: argparse.ArgumentParser, what: str = "print one JSON object") -> None:
    p.add_argument("--json", action="store_true", help=what)


def add_k(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("-k", type=positive_int, default=DEFAULTS.search.k, help=what)


def print_json(obj: Any) -> None:
    """A command's `--json` answer: one JSON object on one line of stdout."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")


class HelpFormatter(argparse.HelpFormatter):
    """--help as users read it: an option's one default, where it has a value, after its help (an
    option whose help already says its default, a flag, or one without a value shows none); text is
    wrapped, except lines indented by two spaces (lists), kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        valueless = (
            action.default is None or isinstance(action.default, bool) or action.default == argparse.SUPPRESS
        )
        quiet = valueless or "default" in text
        if quiet or not action.option_strings or action.nargs == 0:
            return text
        return f"{text} (default: %(default)s)"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out, paragraph = [], []
        for line in text.splitlines():
            if line.startswith("  ") or not line.strip():
                if paragraph:
                    out.append(super()._fill_text(" ".join(paragraph), width, indent))
                    paragraph = []
                out.append(indent + line)
            else:
                paragraph.append(line)
        if paragraph:
            out.append(super()._fill_text(" ".join(paragraph), width, indent))
        return "\n".join(out)
