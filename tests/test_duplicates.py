"""`imgsim duplicates` on real files, indexed by the real pipeline with a mirror-invariant encoder.

The collection: distinct originals; for each, a byte-identical copy, a re-encoded JPEG, a crop and a
mirrored copy; and *siblings*: unrelated images drawn by the same recipe, so they look alike.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from toy_models import mirror_invariant_model, save_model

from imgsim.cli import main
from imgsim.duplicates.groups import complete_linkage, find_duplicates, group_embeddings

SIDE = 96
ORIGINALS = 6


def scene(rng: np.random.Generator) -> Image.Image:
    """A greyscale scene: a tilted gradient and bright and dark blobs, off-centre (asymmetric)."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
    img = 60 + xx * rng.uniform(40, 120) + yy * rng.uniform(-50, 50)
    for sign in (1, 1, -1, 1):
        cx, cy, r = rng.uniform(0.05, 0.7), rng.uniform(0.1, 0.9), rng.uniform(0.06, 0.16)
        img += sign * 110 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L")


def write_collection(
    root: Path, originals: int = ORIGINALS, siblings: int = 6, seed: int = 0
) -> dict[str, list[Path]]:
    """{original path: [its copies]} plus "siblings": PNG originals, copies of four kinds, siblings."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[Path]] = {}
    for i in range(originals):
        img = scene(rng)
        original = root / f"o{i}.png"
        img.save(original)
        exact = root / f"o{i}-copy.png"
        shutil.copyfile(original, exact)
        jpeg = root / f"o{i}-reencoded.jpg"
        img.save(jpeg, quality=70)
        crop = root / f"o{i}-crop.png"
        img.crop((4, 3, SIDE - 5, SIDE - 4)).save(crop)
        mirror = root / f"o{i}-mirror.png"
        ImageOps.mirror(img).save(mirror)
        groups[str(original)] = [exact, jpeg, crop, mirror]
    groups["siblings"] = []
    for j in range(siblings):
        sibling = root / f"s{j}.png"
        scene(rng).save(sibling)
        groups["siblings"].append(sibling)
    return groups


@pytest.fixture(scope="module")
def dup_run(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> tuple[Path, Path, dict]:
    """(data, run, planted groups): the collection indexed by `build_index` with the toy encoder."""
    from pipelines.build_index import build_index

    base = tmp_path_factory.mktemp("dups")
    data = base / "data"
    planted = write_collection(data)
    run = save_model(mirror_invariant_model(image_size=32), base / "run")
    build_index(str(data), str(run), clusters=2)
    return data, run, planted


def _groups_by_path(report) -> dict[str, set[str]]:  # noqa: ANN001
    return {m.path: {x.path for x in g.members} for g in report.groups for m in g.members}


def test_copies_are_grouped_with_their_originals_and_siblings_are_not(
    dup_run: tuple[Path, Path, dict],
) -> None:
    _, run, planted = dup_run
    report = find_duplicates(run)
    assert report.threshold_source == "calibrated" and report.threshold > 0
    by_path = _groups_by_path(report)
    siblings = {str(p) for p in planted["siblings"]}
    for original, copies in planted.items():
        if original == "siblings":
            continue
        group = by_path.get(original, set())
        assert {str(c) for c in copies} <= group, (original, group)
        assert not group & siblings
    for group in report.groups:
        # the byte-identical pair is marked exact; every distance is to the kept image
        assert group.members[0].path == group.keep and group.members[0].distance == 0.0
        exact = {m.path for m in group.members if m.exact}
        assert len(exact) in (0, 2)
        assert group.reason
    assert len(report.groups) == ORIGINALS
    # the original and its byte-identical copy have the same pixels: neither is the smaller crop
    assert all(not g.keep.endswith("-crop.png") for g in report.groups)
    assert all(Path(g.keep).name.startswith(("o", "s")) and "-reencoded" not in g.keep for g in report.groups)


def test_the_keep_rule_prefers_more_pixels_then_the_larger_file(tmp_path: Path) -> None:
    from imgsim.duplicates.groups import choose_keep

    paths = ["a.jpg", "b.jpg", "c.jpg"]
    pixels, sizes = np.array([100, 400, 400]), np.array([10, 20, 30])
    mtimes = np.array([3, 2, 1]) * 10**18  # nanoseconds
    assert choose_keep([0, 1, 2], paths, pixels, sizes, mtimes) == (
        2,
        "largest file (30 bytes) among those with the most pixels",
    )
    row, reason = choose_keep([0, 1], paths, pixels, sizes, mtimes)
    assert row == 1 and reason.startswith("most pixels")
    row, reason = choose_keep([1, 2], paths, pixels, np.array([5, 5, 5]), mtimes)
    assert row == 2 and reason.startswith("oldest")


def test_no_chain_merges_two_far_apart_images() -> None:
    """A~B and B~C within the threshold but A and C twice as far: complete linkage keeps A and C apart."""
    angles = np.radians([0.0, 10.0, 20.0, 90.0, 180.0])
    emb = np.zeros((5, 8), np.float32)
    emb[:, 0], emb[:, 1] = np.cos(angles), np.sin(angles)
    emb[3:, 2] = 1.0  # far from everything
    threshold = 1 - np.cos(np.radians(12.0))  # 10 degrees apart: duplicates; 20 degrees: not
    groups = group_embeddings(emb, threshold, metric="cosine")
    assert len(groups) == 1 and len(groups[0]) == 2
    assert set(groups[0].tolist()) in ({0, 1}, {1, 2})
    # pairs reported within the threshold still merge only if the vectors agree: A-C is checked
    pairs = (np.array([0, 1]), np.array([1, 2]), np.array([0.01, 0.01], np.float32))
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert len(complete_linkage(5, *pairs, unit, "cosine", threshold)[0]) == 2


def test_exact_duplicates_only_by_content_hash() -> None:
    emb = np.eye(4, dtype=np.float32)
    groups = group_embeddings(emb, 0.01, content_hashes=["h1", "h2", "h1", None])
    assert [sorted(g.tolist()) for g in groups] == [[0, 2]]


def test_reports_and_the_html_page_in_a_browser(
    dup_run: tuple[Path, Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, run, _ = dup_run
    out = tmp_path / "report"
    assert main(["duplicates", "--model", str(run), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    for key in ("groups", "images_in_groups", "exact_groups", "threshold", "threshold_source"):
        assert key in summary, key
    assert summary["groups"] == ORIGINALS and summary["exact_groups"] == 0
    assert summary["threshold_source"] == "stored calibration"
    lines = [json.loads(line) for line in (out / "duplicates.jsonl").read_text().splitlines()]
    assert len(lines) == summary["groups"]
    for line in lines:
        assert set(line) >= {"group", "keep", "reason", "members"}
        assert all(set(m) >= {"path", "distance", "exact"} for m in line["members"])
    rows = list(csv.DictReader((out / "duplicates.csv").open()))
    assert len(rows) == summary["images_in_groups"]
    assert set(rows[0]) >= {"path", "group", "keep", "distance"}
    assert sum(r["keep"] == "true" for r in rows) == summary["groups"]

    from test_web import CHROMIUM, CHROMIUM_ARGS

    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(offline=True)  # the page needs nothing from a network
            page.goto((out / "duplicates.html").as_uri())
            assert page.locator("section.group").count() == summary["groups"]
            assert page.locator("li.member").count() == summary["images_in_groups"]
            assert page.locator("li.member.keep").count() == summary["groups"]
            page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
            page.screenshot(path=str(tmp_path / "duplicates.png"), full_page=True)
        finally:
            browser.close()


def test_an_incremental_run_finds_the_new_duplicates(
    dup_run: tuple[Path, Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipelines.build_index import build_index

    data, run, _ = dup_run
    work_data, work_run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(data, work_data)
    shutil.copytree(run, work_run)
    base = build_index(str(work_data), str(work_run), clusters=2)
    first = find_duplicates(work_run, full=True)  # the copied run may hold the fixture's state
    assert first.searched > 0
    # two new images: a copy of a sibling (a new group) and another copy of an original
    sibling = work_data / "s0.png"
    Image.open(sibling).save(work_data / "s0-again.jpg", quality=80)
    ImageOps.mirror(Image.open(work_data / "o1.png")).save(work_data / "o1-mirror-again.jpg", quality=90)
    build_index(str(work_data), str(work_run), clusters=2)
    second = find_duplicates(work_run)
    assert second.images == base["images"] + 2
    assert second.searched == 2  # only the new images were searched
    assert second.reused_pairs > 0
    by_path = _groups_by_path(second)
    assert str(work_data / "s0-again.jpg") in by_path[str(sibling)]
    assert str(work_data / "o1-mirror-again.jpg") in by_path[str(work_data / "o1.png")]
    assert len(second.groups) == len(first.groups) + 1
    # the same groups as a full run
    full = find_duplicates(work_run, full=True)
    assert full.searched > second.searched
    assert [sorted(m.path for m in g.members) for g in full.groups] == [
        sorted(m.path for m in g.members) for g in second.groups
    ]


def test_nprobe_reaches_the_range_search(
    dup_run: tuple[Path, Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`imgsim duplicates --nprobe N` scans N partitions per image (an exact index ignores it: the same
    groups)."""
    from imgsim.index.knn import KnnIndex

    _, run, _ = dup_run
    default = find_duplicates(run, full=True)
    seen: list[int | None] = []
    search = KnnIndex.range_search

    def spy(self: KnnIndex, q: np.ndarray, max_distance: float, **kwargs: object) -> object:
        seen.append(kwargs.get("nprobe"))  # type: ignore[arg-type]
        return search(self, q, max_distance, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(KnnIndex, "range_search", spy)
    fewer = find_duplicates(run, full=True, nprobe=3)
    assert seen and set(seen) == {3}
    assert [sorted(m.path for m in g.members) for g in fewer.groups] == [
        sorted(m.path for m in g.members) for g in default.groups
    ]
