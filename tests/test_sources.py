"""Listing images under a folder or an s3:// prefix (a real moto S3 server), labels, reading bytes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import make_pattern_image, upload_tree

from imgsim.config import MAX_FILE_BYTES
from imgsim.data import sources
from imgsim.data.sources import FileTooLarge, label_for, list_images, read_bytes, s3_filesystem
from imgsim.errors import ImgsimError


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """cats/ and dogs/ (one nested deeper), a top-level image, upper-case extensions, non-images, hidden files."""
    root = tmp_path / "data"
    for rel in [
        "cats/a.png",
        "cats/B.JPG",
        "dogs/puppies/c.jpeg",
        "dogs/d.Tiff",
        "top.WebP",
        "e.gif",
        "f.bmp",
    ]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        make_pattern_image(0, seed=1, mode="RGB").save(root / rel, format=_format(rel))
    (root / "cats" / "notes.txt").write_text("not an image")
    (root / "cats" / ".hidden.png").write_bytes(b"editor junk")
    (root / ".thumbnails").mkdir()
    (root / ".thumbnails" / "x.png").write_bytes(b"cache")
    (root / "folder.png").mkdir()  # a folder with an image-like name is not an image
    return root


def _format(rel: str) -> str:
    ext = rel.rsplit(".", 1)[1].lower()
    return {"jpg": "JPEG", "jpeg": "JPEG", "tiff": "TIFF", "tif": "TIFF"}.get(ext, ext.upper())


EXPECTED = {
    "cats/B.JPG": "cats",
    "cats/a.png": "cats",
    "dogs/d.Tiff": "dogs",
    "dogs/puppies/c.jpeg": "dogs",
    "e.gif": None,
    "f.bmp": None,
    "top.WebP": None,
}


def test_lists_images_recursively_sorted_with_labels(tree: Path) -> None:
    refs = list_images(str(tree))
    assert [r.path for r in refs] == sorted(str(tree / rel) for rel in EXPECTED)
    assert {Path(r.path).relative_to(tree).as_posix(): r.label for r in refs} == EXPECTED
    for r in refs:
        assert r.size == os.path.getsize(r.path) and r.mtime == os.stat(r.path).st_mtime_ns


def test_find_and_pyarrow_list_the_same_rows(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Local folders are listed by GNU find processes; where find cannot run (here: not on PATH),
    pyarrow lists them instead, with the same rows: links followed, hidden files and folders, FIFOs
    and non-images left out, names with spaces, newlines and non-ASCII letters kept."""
    for folder in ("birds", "fish", "zebras"):
        (tree / folder / ".cache").mkdir(parents=True)
        make_pattern_image(0, seed=2).save(tree / folder / "x.PNG")
        (tree / folder / ".cache" / "y.png").write_bytes(b"cache")
        (tree / folder / "z.txt").write_text("not an image")
    make_pattern_image(1, seed=2).save(tree / "fish" / "a name\nwith ünïcode.png")
    os.mkfifo(tree / "fish" / "pipe.png")
    (tree / "linked").symlink_to(tree / "dogs", target_is_directory=True)
    (tree / "birds" / "link.png").symlink_to(tree / "cats" / "a.png")
    (tree / "cats" / "more").symlink_to(tree / "dogs" / "puppies", target_is_directory=True)
    (tree / "cats" / "gone.png").symlink_to(tree / "no-such-image.png")  # broken: left out
    os.utime(tree / "cats" / "a.png", ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    calls: list[list[str]] = []
    run = subprocess.run

    def spy(command: list[str], *args: object, **kwargs: object) -> object:
        calls.append(command)
        return run(command, *args, **kwargs)

    monkeypatch.setattr(sources.subprocess, "run", spy)
    by_find = sources.list_table(str(tree))
    assert calls and all(c[0] == "find" for c in calls)
    shares = [c for c in calls if "-L" not in c]  # a linked folder is listed by a find -L of its own
    assert len(shares) == min(os.cpu_count() or 1, sources.LIST_PROCESSES)  # one share each
    assert [c[2] for c in calls if "-L" in c] == [str(tree / "cats" / "more")]
    monkeypatch.setattr(
        sources.tempfile, "tempdir", str(tree / "no-such-folder")
    )  # no room for find's output
    calls.clear()
    assert sources.list_table(str(tree)).equals(by_find) and not calls
    monkeypatch.undo()
    monkeypatch.setattr(sources.subprocess, "run", spy)
    monkeypatch.setenv("PATH", str(tree / "cats"))  # no find there
    calls.clear()
    by_pyarrow = sources.list_table(str(tree))
    assert calls and by_pyarrow.equals(by_find)
    listed = {Path(p).relative_to(tree).as_posix(): m for p, m in zip(
        by_find["path"].to_pylist(), by_find["mtime"].to_pylist(), strict=True)}  # fmt: skip
    assert set(listed) == {
        *EXPECTED, "birds/x.PNG", "fish/x.PNG", "zebras/x.PNG", "fish/a name\nwith ünïcode.png",
        "birds/link.png", "linked/d.Tiff", "linked/puppies/c.jpeg", "cats/more/c.jpeg",
    }  # fmt: skip
    assert listed["cats/a.png"] == listed["birds/link.png"] == 1_700_000_000_123_456_789
    sizes = dict(zip(by_find["path"].to_pylist(), by_find["size"].to_pylist(), strict=True))
    assert all(size == os.path.getsize(path) for path, size in sizes.items())


def test_find_lists_in_calls_of_a_bounded_number_of_folders(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many top-level folders go to find in several calls (the kernel bounds a command's length)."""
    for i in range(7):
        (tree / f"folder{i}").mkdir()
        make_pattern_image(i, seed=3).save(tree / f"folder{i}" / "x.png")
    alone = sources.list_table(str(tree))
    monkeypatch.setattr(sources, "FIND_FOLDERS_PER_CALL", 2)
    assert sources.list_table(str(tree)).equals(alone) and alone.num_rows == len(EXPECTED) + 7


def test_relative_root_gives_absolute_paths(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree.parent)
    refs = list_images("data/")
    assert [r.path for r in refs] == [r.path for r in list_images(str(tree))]
    assert all(os.path.isabs(r.path) for r in refs)


def test_a_single_image_can_be_the_root(tree: Path) -> None:
    [ref] = list_images(str(tree / "cats" / "a.png"))
    assert ref.path == str(tree / "cats" / "a.png") and ref.label is None


def test_change_token_follows_modification(tree: Path) -> None:
    path = tree / "cats" / "a.png"
    before = {r.path: r for r in list_images(str(tree))}[str(path)]
    os.utime(path, ns=(before.mtime + 5_000_000_000, before.mtime + 5_000_000_000))
    after = {r.path: r for r in list_images(str(tree))}[str(path)]
    assert after.mtime != before.mtime and after.size == before.size


def test_missing_or_empty_root_says_what_to_check(tmp_path: Path) -> None:
    with pytest.raises(ImgsimError, match="no such folder — check the path"):
        list_images(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(ImgsimError, match="no images found"):
        list_images(str(tmp_path / "empty"))


def test_fifo_named_like_an_image_is_not_listed(tree: Path) -> None:
    os.mkfifo(tree / "cats" / "pipe.jpg")  # reading it would block forever
    assert "pipe.jpg" not in {Path(r.path).name for r in list_images(str(tree))}


def test_label_for() -> None:
    assert label_for("/data", "/data/cats/a.png") == "cats"
    assert label_for("/data/", "/data/cats/x/y/a.png") == "cats"
    assert label_for("/data", "/data/a.png") is None
    assert label_for("/data", "/database/cats/a.png") is None  # not under the root
    assert label_for("s3://bucket/prefix", "s3://bucket/prefix/cats/a.png") == "cats"
    assert label_for("s3://bucket/prefix/", "s3://bucket/prefix/a.png") is None
    assert label_for("s3://bucket", "s3://bucket/cats/a.png") == "cats"


def test_read_bytes_local(tree: Path) -> None:
    path = tree / "cats" / "a.png"
    assert read_bytes(str(path)) == path.read_bytes()
    with pytest.raises(FileNotFoundError):
        read_bytes(str(tree / "gone.png"))


def test_over_size_files_are_refused_without_reading_them(tmp_path: Path) -> None:
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: no 64 MiB written
    with pytest.raises(FileTooLarge, match="file too large") as caught:
        read_bytes(str(huge))
    assert isinstance(caught.value, OSError) and isinstance(caught.value, ImgsimError)
    assert read_bytes(str(huge), max_bytes=None)[:4] == b"\x00\x00\x00\x00"


# --- S3, against a real S3-compatible HTTP server (moto) -----------------------------------------


def test_s3_listing_matches_the_disk_listing(tree: Path, s3_bucket: str) -> None:
    upload_tree(s3_bucket, tree, "photos/2024")
    upload_tree(s3_bucket, tree / "cats", "photos/2024x")  # a sibling prefix that must not leak in
    for root in [f"s3://{s3_bucket}/photos/2024", f"s3://{s3_bucket}/photos/2024/"]:
        refs = list_images(root)
        assert [r.path for r in refs] == [f"s3://{s3_bucket}/photos/2024/{rel}" for rel in sorted(EXPECTED)]
        assert {r.path.rsplit("2024/", 1)[1]: r.label for r in refs} == EXPECTED
        assert all(r.size == os.path.getsize(tree / r.path.rsplit("2024/", 1)[1]) for r in refs)
        assert all(r.mtime > 1_600_000_000 * 10**9 for r in refs)  # LastModified, in nanoseconds
    ref = list_images(f"s3://{s3_bucket}/photos/2024/cats")[0]
    assert read_bytes(ref.path) == (tree / "cats" / "B.JPG").read_bytes()
    with pytest.raises(FileNotFoundError):
        read_bytes(f"s3://{s3_bucket}/photos/2024/cats/gone.png")
    with pytest.raises(FileTooLarge):
        read_bytes(ref.path, max_bytes=ref.size - 1)


def test_s3_missing_bucket_or_prefix_says_what_to_check(s3_bucket: str) -> None:
    with pytest.raises(ImgsimError, match="no such bucket 'no-such-bucket' — check the bucket and prefix"):
        list_images("s3://no-such-bucket/photos")
    with pytest.raises(ImgsimError, match="no images found"):
        list_images(f"s3://{s3_bucket}/nothing-here")


def test_s3_endpoint_for_s3_takes_precedence(
    tree: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_tree(s3_bucket, tree / "cats", "p")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", os.environ["AWS_ENDPOINT_URL"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    assert len(list_images(f"s3://{s3_bucket}/p")) == 2


def test_s3_credentials_from_a_profile(
    tree: Path, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_tree(s3_bucket, tree / "cats", "p")
    credentials = tmp_path / "credentials"
    credentials.write_text("[imgsim]\naws_access_key_id = from-profile\naws_secret_access_key = secret\n")
    config = tmp_path / "config"
    config.write_text("[profile imgsim]\nregion = eu-west-1\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "imgsim")
    fs = s3_filesystem()
    assert fs.region == "eu-west-1"
    assert "from-profile" in repr(fs.__reduce__())  # the profile's keys, not anonymous access
    assert len(list_images(f"s3://{s3_bucket}/p")) == 2


def test_transient_failures_are_retried_and_permanent_ones_are_not() -> None:
    from imgsim.data.sources import retrying, transient

    calls = []

    def flaky() -> bytes:
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7")
        return b"ok"

    assert retrying(flaky, attempts=5, backoff_s=0.01) == b"ok" and len(calls) == 3
    assert not transient(FileNotFoundError("gone")) and not transient(OSError("AWS Error ACCESS_DENIED"))
    with pytest.raises(OSError, match="after 2 attempts"):
        retrying(lambda: (_ for _ in ()).throw(OSError("timed out")), attempts=2, backoff_s=0.01)


def test_a_file_that_could_not_be_read_is_tried_again_by_the_next_index(tmp_path: Path) -> None:
    import pyarrow as pa

    from imgsim.data.rows import is_read_failure
    from pipelines.build_index import FILE_COLUMNS, as_file_rows, plan_work

    listing = pa.table(
        {"path": ["a.png", "b.png", "c.png"], "label": [None] * 3, "size": [1, 1, 1], "mtime": [5, 5, 5]}
    )
    previous = as_file_rows(
        listing.append_column(
            "error", pa.array([None, "unreadable (AWS Error NETWORK_CONNECTION)", "corrupt image"])
        )
    ).select(FILE_COLUMNS)
    staged = pa.table(
        {
            "path": pa.array([], pa.string()),
            "size": pa.array([], pa.int64()),
            "mtime": pa.array([], pa.int64()),
        }
    )
    plan = plan_work(
        listing,
        staged.append_column("part", pa.array([], pa.int32())).append_column("row", pa.array([], pa.int64())),
        previous,
    )
    assert plan.todo["path"].to_pylist() == ["b.png"]  # read again; the corrupt one stays skipped
    assert sorted(plan.reused["path"].to_pylist()) == ["a.png", "c.png"]
    assert is_read_failure("unreadable (x)") and not is_read_failure("corrupt image")
