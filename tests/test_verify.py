"""Geometric verification of duplicate candidates (`imgsim.duplicates.verify`) on real image files.

The images: a procedurally drawn "photo" (hundreds of random shapes, lines and noise, in colour), cut
into non-overlapping tiles. A tile's edited copies (crop + rescale, greyscale, mirror, JPEG) show the
same points moved by one transform; its neighbouring tiles look alike (same colours, same kind of
shapes) but show other points.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from toy_models import mirror_invariant_model, save_model

from imgsim.duplicates import alignment, verify
from imgsim.duplicates.groups import find_duplicates

TILE = 256


def drawing(seed: int, side: int = 3 * TILE) -> Image.Image:
    """A textured colour image: random rectangles, ellipses and lines over noise."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (side // 8, side // 8, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((side, side), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(900):
        x, y = rng.integers(0, side, 2)
        w, h = rng.integers(4, 40, 2)
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.rectangle((x, y, x + w, y + h), fill=colour)
        elif kind == 1:
            draw.ellipse((x, y, x + w, y + h), outline=colour, width=2)
        else:
            draw.line((x, y, x + rng.integers(-60, 60), y + rng.integers(-60, 60)), fill=colour, width=2)
    return img


def smooth_scene(seed: int, side: int = 3 * TILE) -> Image.Image:
    """A smooth grey "photo": large soft-edged ellipses, few corners for keypoints."""
    rng = np.random.default_rng(seed)
    img = Image.new("L", (side, side), int(rng.integers(60, 200)))
    draw = ImageDraw.Draw(img)
    for _ in range(14):
        x, y = rng.integers(-side // 4, side, 2)
        w, h = rng.integers(side // 8, side // 2, 2)
        draw.ellipse((x, y, x + w, y + h), fill=int(rng.integers(0, 255)))
    return img.filter(ImageFilter.GaussianBlur(3)).convert("RGB")


def tiles(seed: int, img: Image.Image | None = None) -> list[Image.Image]:
    img = drawing(seed) if img is None else img
    return [
        img.crop((x, y, x + TILE, y + TILE))
        for y in range(0, img.height, TILE)
        for x in range(0, img.width, TILE)
    ]


def edited(tile: Image.Image) -> Image.Image:
    """Crop to 85 %, rescale to 300 px, greyscale, mirror (the edits of a `mix` copy at once)."""
    m = round(TILE * 0.075)
    return ImageOps.mirror(tile.crop((m, m + 3, TILE - m, TILE - m + 3)).resize((300, 300)).convert("L"))


def jpeg(img: Image.Image, quality: int = 40) -> bytes:
    out = io.BytesIO()
    img.convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


def status_of(a: bytes, b: bytes) -> int:
    fa, fb = verify.features_of(a), verify.features_of(b)
    if fa is None or fb is None:
        return verify.UNVERIFIABLE
    return verify.judge(fa, fb)[0]


def test_an_edited_copy_is_verified_and_a_neighbouring_tile_is_rejected() -> None:
    pieces = tiles(0)
    original = jpeg(pieces[4], 90)
    assert status_of(original, jpeg(edited(pieces[4]))) == verify.VERIFIED
    assert (
        status_of(original, jpeg(pieces[4].rotate(7, resample=Image.Resampling.BILINEAR), 60))
        == verify.VERIFIED
    )
    for other in (pieces[1], pieces[3], pieces[5], tiles(1)[4]):
        assert status_of(original, jpeg(other, 90)) == verify.REJECTED


def test_a_smooth_copy_is_verified_by_its_shape_and_its_neighbours_are_not() -> None:
    """Keypoints find nothing to match on soft shapes; the dense check finds the copy's crop."""
    pieces = tiles(0, smooth_scene(0))
    original = verify.features_of(jpeg(pieces[4], 90))
    copy = verify.features_of(jpeg(edited(pieces[4]), 30))
    assert original is not None and copy is not None
    assert verify.inliers(original, copy) < verify.MIN_INLIERS  # ORB alone would not verify it
    assert verify.judge(original, copy)[0] == verify.VERIFIED
    for other in (pieces[1], pieces[3], pieces[5], pieces[7], tiles(0, smooth_scene(1))[4]):
        neighbour = verify.features_of(jpeg(other, 90))
        assert neighbour is not None
        assert verify.judge(original, neighbour)[0] != verify.VERIFIED


def test_gradients_fit_at_any_crop_so_the_dense_check_proves_nothing() -> None:
    """Two crops of one linear gradient correlate perfectly at many alignments: not a verified copy
    (the distinctness rule, not the correlation, refuses it)."""
    yy, xx = np.mgrid[0:400, 0:400]
    ramp = Image.fromarray((xx * 0.4 + yy * 0.15).astype(np.uint8))
    a = verify.features_of(jpeg(ramp.crop((0, 0, 300, 300)), 60))
    b = verify.features_of(jpeg(ramp.crop((80, 50, 380, 350)).resize((240, 240)), 60))
    assert a is not None and b is not None
    correlation, gradients, distinctness = alignment.scores(a.thumbnail, b.thumbnail)
    assert correlation >= alignment.MIN_CORRELATION and gradients >= alignment.MIN_GRADIENT_CORRELATION
    assert distinctness < alignment.MIN_DISTINCTNESS
    assert verify.judge(a, b)[0] == verify.UNVERIFIABLE


def test_small_or_flat_images_are_unverifiable_not_rejected() -> None:
    small = jpeg(tiles(0)[0].resize((48, 48)))
    assert verify.features_of(small) is None
    # two different soft gradients: few keypoints, so no match proves nothing either way
    yy, xx = np.mgrid[0:200, 0:200]
    a = Image.fromarray((xx * 0.6 + yy * 0.2).astype(np.uint8))
    b = Image.fromarray((255 - xx * 0.3 - yy * 0.5).astype(np.uint8))
    assert status_of(jpeg(a, 30), jpeg(b, 30)) == verify.UNVERIFIABLE
    assert verify.features_of(b"not an image") is None


def test_verify_pairs_reads_each_image_and_keeps_the_order(tmp_path: Path) -> None:
    pieces = tiles(2)
    paths = []
    for name, data in (("a.jpg", jpeg(pieces[0], 90)), ("a-copy.jpg", jpeg(edited(pieces[0]))),
                       ("b.jpg", jpeg(pieces[1], 90)), ("missing.jpg", None)):  # fmt: skip
        if data is not None:
            (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    reads: list[str] = []

    def read(path: str) -> bytes:
        reads.append(path)
        return Path(path).read_bytes()

    a, b = np.array([0, 0, 1, 0]), np.array([1, 2, 2, 3])
    status, inliers = verify.verify_pairs(paths, a, b, read)
    assert status.tolist() == [verify.VERIFIED, verify.REJECTED, verify.REJECTED, verify.UNVERIFIABLE]
    assert inliers[0] >= verify.MIN_INLIERS > inliers[1]
    assert sorted(reads) == sorted(paths)  # each image read once


def test_in_process_verification_shows_its_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from imgsim.duplicates.groups import verify_here

    pieces = tiles(4)
    paths = []
    for i in range(3):
        (tmp_path / f"t{i}.jpg").write_bytes(jpeg(pieces[i], 90))
        paths.append(str(tmp_path / f"t{i}.jpg"))
    monkeypatch.setattr(verify, "CHUNK_PAIRS", 1)  # one update a pair
    status = verify_here(paths, np.array([0, 0, 1]), np.array([1, 2, 2]))
    assert status.tolist() == [verify.REJECTED] * 3
    assert capsys.readouterr().err.splitlines()[-1].startswith("verify candidate pairs: 3/3 pairs (100%)")


@pytest.fixture(scope="module")
def tile_run(
    tmp_path_factory: pytest.TempPathFactory, ray_session: None
) -> tuple[Path, Path, dict[str, str]]:
    """Nine tiles of one drawing, three with an edited copy, indexed with a toy encoder: (data, run,
    {copy: original})."""
    from pipelines.build_index import build_index

    base = tmp_path_factory.mktemp("verify")
    data = base / "data"
    data.mkdir()
    copies = {}
    for i, tile in enumerate(tiles(3)):
        (data / f"t{i}.jpg").write_bytes(jpeg(tile, 92))
        if i in (0, 4, 8):
            (data / f"t{i}-copy.jpg").write_bytes(jpeg(edited(tile)))
            copies[str(data / f"t{i}-copy.jpg")] = str(data / f"t{i}.jpg")
    run = save_model(mirror_invariant_model(image_size=32), base / "run")
    build_index(str(data), str(run), clusters=2)
    return data, run, copies


def test_duplicates_keep_copies_and_drop_lookalike_tiles(tile_run: tuple[Path, Path, dict[str, str]]) -> None:
    """At a threshold so loose that the embedding calls every tile a duplicate of its neighbours, the
    geometric check leaves exactly the planted copies grouped; without it, neighbours are grouped."""
    _, run, copies = tile_run
    planted = {frozenset(pair) for pair in copies.items()}

    def pairs(report) -> set[frozenset[str]]:  # noqa: ANN001
        found = set()
        for g in report.groups:
            paths = [m.path for m in g.members]
            found |= {frozenset((x, y)) for i, x in enumerate(paths) for y in paths[i + 1 :]}
        return found

    loose = find_duplicates(run, threshold=0.5, full=True, verify=False)
    assert len(pairs(loose) - planted) > 0  # the embedding alone groups look-alike tiles
    checked = find_duplicates(run, threshold=0.5, full=True)
    assert pairs(checked) == planted
    assert checked.verification["verified"] >= len(planted) and checked.verification["rejected"] > 0
    # a rerun reuses the judged pairs instead of verifying them again
    again = find_duplicates(run, threshold=0.5)
    assert pairs(again) == planted and again.verification["checked_now"] == 0


def test_one_image_against_the_collection_is_verified_too(
    tile_run: tuple[Path, Path, dict[str, str]],
) -> None:
    """`DuplicateLookup.matches` (behind `query --duplicates` and POST /duplicates) with the query's bytes: within a
    loose radius only the tile the query was cut from (and its copy) match; without bytes, the
    embedding's threshold alone decides."""
    from imgsim.duplicates.lookup import DuplicateLookup
    from imgsim.index.search import Searcher

    data, run, _ = tile_run
    searcher = Searcher.load(run)
    lookup = DuplicateLookup(searcher)
    query = jpeg(edited(Image.open(data / "t4.jpg")), 50)
    emb = searcher.embed(searcher.to_image(query)[None])[0]
    verified = lookup.matches(emb, None, 0.0, data=query, radius=0.5)
    assert {Path(m["path"]).name for m in verified} == {"t4.jpg", "t4-copy.jpg"}
    unverified = lookup.matches(emb, None, 0.5)
    assert len(unverified) > 2


def test_an_incremental_run_verifies_only_the_new_pairs(
    tile_run: tuple[Path, Path, dict[str, str]], tmp_path: Path
) -> None:
    import shutil

    from pipelines.build_index import build_index

    data, run, _ = tile_run
    work_data, work_run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(data, work_data)
    shutil.copytree(run, work_run)
    build_index(str(work_data), str(work_run), clusters=2)
    first = find_duplicates(work_run, threshold=0.5, full=True)
    # a new copy of tile 2 (which had none): mirrored and cropped, then saved as PNG
    new = work_data / "t2-new.png"
    edited(Image.open(work_data / "t2.jpg")).save(new)
    build_index(str(work_data), str(work_run), clusters=2)
    second = find_duplicates(work_run, threshold=0.5)
    assert second.searched == 1

    def pairs_judged(report) -> int:  # noqa: ANN001
        return sum(report.verification[k] for k in ("verified", "rejected", "unverifiable"))

    # only the new image's pairs were verified; the others' verdicts were kept
    assert 0 < second.verification["checked_now"] == pairs_judged(second) - pairs_judged(first)
    groups = {m.path: {x.path for x in g.members} for g in second.groups for m in g.members}
    assert groups[str(new)] == {str(new), str(work_data / "t2.jpg")}
    assert len(second.groups) == len(first.groups) + 1


def test_many_pairs_are_verified_as_ray_tasks_with_the_same_verdicts(
    tile_run: tuple[Path, Path, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import pipelines.duplicates
    from imgsim.duplicates.groups import verify_here
    from pipelines.duplicates import duplicates, ray_pair_verifier

    data, run, copies = tile_run
    paths = sorted(str(p) for p in data.iterdir())
    a, b = np.triu_indices(len(paths), 1)
    here = verify_here(paths, a, b)
    assert (ray_pair_verifier()(paths, a, b) == here).all()
    assert (here == verify.VERIFIED).sum() >= len(copies)
    # `imgsim duplicates` on a collection with more pairs than it verifies in the process
    monkeypatch.setattr(pipelines.duplicates, "IN_PROCESS_MAX_PAIRS", 0)
    summary = duplicates(run, threshold=0.5, full=True, out=tmp_path)
    groups = [json.loads(line) for line in (tmp_path / "duplicates.jsonl").read_text().splitlines()]
    assert summary["groups"] == len(copies) == len(groups)
    assert {frozenset(m["path"] for m in g["members"]) for g in groups} == {
        frozenset(p) for p in copies.items()
    }


def test_threads_give_the_verdicts_of_one_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Features are computed on several threads at once, for images of different sizes (OpenCV objects
    that keep per-image buffers must not be shared between them)."""
    paths = []
    for i, tile in enumerate(tiles(4) + tiles(5)):
        side = 160 + 24 * i
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(jpeg(tile.resize((side, side)), 80))
        paths.append(tmp_path / f"{i}-copy.jpg")
        paths[-1].write_bytes(jpeg(edited(tile)))
    names = [str(p) for p in paths]
    # each image with its next 4 (its copy among them), in chunks of 40 pairs of images of many sizes (a
    # pair ORB does not verify also gets the dense check, ~40 ms, so not all 630 pairs)
    monkeypatch.setattr(verify, "CHUNK_PAIRS", 40)
    a = np.repeat(np.arange(len(names)), 4)
    b = a + np.tile(np.arange(1, 5), len(names))
    a, b = a[b < len(names)], b[b < len(names)]

    def read(path: str) -> bytes:
        return Path(path).read_bytes()

    one = verify.verify_pairs(names, a, b, read, threads=1)
    assert (one[0] == verify.VERIFIED).sum() >= len(names) // 2
    assert (one[0] == verify.REJECTED).sum() >= len(names) // 2
    for _ in range(3):
        many = verify.verify_pairs(names, a, b, read, threads=8)
        assert (many[0] == one[0]).all() and (many[1] == one[1]).all()
