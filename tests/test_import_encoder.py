"""`imgsim import-encoder`: a TorchScript file and a torch.export (.pt2) file, each exported here from
a tiny model, become runs that `imgsim index` (the real Ray Data job), `query` (CLI, Python, HTTP),
`eval` and `tsne` use like a trained one; files that are not such models are refused in one line.

The two imported encoders are mirror-invariant toy encoders (tests/encoders.py), so a mirrored copy
of an indexed image must come back first, through the index and the search paths.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from conftest import free_port, wait_healthy, write_pattern_folder
from encoders import BAD_ENCODERS, export_bad_encoder, export_toy_encoder, make_asymmetric_image
from PIL import Image, ImageOps

from imgsim.cli import main
from imgsim.errors import ImgsimError
from imgsim.io.runs import RunPaths
from imgsim.models import autoencoder as model_lib
from imgsim.models import encoders as encoders_lib

SIZE = 32
# Per kind: the file, how it is imported (channels, mean/std as the CLI takes them).
IMPORTS = {
    "torchscript": {"file": "toy.pt", "channels": 3, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]},
    "export": {"file": "toy.pt2", "channels": 1, "mean": [0.5], "std": [0.25]},
}
KINDS = tuple(IMPORTS)


@dataclass
class Imported:
    kind: str
    file: Path  # the exported model file
    run: Path  # imported and indexed
    data: Path  # the indexed images: 4 pattern classes + "asymmetric"
    mirrored: list[tuple[Path, Path]]  # (mirrored copy, indexed original), copies not indexed


def _cli(*args: str) -> tuple[int, str]:
    """`imgsim ARGS` in this process (so Ray jobs use the session's Ray): (exit status, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main([str(a) for a in args])
    return status, out.getvalue()


def _import_args(kind: str, file: Path, run: Path) -> list[str]:
    spec = IMPORTS[kind]
    return [
        "import-encoder", str(file), "--out", str(run), "--image-size", str(SIZE),
        "--channels", str(spec["channels"]),
        "--mean", *map(str, spec["mean"]), "--std", *map(str, spec["std"]),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def indexed_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[Path, Path]]]:
    """The images to index (4 pattern classes + 6 asymmetric ones) and mirrored copies of the latter."""
    base = tmp_path_factory.mktemp("import-data")
    data = write_pattern_folder(base / "data", per_class=6)
    (data / "asymmetric").mkdir()
    (base / "mirrored").mkdir()
    mirrored = []
    for i in range(6):
        original = data / "asymmetric" / f"{i:02d}.png"
        make_asymmetric_image(i, SIZE).save(original)
        copy = base / "mirrored" / f"{i:02d}.png"
        ImageOps.mirror(Image.open(original)).save(copy)
        mirrored.append((copy, original))
    return data, mirrored


@pytest.fixture(scope="module")
def imported(
    tmp_path_factory: pytest.TempPathFactory, indexed_data: tuple[Path, list], ray_session: None
) -> dict[str, Imported]:
    """Per kind: a toy encoder exported, imported with `imgsim import-encoder`, indexed with `imgsim index`."""
    data, mirrored = indexed_data
    runs = {}
    for kind in KINDS:
        base = tmp_path_factory.mktemp(f"import-{kind}")
        spec = IMPORTS[kind]
        file = export_toy_encoder(base / spec["file"], kind, mirror_invariant=True, channels=spec["channels"])
        run = base / "run"
        status, out = _cli(*_import_args(kind, file, run), "--json")
        assert status == 0
        assert json.loads(out)["format"] == kind
        status, out = _cli("index", data, "--model", run, "--clusters", "4", "--json")
        assert status == 0 and json.loads(out)["images"] == 30
        runs[kind] = Imported(kind, file, run, data, mirrored)
    return runs


