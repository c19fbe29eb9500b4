"""One command of the `imgsim` tool, and how any command runs.

A `Command` is defined by the job that owns it (`pipelines/commands/<name>.py`, `serve/launch.py`):
its help, its argument builder and a `run(args)` that makes one call and prints the outcome.
`imgsim/cli.py` only collects them. `run_as_module` runs one on its own, for
`python -m pipelines.X` (the same flags and validation as `imgsim X`). Either way `execute` runs it:
Ray's logs go to the run's `logs/` folder, and a failure ends in one line on stderr and a non-zero
exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from imgsim.console import output as console
from imgsim.console.arguments import HelpFormatter
from imgsim.errors import ImgsimError


@dataclass(frozen=True)
class Command:
    """One `imgsim` command: its help, its argument builder, what it runs, its pipeline module
    (for `python -m pipelines.X`, which takes the same arguments) and where Ray's logs go.

    `run_dir` is None for a command that runs no Ray job. For one that does, `run_dir(args)` is the
    run directory whose `logs/` keeps Ray's logs, or None (no run, or none that exists yet): a
    temporary folder then."""

    name: str
    help: str
    description: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    module: str | None = None
    run_dir: Callable[[argparse.Namespace], str | None] | None = None


def existing_run(folder: str | None) -> str | None:
    """`folder` if it is a local directory that exists (logs never create a mistyped run)."""
    return folder if folder and "://" not in folder and os.path.isdir(folder) else None


def new_run(folder: str | None) -> str | None:
    """`folder` if it is local (a run this command may create)."""
    return folder if folder and "://" not in folder else None


def add_arguments(p: argparse.ArgumentParser, command: Command) -> None:
    """The command's own arguments, then those every command takes."""
    command.arguments(p)
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show Ray's own driver and worker logs live (always kept in RUN/logs/); "
        f"same as {console.LOG_ENV}=debug",
    )
    p.set_defaults(command=command.name)


def run_as_module(command: Command, argv: Sequence[str] | None = None) -> int:
    """`python -m pipelines.X ...`: `command` with its own parser (same flags as `imgsim X`).

    Called from a pipeline module's `if __name__ == "__main__"` block: the command imports that
    module again under its real name, so Ray pickles its functions by reference (a function defined
    in `__main__` would be pickled by value, with every global it touches).
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m {command.module}", description=command.description, formatter_class=HelpFormatter
    )
    add_arguments(parser, command)
    return execute(command, parser.parse_args(argv))


def execute(command: Command, args: argparse.Namespace) -> int:
    """Run a parsed command; a failure ends in one line on stderr (naming the folder of Ray's logs
    when Ray ran) and a non-zero exit status."""
    if getattr(args, "verbose", False):
        console.set_verbose(True)
    logs = _run_logs(command, args)
    with logs if logs is not None else contextlib.nullcontext():
        code, failure = _run(command, args)
    if failure:
        where = f" — Ray's logs: {logs.where()}" if logs is not None and logs.used() else ""
        print(f"imgsim: {failure}{where}", file=console.stream(), flush=True)
    return code


def _run_logs(command: Command, args: argparse.Namespace) -> Any:
    """Where a command that runs Ray jobs keeps Ray's logs (`imgsim.console.output.RunLogs`), or None for
    commands without Ray, and when Ray already runs in this process (its host owns the console)."""
    if command.run_dir is None:
        return None
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return None
    from imgsim.io.runs import RunPaths

    run = command.run_dir(args)
    if run:
        root = RunPaths(run).logs_dir
    else:
        import tempfile

        root = os.path.join(tempfile.gettempdir(), "imgsim-logs")
    return console.RunLogs(
        console.log_folder(root, command.name), access_log=getattr(args, "access_log", False)
    )


def _run(command: Command, args: argparse.Namespace) -> tuple[int, str | None]:
    """(exit status, the failure's one-line reason or None)."""
    try:
        return int(command.run(args) or 0), None
    except KeyboardInterrupt:
        return 130, "interrupted"
    except ImgsimError as e:
        return 1, f"error: {e}"
    except Exception as e:  # anything unexpected still ends in one line, unless debugging
        if os.environ.get("IMGSIM_DEBUG"):
            raise
        reason = (str(e).strip().splitlines() or [""])[0]
        if console.active_logs() is not None:  # stderr is the run's driver.log: keep the traceback there
            traceback.print_exc()
            hint = "the traceback is in driver.log"
        else:
            hint = "set IMGSIM_DEBUG=1 for the traceback"
        return 1, f"error: {type(e).__name__}: {reason} ({hint})"
