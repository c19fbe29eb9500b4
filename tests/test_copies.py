"""Label-free evaluation (`imgsim eval --copies`) on a small generated collection.

The collection holds asymmetric images and, for each, a *decoy*: its mirror image, slightly
changed. A mirrored copy of an image is then nearly identical, pixel for pixel, to the decoy, so raw
pixels find the decoy first; a mirror-invariant encoder (tests/toy_models.py, a real run) finds the
original.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from toy_models import RawPixels, mirror_invariant_model, save_model

from imgsim.cli import main
from imgsim.evaluation import copies as copies_lib
from imgsim.index.knn import KnnIndex

SIDE = 32
PAIRS = 10


def _asymmetric_image(rng: np.random.Generator) -> np.ndarray:
    """A greyscale image with a strong left-right asymmetry: a gradient plus a few bright blobs."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
    img = xx * rng.uniform(80, 160) + yy * rng.uniform(-60, 60)
    for _ in range(3):
        cx, cy, r = rng.uniform(0, 0.6), rng.uniform(0, 1), rng.uniform(0.08, 0.2)
        img += 120 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def write_mirror_collection(root: Path, pairs: int = PAIRS) -> list[Path]:
    """`pairs` originals and their decoys (mirror + a small brightness change and noise) as PNGs."""
    rng = np.random.default_rng(7)
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(pairs):
        original = _asymmetric_image(rng)
        decoy = np.clip(original[:, ::-1].astype(np.int16) + 6 + rng.integers(-3, 4, original.shape), 0, 255)
        for name, arr in (
            (f"{i:02d}-original.png", original),
            (f"{i:02d}-decoy.png", decoy.astype(np.uint8)),
        ):
            Image.fromarray(arr, mode="L").save(root / name)
            files.append(root / name)
    return files