# -- the stored model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_load_gives_the_encoder_interface_with_normalisation_inside(
    imported: dict[str, Imported], kind: str
) -> None:
    case, spec = imported[kind], IMPORTS[kind]
    model = model_lib.load(case.run)
    assert isinstance(model, encoders_lib.Encoder)
    assert (model.config.image_size, model.config.channels, model.config.dim) == (SIZE, spec["channels"], 16)
    assert model.fingerprint == model_lib.fingerprint(case.run)
    assert json.loads(RunPaths(case.run).manifest.read_text())["model_fingerprint"] == model.fingerprint
    assert model_lib.describe(model).startswith(f"imported {encoders_lib.FORMAT_NAMES[kind]} encoder")
    images = np.random.default_rng(0).integers(0, 256, (5, spec["channels"], SIZE, SIZE), dtype=np.uint8)
    emb = model.embed(images, batch_size=2)
    assert emb.dtype == np.float32 and emb.shape == (5, 16)
    # the same as the file's own module on (x / 255 - mean) / std
    if kind == "torchscript":
        module = torch.jit.load(str(case.file))
    else:
        module = torch.export.load(str(case.file)).module()
    mean = torch.tensor(spec["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(spec["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        expected = module((torch.from_numpy(images).float() / 255 - mean) / std).numpy()
    np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-5)


# -- index, query (CLI and Python), eval, tsne ------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_query_and_eval_through_the_cli_and_python(
    imported: dict[str, Imported], kind: str, tmp_path: Path
) -> None:
    from imgsim import Searcher

    case = imported[kind]
    query = case.data / "blob" / "03.png"
    status, out = _cli("query", query, "--model", case.run, "-k", "5", "--json")
    assert status == 0
    answer = json.loads(out)
    assert answer["results"][0]["path"] == str(query) and answer["results"][0]["distance"] < 1e-4
    assert [r["rank"] for r in answer["results"]] == [1, 2, 3, 4, 5]
    searcher = Searcher.load(case.run)
    assert searcher.search(str(query), k=5)["results"] == answer["results"]

    status, out = _cli("eval", "--model", case.run, "--json")
    assert status == 0
    metrics = json.loads(out)
    assert metrics["queries"] == metrics["database"] == 30
    assert metrics["precision_at_1"] >= 0.6  # random conv features separate the patterns

    status, _ = _cli("tsne", "--model", case.run, "--out", tmp_path / "tsne.png")
    assert status == 0 and (tmp_path / "tsne.png").stat().st_size > 0


@pytest.mark.parametrize("kind", KINDS)
def test_a_mirrored_copy_finds_its_original_first(
    imported: dict[str, Imported], kind: str, tmp_path: Path
) -> None:
    """The imported encoder's mirror invariance reaches search; without it the copies are lost."""
    from imgsim import Searcher
    from imgsim.data.decode import decode_image
    from imgsim.index.knn import KnnIndex

    case = imported[kind]
    searcher = Searcher.load(case.run)
    for copy, original in case.mirrored:
        top = searcher.search(str(copy), k=1)["results"][0]
        assert top["path"] == str(original) and top["distance"] < 1e-4, (copy, top)

    # The same toy encoder without the mirror averaging, imported and searched the same way.
    spec = IMPORTS[kind]
    plain_file = export_toy_encoder(
        tmp_path / spec["file"], kind, mirror_invariant=False, channels=spec["channels"]
    )
    encoders_lib.import_encoder(plain_file, tmp_path / "plain", image_size=SIZE, channels=spec["channels"])
    plain = model_lib.load(tmp_path / "plain")
    paths = searcher.paths

    def embed(files: list[str]) -> np.ndarray:
        return plain.embed(
            np.stack([decode_image(Path(f).read_bytes(), SIZE, spec["channels"]) for f in files])
        )

    index = KnnIndex(metric="cosine", kind="exact").fit(embed(paths))
    _, ids = index.search(embed([str(c) for c, _ in case.mirrored]), 1)
    found = sum(paths[i] == str(o) for i, (_, o) in zip(ids[:, 0], case.mirrored, strict=True))
    assert found < len(case.mirrored) // 2


# -- HTTP -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(imported: dict[str, Imported]) -> Iterator[str]:
    """One Serve instance on a free port with an application per imported run, at /<kind>."""
    from ray import serve

    from serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for kind, case in imported.items():
            serve.run(
                build_app(case.run, num_cpus=0.25, paths="absolute"),
                name=f"import-{kind}",
                route_prefix=f"/{kind}",
            )
        base = f"http://127.0.0.1:{port}"
        for kind in imported:
            wait_healthy(f"{base}/{kind}/healthz")
        yield base
    finally:
        serve.shutdown()


