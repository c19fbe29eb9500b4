"""The `imgsim` command: collects the commands and dispatches to the one named.

No logic lives here. Each command is a `Command` (`imgsim.console.command`) defined by the job that
owns it: its argument builder and a `run` that makes one call and prints the outcome live in
`pipelines/commands/<name>.py` (and `serve/launch.py` for `serve`). The same command serves
`imgsim X` and `python -m pipelines.X`, so both accept the same flags with the same validation.
This module is the top of the house: the one place in `imgsim/` that names `pipelines/` and
`serve/`, as module names in `COMMANDS`, imported when the parser is built.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from imgsim import __version__
from imgsim.console import output as console
from imgsim.console.arguments import HelpFormatter
from imgsim.console.command import Command, add_arguments, execute, run_as_module

#: Every `imgsim` command, in the order `imgsim --help` lists them: name → the module defining `COMMAND`.
COMMANDS: dict[str, str] = {
    "dataset": "pipelines.commands.dataset",
    "ingest": "pipelines.commands.ingest",
    "train": "pipelines.commands.train",
    "index": "pipelines.commands.index",
    "embed": "pipelines.commands.embed",
    "query": "pipelines.commands.query",
    "eval": "pipelines.commands.evaluate",
    "duplicates": "pipelines.commands.duplicates",
    "tsne": "pipelines.commands.tsne",
    "serve": "serve.launch",
    "import-encoder": "pipelines.commands.import_encoder",
    "demo": "pipelines.commands.demo",
}

DESCRIPTION = (
    "Image-similarity search: learn a compact embedding of a folder or S3 prefix of images "
    "with a convolutional autoencoder (Ray Train), embed and cluster them (Ray Data, KMeans), "
    "and answer 'the N images most like this one' from the command line, Python or HTTP (Ray Serve)."
)

EPILOG = """\
DATA is a local folder or s3://bucket/prefix (images found recursively; an image's label is its
first sub-folder). S3 uses the standard AWS settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_PROFILE). RUN is a run directory holding the model, the
index and plots. Typical use:

  imgsim dataset fashion-mnist data/fm --limit 10000
  imgsim train data/fm/train --out runs/fm
  imgsim index data/fm/train --model runs/fm
  imgsim query data/fm/test/bag/00017.png --model runs/fm -k 8 --plot q.png
  imgsim eval --model runs/fm --queries data/fm/test
  imgsim serve --model runs/fm

The console shows progress only; Ray's own driver and worker logs go to RUN/logs/<command>-<time>/
(-v/--verbose or IMGSIM_LOG=debug shows them live). Set IMGSIM_DEBUG=1 to see full tracebacks.
"""


def command(name: str) -> Command:
    """The command `name` (its module is imported now)."""
    return importlib.import_module(COMMANDS[name]).COMMAND


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `imgsim` parser: one sub-command per entry of COMMANDS, each with its arguments (`only`:
    just that command's, which is all a command line naming it needs: building them all imports
    torch for `train`'s defaults, 1.5 s before any command could start)."""
    parser = argparse.ArgumentParser(
        prog="imgsim",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"imgsim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        c = command(name)
        p = sub.add_parser(name, help=c.help, description=c.description, formatter_class=HelpFormatter)
        if only is None or name == only:
            add_arguments(p, c)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`imgsim COMMAND ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    named = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(only=named).parse_args(argv)
    return execute(command(args.command), args)


def main_for(name: str, argv: Sequence[str] | None = None) -> int:
    """`python -m pipelines.X ...`: the command `name` on its own (`run_as_module`)."""
    return run_as_module(command(name), argv)


def entry() -> NoReturn:
    """The `imgsim` console script: `main()`, then, where this process never imported Ray, an exit
    without the interpreter's teardown once the output is flushed. Every file is written and closed
    by then; what is left is freeing this process's memory (Arrow tables, the faiss index, torch),
    which took ~1 s after an incremental index of a million images, a tenth of its time. With Ray,
    its own exit handlers (which stop a local Ray) must run, so the exit is the usual one."""
    code = main()
    if "ray" in sys.modules:
        sys.exit(code)
    logging.shutdown()
    for stream in (console.stream(), sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