@pytest.fixture(scope="module")
def mirror_run(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> Path:
    """A real run: the mirror-invariant encoder as RUN's model, the collection indexed by `imgsim index`."""
    from pipelines.build_index import build_index

    base = tmp_path_factory.mktemp("mirror")
    data = base / "data"
    write_mirror_collection(data)
    run = save_model(mirror_invariant_model(image_size=SIDE), base / "run")
    build_index(str(data), str(run), clusters=2)
    return run


def _eval_json(run: Path, capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["eval", "--model", str(run), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_mirror_invariant_encoder_finds_mirrored_copies_where_raw_pixels_do_not(
    mirror_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _eval_json(mirror_run, capsys, "--copies", str(2 * PAIRS), "--edits", "mirror,rescale,jpeg")
    assert report["per_edit"]["mirror"]["precision_at_1"] == 1.0
    assert report["per_edit"]["mirror"]["queries"] == 2 * PAIRS

    # raw pixels, the same copies and the same metrics, on an index of the raw pixels
    from pipelines.evaluate import index_columns

    _, paths, hashes = index_columns(str(mirror_run))
    raw = RawPixels(SIDE, 1)
    from imgsim.data.decode import decode_image

    raw_db = raw.embed(np.stack([decode_image(Path(p).read_bytes(), SIDE, 1) for p in paths]))
    raw_report = copies_lib.evaluate_copies(
        raw, KnnIndex(metric="cosine").fit(raw_db), raw_db, paths, hashes, copies=2 * PAIRS, edits=("mirror",)
    )
    assert raw_report["per_edit"]["mirror"]["precision_at_1"] <= 0.1


@pytest.mark.parametrize("mirror_invariant", [True, False])
def test_an_imported_encoder_is_evaluated_like_a_trained_one(
    mirror_invariant: bool, tmp_path: Path, ray_session: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """`imgsim import-encoder` with a TorchScript encoder (tests/encoders.py), then index and eval --copies:
    the mirror-invariant one finds every mirrored copy, the same encoder without the invariance does not."""
    from encoders import export_toy_encoder

    from pipelines.build_index import build_index

    data = tmp_path / "data"
    write_mirror_collection(data)
    file = export_toy_encoder(
        tmp_path / "toy.pt", "torchscript", mirror_invariant=mirror_invariant, image_size=SIDE
    )
    run = tmp_path / "run"
    assert (
        main(["import-encoder", str(file), "--out", str(run), "--image-size", str(SIDE), "--channels", "1"])
        == 0
    )
    capsys.readouterr()
    build_index(str(data), str(run), clusters=2)
    report = _eval_json(run, capsys, "--copies", str(2 * PAIRS), "--edits", "mirror")
    mirrored = report["per_edit"]["mirror"]["precision_at_1"]
    assert mirrored == 1.0 if mirror_invariant else mirrored <= 0.5


def test_report_fields_and_same_seed_same_result(
    mirror_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _eval_json(mirror_run, capsys, "--copies", "6", "--seed", "3")
    again = _eval_json(mirror_run, capsys, "--copies", "6", "--seed", "3")
    other = _eval_json(mirror_run, capsys, "--copies", "6", "--seed", "4")
    assert first == again
    assert first != other
    for key in ("precision_at_1", "recall_at_10", "map_at_10", "per_edit", "held_out", "distances",
                "suggested_threshold", "threshold", "edits", "copies", "database", "seed"):  # fmt: skip
        assert key in first, key
    assert first["copies"] == 6 and first["database"] == 2 * PAIRS
    assert set(first["per_edit"]) == set(copies_lib.TRAINED_EDITS)
    assert set(first["held_out"]["per_edit"]) == set(copies_lib.HELD_OUT_EDITS)
    assert first["queries"] == 6 * len(copies_lib.TRAINED_EDITS)
    for metrics in first["per_edit"].values():
        assert 0 <= metrics["precision_at_1"] <= metrics["recall_at_10"] <= 1
        assert metrics["precision_at_1"] <= metrics["map_at_10"] <= metrics["recall_at_10"]
    assert first["edits"]["crop"]["ranges"]["side"] == [0.75, 0.95]
    assert first["edits"]["mirror"]["held_out"] is False and first["edits"]["blur"]["held_out"] is True
    assert first["distances"]["copy"]["p50"] <= first["distances"]["copy"]["p95"]
    assert first["threshold"]["precision_target"] == 0.99 and "method" in first["threshold"]
    assert first["suggested_threshold"] == first["threshold"]["threshold"]


def test_ray_tasks_and_in_process_give_the_same_report(mirror_run: Path) -> None:
    """`imgsim eval --copies` on a few copies (made in the process), and the same evaluation with the
    copies made as Ray tasks (`ray_runner`, what more than IN_PROCESS_MAX_COPIES copies get)."""
    from imgsim.index.search import Searcher
    from pipelines.evaluate import evaluate_copies_run, index_columns, on_ray, ray_runner

    edits = ("crop", "mirror", "blur")
    assert not on_ray(9 * len(edits))
    in_process = evaluate_copies_run(str(mirror_run), 9, seed=1, edits=edits)
    searcher = Searcher.load(mirror_run)
    db_emb, paths, hashes = index_columns(str(mirror_run))
    on_ray_report = copies_lib.evaluate_copies(
        searcher.model, searcher.index, db_emb, paths, hashes, copies=9, seed=1, edits=edits,
        runner=ray_runner(str(mirror_run)),
    )  # fmt: skip
    assert in_process == on_ray_report


def test_threshold_calibration_by_hand() -> None:
    """Copies at 0.1-0.4 from their originals; one non-copy result at 0.25 (far from the original),
    one at 0.05 that is the original's own duplicate (0.02 from it): set aside, not a false match."""
    scores = copies_lib.CopyScores(
        edits=("crop",),
        edit=np.zeros(4, np.int64),
        rank=np.ones(4, np.int64),
        copy_distance=np.array([0.1, 0.2, 0.3, 0.4], np.float32),
        negatives=np.array([[0.25, np.inf], [0.05, np.inf], [np.inf, np.inf], [np.inf, np.inf]], np.float32),
        negatives_to_original=np.array(
            [[0.6, np.inf], [0.02, np.inf], [np.inf, np.inf], [np.inf, np.inf]], np.float32
        ),  # fmt: skip
        k=2,
    )
    strict = copies_lib.calibrate_threshold(scores, precision=1.0)
    assert strict["threshold"] == pytest.approx(0.2) and strict["recall"] == 0.5
    assert strict["set_aside"] == 1 and strict["false_matches"] == 0
    loose = copies_lib.calibrate_threshold(scores, precision=0.75)
    assert loose["threshold"] == pytest.approx(0.4) and loose["false_matches"] == 1
    assert loose["precision"] == pytest.approx(0.8)


def test_bad_arguments_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tmp_path), "--copies", "5", "--edits", "sepia"])
    assert "unknown edit sepia" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--copies", "5", "--queries", str(tmp_path)]) == 1
    assert "--copies" in capsys.readouterr().err