@pytest.mark.parametrize("kind", KINDS)
def test_http_search(imported: dict[str, Imported], served: str, kind: str) -> None:
    from imgsim import Searcher

    case = imported[kind]
    searcher = Searcher.load(case.run)
    query = case.data / "checks" / "02.png"
    r = requests.post(
        f"{served}/{kind}/search?k=4", files={"image": ("q.png", query.read_bytes(), "image/png")}, timeout=60
    )
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    want = searcher.search(query.read_bytes(), k=4)["results"]
    assert [g["id"] for g in got] == [w["id"] for w in want]
    np.testing.assert_allclose([g["distance"] for g in got], [w["distance"] for w in want], atol=1e-5)

    copy, original = case.mirrored[0]
    r = requests.post(
        f"{served}/{kind}/search?k=1",
        data=copy.read_bytes(),
        headers={"Content-Type": "image/png"},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["results"][0]["path"] == str(original)


# -- refusals ------------------------------------------------------------------------------------------
def _assert_refused(capsys: pytest.CaptureFixture[str], status: int, file: Path | str, run: Path) -> str:
    err = capsys.readouterr().err
    assert status != 0
    assert len(err.strip().splitlines()) == 1 and err.startswith("imgsim: error: "), err
    assert str(file) in err
    assert not run.exists()  # nothing written, not even the run directory
    return err


@pytest.mark.parametrize("fault", [*BAD_ENCODERS, "batch-dependent", "missing"])
def test_a_file_that_is_not_such_a_model_is_refused_in_one_line(
    fault: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / f"{fault}.pt"
    if fault != "missing":
        export_bad_encoder(file, fault, image_size=SIZE, channels=1)
    run = tmp_path / "run"
    status = main(
        ["import-encoder", str(file), "--out", str(run), "--image-size", str(SIZE), "--channels", "1"]
    )
    err = _assert_refused(capsys, status, file, run)
    expected = {
        "random-bytes": "not a zip archive",
        "state-dict": "torch.save pickle",
        "pickled-module": "torch.save pickle",
        "rank-4": "returns shape (2, 8, 1, 1)",
        "batch-mean": "returns shape (1, 8)",
        "non-finite": "NaN or infinite",
        "raises": "this encoder always fails",
        "batch-dependent": "model.eval()",
        "missing": "no such file",
    }[fault]
    assert expected in err


def test_the_wrong_input_shape_is_refused_with_the_right_flag(
    imported: dict[str, Imported], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pt2, script = imported["export"].file, imported["torchscript"].file
    run = tmp_path / "run"
    status = main(["import-encoder", str(pt2), "--out", str(run), "--image-size", "64"])
    assert "pass --image-size 32" in _assert_refused(capsys, status, pt2, run)
    status = main(["import-encoder", str(pt2), "--out", str(run), "--image-size", "32", "--channels", "3"])
    assert "pass --channels 1" in _assert_refused(capsys, status, pt2, run)
    status = main(["import-encoder", str(script), "--out", str(run), "--image-size", "32", "--channels", "1"])
    assert "expected input" in _assert_refused(capsys, status, script, run)
    status = main(
        ["import-encoder", str(script), "--out", str(run), "--image-size", "32", "--mean", "0.1", "0.2"]
    )
    assert "--mean takes one value or one per channel (3)" in _assert_refused(capsys, status, "--mean", run)


def test_the_exit_status_and_stderr_of_a_refusal(tmp_path: Path) -> None:
    file = export_bad_encoder(tmp_path / "noise.bin", "random-bytes")
    out = subprocess.run(
        [sys.executable, "-m", "imgsim.cli", "import-encoder", str(file), "--out", str(tmp_path / "run"),
         "--image-size", "32"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and str(file) in out.stderr
    assert not (tmp_path / "run").exists()


# -- the run's model: replacing it, training it ------------------------------------------------------------
def test_a_run_with_a_model_is_replaced_only_with_force(
    imported: dict[str, Imported], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = imported["torchscript"]
    run = tmp_path / "run"
    assert main(_import_args("torchscript", case.file, run)) == 0
    first = model_lib.fingerprint(run)
    capsys.readouterr()
    assert main(_import_args("torchscript", case.file, run)) == 1
    assert "--force" in capsys.readouterr().err
    # new settings, --force: a new fingerprint (the index must be rebuilt), no leftover files
    args = [a if a != "0.4" else "0.3" for a in _import_args("torchscript", case.file, run)]
    assert main([*args, "--force"]) == 0
    assert model_lib.fingerprint(run) != first
    assert sorted(p.name for p in RunPaths(run).model_dir.iterdir()) == ["encoder.json", "encoder.pt"]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_train_refuses_an_imported_run(
    imported: dict[str, Imported], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = imported["export"]
    for extra in ([], ["--resume"]):
        status = main(["train", str(case.data), "--out", str(case.run), *extra])
        err = capsys.readouterr().err
        assert status == 1 and "holds an imported encoder" in err and len(err.strip().splitlines()) == 1
    assert not RunPaths(case.run).checkpoints_dir.exists()
    with pytest.raises(ImgsimError, match="imported encoder"):
        from pipelines.train import train

        train(str(case.data), str(case.run))


def test_a_pt2_exported_with_a_fixed_batch_runs_in_chunks(tmp_path: Path) -> None:
    file = export_toy_encoder(tmp_path / "fixed.pt2", "export", channels=1, fixed_batch=3)
    summary = encoders_lib.import_encoder(file, tmp_path / "run", image_size=SIZE)
    assert summary["batch_size"] == 3 and summary["channels"] == 1  # read from the file
    model = model_lib.load(tmp_path / "run")
    images = np.random.default_rng(1).integers(0, 256, (7, 1, SIZE, SIZE), dtype=np.uint8)
    together = model.embed(images)
    alone = np.concatenate([model.embed(images[i : i + 1]) for i in range(7)])
    assert together.shape == (7, 16)
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)


def test_help_names_the_formats_and_flags() -> None:
    from imgsim.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["import-encoder"]  # type: ignore[union-attr]
    text = sub.format_help()
    for word in ("TorchScript", "torch.export", "--image-size", "--channels", "--mean", "--std", "--force"):
        assert word in text
