"""Ingest with a real Ray runtime: every good image exactly once, every bad file skipped once with its
path and reason, and the same rows from S3 (a real moto server) as from disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_pattern_image, upload_tree
from PIL import Image
from test_decode import bomb_png, encode, half_black_half_white

from imgsim.cli import main_for
from imgsim.config import MAX_FILE_BYTES
from imgsim.data.decode import decode_image
from imgsim.data.rows import ok_mask
from imgsim.data.sources import ImageRef, list_images
from pipelines.ingest import detect_channels, read_images

pytestmark = pytest.mark.usefixtures("ray_session")

SIZE = 16

GOOD = {
    "good/rotated.jpg",
    "good/rgb.JPG",
    "good/cmyk.jpeg",
    "good/grey.png",
    "good/sixteen.png",
    "good/alpha.PNG",
    "good/palette.gif",
    "good/palette-transparent.png",
    "good/animated.gif",
    "good/photo.webp",
    "good/bitmap.bmp",
    "good/scan.TIFF",
    "top.Jpeg",
}
BAD = {  # file → what its reason must say
    "bad/empty.jpg": "empty file",
    "bad/truncated.jpg": "corrupt or truncated image",
    "bad/truncated.png": "corrupt or truncated image",
    "bad/text.jpg": "not an image",
    "bad/bomb.png": "decompression bomb",
}


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """Good images of every mode and format (some upper-case extensions) and each kind of bad file."""
    root = tmp_path / "mixed"
    (root / "good").mkdir(parents=True)
    (root / "bad").mkdir()
    colour = make_pattern_image(3, seed=1, size=40, mode="RGB")
    colour.paste((200, 30, 30), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90° clockwise to view
    files = {
        "good/rotated.jpg": encode(half_black_half_white("RGB", (60, 40)), "JPEG", exif=exif.tobytes()),
        "good/rgb.JPG": encode(colour, "JPEG"),
        "good/cmyk.jpeg": encode(colour.convert("CMYK"), "JPEG"),
        "good/grey.png": encode(colour.convert("L"), "PNG"),
        "good/sixteen.png": encode(Image.fromarray(np.asarray(colour.convert("L"), np.uint16) * 257), "PNG"),
        "good/alpha.PNG": encode(_with_transparent_corner(colour), "PNG"),
        "good/palette.gif": encode(colour.convert("P"), "GIF"),
        "good/palette-transparent.png": encode(colour.convert("P"), "PNG", transparency=0),
        "good/animated.gif": encode(colour, "GIF", save_all=True, append_images=[colour.rotate(90)], loop=0),
        "good/photo.webp": encode(colour, "WEBP"),
        "good/bitmap.bmp": encode(colour, "BMP"),
        "good/scan.TIFF": encode(colour, "TIFF"),
        "top.Jpeg": encode(colour.rotate(180), "JPEG"),
        "bad/empty.jpg": b"",
        "bad/truncated.jpg": encode(colour, "JPEG")[:300],
        "bad/truncated.png": encode(colour, "PNG")[:200],
        "bad/text.jpg": b"this is a text file with a .jpg name\n",
        "bad/bomb.png": bomb_png(40_000, 40_000),
        "notes.txt": b"not an image extension: never listed",
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    return root


def _with_transparent_corner(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    rgba.paste((0, 0, 0, 0), (20, 20, 40, 40))
    return rgba


def collect(ds) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    """path → row, asserting that no path appears twice."""
    rows: dict[str, dict] = {}
    for batch in ds.iter_batches(batch_size=7, batch_format="numpy"):
        for i, path in enumerate(batch["path"]):
            assert path not in rows, f"{path} appeared twice"
            rows[path] = {k: batch[k][i] for k in ("label", "image", "error")}
    return rows


def by_relative_path(rows: dict[str, dict], root: str) -> dict[str, dict]:
    return {p[len(root.rstrip("/")) + 1 :]: r for p, r in rows.items()}


def test_good_images_once_bad_files_skipped_with_reasons(mixed_folder: Path) -> None:
    with open(mixed_folder / "bad" / "huge.png", "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # over the size limit (sparse: nothing written)
    rows = by_relative_path(collect(read_images(str(mixed_folder), SIZE, 3)), str(mixed_folder))
    assert set(rows) == GOOD | set(BAD) | {"bad/huge.png"}
    for rel in GOOD:
        row = rows[rel]
        assert row["error"] is None, (rel, row["error"])
        assert row["label"] == ("good" if rel.startswith("good/") else None)
        # exactly what the one preprocessing function gives for these bytes
        expected = decode_image((mixed_folder / rel).read_bytes(), SIZE, 3)
        np.testing.assert_array_equal(row["image"], expected)
    for rel, reason in {**BAD, "bad/huge.png": "file too large"}.items():
        assert reason in rows[rel]["error"], (rel, rows[rel]["error"])
        assert rows[rel]["label"] == "bad" and not rows[rel]["image"].any()
    rotated = rows["good/rotated.jpg"]["image"].astype(int)  # EXIF applied: the dark half is on top
    assert rotated[:, :5].mean() < 50 and rotated[:, -5:].mean() > 200
    alpha = rows["good/alpha.PNG"]["image"]  # transparent corner composited on white
    assert alpha[:, -4:, -4:].min() == 255


def test_keep_errors_false_yields_only_good_images(mixed_folder: Path) -> None:
    # batches of 5: the first holds only the 5 bad files, so it comes back empty
    ds = read_images(str(mixed_folder), SIZE, 1, keep_errors=False, concurrency=1, batch_size=5)
    rows = by_relative_path(collect(ds), str(mixed_folder))
    assert set(rows) == GOOD
    assert all(r["image"].shape == (1, SIZE, SIZE) and r["error"] is None for r in rows.values())


def test_vanished_and_unreadable_files_become_error_rows(mixed_folder: Path) -> None:
    refs = list_images(str(mixed_folder))
    (mixed_folder / "good" / "grey.png").unlink()
    refs.append(ImageRef(str(mixed_folder / "good"), "good", 0, 0))  # a folder: unreadable as a file
    rows = collect(read_images(str(mixed_folder), SIZE, 1, refs=refs))
    assert len(rows) == len(refs)
    assert rows[str(mixed_folder / "good" / "grey.png")]["error"] == "file vanished before it could be read"
    assert rows[str(mixed_folder / "good")]["error"] == "unreadable (is a directory)"
    assert ok_mask([r["error"] for r in rows.values()]).sum() == len(GOOD) - 1


def test_all_good_batches_keep_none_and_labels(image_folder: Path) -> None:
    rows = by_relative_path(collect(read_images(str(image_folder), SIZE, 1, batch_size=5)), str(image_folder))
    assert len(rows) == 25 and all(r["error"] is None for r in rows.values())  # None, never NaN
    assert rows["top.png"]["label"] is None and rows["blob/00.png"]["label"] == "blob"


def test_channel_detection(image_folder: Path, mixed_folder: Path, tmp_path: Path) -> None:
    assert detect_channels(str(image_folder)) == 1
    assert detect_channels(list_images(str(mixed_folder))) == 3
    grey_rgb = tmp_path / "grey-as-rgb"
    grey_rgb.mkdir()
    make_pattern_image(1, seed=3, mode="RGB").save(grey_rgb / "scan.jpg")  # grey content, RGB JPEG
    (grey_rgb / "broken.png").write_bytes(b"")  # unreadable samples are ignored
    assert detect_channels(str(grey_rgb)) == 1


def test_s3_gives_the_same_rows_as_disk(mixed_folder: Path, s3_bucket: str) -> None:
    upload_tree(s3_bucket, mixed_folder, "catalogue")
    local = by_relative_path(collect(read_images(str(mixed_folder), SIZE, 3)), str(mixed_folder))
    root = f"s3://{s3_bucket}/catalogue"
    remote_rows = collect(read_images(root, SIZE, 3))
    assert all(p.startswith(root + "/") for p in remote_rows)
    remote = by_relative_path(remote_rows, root)
    assert set(remote) == set(local) == GOOD | set(BAD)
    for rel, row in local.items():
        assert remote[rel]["label"] == row["label"]
        assert remote[rel]["error"] == row["error"]
        np.testing.assert_array_equal(remote[rel]["image"], row["image"])
    assert detect_channels(root) == 3


def test_command_line_summary(mixed_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    skipped = tmp_path / "skipped.jsonl"
    assert (
        main_for("ingest", [str(mixed_folder), "--image-size", "8", "--skipped", str(skipped), "--show", "2"])
        == 0
    )
    out = capsys.readouterr().out
    assert f"{len(GOOD) + len(BAD)} files: {len(GOOD)} images decoded" in out and f"{len(BAD)} skipped" in out
    assert "decompression bomb" in out and "… and 3 more" in out
    records = [json.loads(line) for line in skipped.read_text().splitlines()]
    assert sorted(r["path"] for r in records) == sorted(str(mixed_folder / rel) for rel in BAD)
    assert main_for("ingest", [str(tmp_path / "missing"), "--json"]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_command_line_json(image_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main_for("ingest", [str(image_folder), "--image-size", "8", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 25 and summary["skipped"] == 0 and summary["channels"] == 1
