"""The `imgsim` command-line contract: every command present, --help explains, errors are one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from imgsim.cli import build_parser, main

CONTRACT_COMMANDS = [
    "dataset",
    "train",
    "index",
    "query",
    "eval",
    "tsne",
    "serve",
    "import-encoder",
    "demo",
    "duplicates",
]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imgsim.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_top_level_help_lists_every_contract_command() -> None:
    out = _run("--help")
    assert out.returncode == 0
    for command in CONTRACT_COMMANDS:
        assert command in out.stdout


@pytest.mark.parametrize("command", CONTRACT_COMMANDS)
def test_each_command_has_help(command: str) -> None:
    out = _run(command, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: imgsim " + command)
    assert len(out.stdout.splitlines()) > 5


CONTRACT_FLAGS = {
    "dataset": ["--limit"],
    "train": ["--out", "--epochs", "--image-size", "--dim", "--batch-size", "--workers", "--gpu", "--resume"],
    "index": ["--model", "--clusters"],
    "query": ["--model", "-k", "--plot", "--json", "--duplicates"],
    "eval": ["--model", "--queries", "-k", "--json", "--copies", "--seed"],
    "duplicates": ["--model", "--threshold", "--precision", "--out", "--json"],
    "tsne": ["--model", "--out"],
    "serve": ["--model", "--host", "--port", "--replicas"],
    "import-encoder": ["--out", "--image-size", "--channels", "--mean", "--std"],
    "demo": ["--work"],
}


@pytest.mark.parametrize("command,flags", sorted(CONTRACT_FLAGS.items()))
def test_contract_flags_are_accepted(command: str, flags: list[str]) -> None:
    sub = build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    options = {s for a in sub._actions for s in a.option_strings}
    assert set(flags) <= options


def test_bad_arguments_exit_non_zero_with_a_reason() -> None:
    out = _run("dataset", "fashion-mnist", "never-written", "--limit", "zero")
    assert out.returncode != 0
    assert "expected a whole number" in out.stderr


def test_failure_is_one_line_on_stderr(tmp_path, capsys) -> None:
    # a query against a run that does not exist fails cleanly, not with a traceback
    code = main(["query", str(tmp_path / "nope.png"), "--model", str(tmp_path / "no-run")])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("imgsim: error:")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", CONTRACT_COMMANDS)
def test_help_shows_one_real_default_per_option(command: str) -> None:
    text = build_parser()._subparsers._group_actions[0].choices[command].format_help()  # type: ignore[union-attr]
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: True)" not in text
    for option in text.split("\n  -")[1:]:
        assert option.count("(default") <= 1, option


def test_version_prints_the_package_version() -> None:
    import imgsim

    out = _run("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"imgsim {imgsim.__version__}"


def test_serve_help_lists_every_route() -> None:
    out = _run("serve", "--help")
    flat = " ".join(out.stdout.split())
    for route in ("POST /search", "POST /duplicates", "GET /images/{id}", "GET /healthz", "web page at /"):
        assert route in flat
