"""Where images come from: a local folder or an `s3://bucket/prefix`.

Listing returns metadata only (path, label, size, change token); bytes are read later, in
parallel, by the ingest pipeline (`pipelines.ingest`). Paths are kept as given: local paths are
absolute (the root made absolute, symlinks not resolved), S3 paths are full `s3://bucket/key` URIs.

S3 filesystems are built *explicitly* from the standard AWS settings, because pyarrow's
`S3FileSystem()` does not read `AWS_ENDPOINT_URL` by itself:

- endpoint: `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL` (MinIO, moto, any S3-compatible store);
- credentials: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, else whatever
  boto3's credential chain finds for `AWS_PROFILE` (profiles, SSO, instance roles), else anonymous
  (public buckets);
- region: `AWS_REGION`, else `AWS_DEFAULT_REGION`, else the profile's region, else us-east-1 when
  an endpoint is set.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from imgsim.config import DEFAULTS, IMAGE_EXTENSIONS, MAX_FILE_BYTES
from imgsim.errors import ImgsimError

S3_PREFIX = "s3://"
T = TypeVar("T")

#: The environment variables that decide how S3 is reached (handed on to Ray workers).
AWS_SETTINGS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)


class SourceError(ImgsimError):
    """A DATA folder or prefix that cannot be listed, or a file that cannot be read."""


class FileTooLarge(SourceError, OSError):
    """A file over the size limit, refused before its bytes are read (also an OSError: a read failure)."""


@dataclass(frozen=True)
class ImageRef:
    """One image found under a root.

    `mtime` is the change token used by incremental indexing, together with `size`: the
    modification time in integer nanoseconds since the epoch — the file's mtime for local files,
    the object's LastModified for S3 (re-uploading an object changes it, even with equal bytes).
    """

    path: str
    label: str | None
    size: int
    mtime: int


def is_s3(uri: str) -> bool:
    """True for an `s3://` URI."""
    return uri.startswith(S3_PREFIX)


def is_image_name(name: str) -> bool:
    """True if the file name has an image extension (any case)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def aws_settings() -> dict[str, str]:
    """This process's AWS settings, to hand to Ray tasks (workers may have started without them)."""
    return {k: os.environ[k] for k in AWS_SETTINGS if os.environ.get(k)}


def apply_aws_settings(settings: dict[str, str] | None) -> None:
    """Adopt the driver's AWS settings (from `aws_settings()`); settings it lacks are left as they are."""
    for key, value in (settings or {}).items():
        if key in AWS_SETTINGS and os.environ.get(key) != value:
            os.environ[key] = value


def _setting(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


@lru_cache(maxsize=8)
def _s3_filesystem(settings: tuple[tuple[str, str], ...]) -> pafs.S3FileSystem:
    env = dict(settings)
    access_key, secret_key = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    token = env.get("AWS_SESSION_TOKEN")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if not (access_key and secret_key) or not region:
        # Profiles, SSO, instance roles and the profile's region: boto3 resolves them like the AWS CLI.
        import boto3

        session = boto3.Session(profile_name=env.get("AWS_PROFILE"))
        region = region or session.region_name
        if not (access_key and secret_key):
            creds = session.get_credentials()
            if creds is not None:
                frozen = creds.get_frozen_credentials()
                access_key, secret_key, token = frozen.access_key, frozen.secret_key, frozen.token
    kwargs: dict[str, object] = {}
    if access_key and secret_key:
        kwargs.update(access_key=access_key, secret_key=secret_key, session_token=token)
    else:
        kwargs["anonymous"] = True
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.rstrip("/").rpartition("://")
        kwargs["endpoint_override"] = host
        kwargs["scheme"] = scheme or "https"
        region = region or "us-east-1"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem from this process's AWS settings (cached per distinct settings)."""
    return _s3_filesystem(tuple(sorted(aws_settings().items())))


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `uri` and the path to hand it (`bucket/key` for S3, absolute locally)."""
    if is_s3(uri):
        return s3_filesystem(), uri[len(S3_PREFIX) :]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _relative(root: str, path: str) -> str | None:
    """`path` relative to `root` with "/" separators, or None if it is not under `root`."""
    if is_s3(root) != is_s3(path):
        return None
    if is_s3(root):
        base = root.rstrip("/") + "/"
        return path[len(base) :] if path.startswith(base) else None
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return None if rel == ".." or rel.startswith(".." + os.sep) else rel.replace(os.sep, "/")


def label_for(root: str, path: str) -> str | None:
    """The first sub-folder of `path` under `root`; None for an image directly in `root` (or elsewhere)."""
    rel = _relative(root, path)
    if rel is None or rel == ".":
        return None
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 else None


def _hint(root: str) -> str:
    if is_s3(root):
        return "check the bucket and prefix, AWS_ENDPOINT_URL, the credentials and the region"
    return "check the path"


#: Top-level folders listed at once (S3 listings are latency-bound: one page of 1,000 keys a request).
LIST_THREADS = 8
#: A local listing estimated at this many files or more is shared with helper processes, one per
#: further core (at most `LIST_PROCESSES` in all): turning each file's stat into a row holds the GIL,
#: so threads do not help there (1M files: 6.7 s in one process; README, "A million images").
LIST_PARALLEL_FILES = 200_000
LIST_PROCESSES = 4

#: The columns of a listing table (`list_table`), one row per image.
LISTING_SCHEMA = pa.schema(
    [("path", pa.string()), ("label", pa.string()), ("size", pa.int64()), ("mtime", pa.int64())]
)


#: An image file name (`IMAGE_EXTENSIONS`, any case), and a path with a hidden file or folder in it.
_IMAGE_NAME = "(?i)(" + "|".join(re.escape(ext) for ext in IMAGE_EXTENSIONS) + ")$"
_HIDDEN_PART = r"(^|/)\."


def _listing_rows(infos: list[pafs.FileInfo], base: str, shown: str) -> pa.Table:
    """The image files among `infos` (found under `base`) as listing rows.

    Each file costs three attribute reads in Python; the filtering (image names, hidden parts) and
    the labels (first folder under `base`) are Arrow kernels over the columns (a third of the
    listing's time at a million files, when it was a Python loop)."""
    files = [f for f in infos if f.type == pafs.FileType.File]
    cut = len(base)
    rel = pa.array([f.path[cut:].lstrip("/") for f in files], pa.string())
    keep = pc.and_(
        pc.match_substring_regex(rel, _IMAGE_NAME), pc.invert(pc.match_substring_regex(rel, _HIDDEN_PART))
    )
    rel = rel.filter(keep)
    sizes = pa.array([f.size or 0 for f in files], pa.int64()).filter(keep)
    mtimes = pa.array([f.mtime_ns or 0 for f in files], pa.int64()).filter(keep)
    first = pc.list_element(pc.split_pattern(rel, "/", max_splits=1), 0)
    labels = pc.if_else(pc.match_substring(rel, "/"), first, pa.scalar(None, pa.string()))
    paths = pc.binary_join_element_wise(shown + "/", rel, "")
    return pa.Table.from_arrays([paths, labels, sizes, mtimes], schema=LISTING_SCHEMA)


def _folder_rows(fs: pafs.FileSystem, folder: str, base: str, shown: str, s3: bool = False) -> pa.Table:
    """The listing rows of everything under `folder` (one recursive listing, retried on S3)."""
    selector = pafs.FileSelector(folder, recursive=True)
    return _listing_rows(retrying(lambda: fs.get_file_info(selector), s3), base, shown)


def list_table(root: str) -> pa.Table:
    """Every image under `root`, recursively, as an Arrow table (`LISTING_SCHEMA`: path, label, size,
    mtime) sorted by path; raises `SourceError` if there is none.

    Images have one of `IMAGE_EXTENSIONS` (any case). Hidden files and folders (name starting with
    ".") are left out, as are things that are not regular files. `root` may also be one image file.
    Each top-level folder is listed on its own (`LIST_THREADS` at a time) and turned into columns
    at once, so a million images never exist as a million Python objects.
    """
    s3 = is_s3(root)
    fs, base = filesystem_for(root)
    base = base.rstrip("/") or base
    shown = S3_PREFIX + base if s3 else base  # how paths are reported: as given, made absolute
    try:
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            if not is_image_name(info.base_name):
                raise SourceError(f"{root}: not an image (expected one of {', '.join(IMAGE_EXTENSIONS)})")
            return pa.Table.from_pylist(
                [
                    {
                        "path": shown,
                        "label": None,
                        "size": int(info.size or 0),
                        "mtime": int(info.mtime_ns or 0),
                    }
                ],
                schema=LISTING_SCHEMA,
            )
        if info.type == pafs.FileType.NotFound and not s3:
            raise SourceError(f"{root}: no such folder — {_hint(root)}")
        if not s3 and info.type != pafs.FileType.Directory:
            raise SourceError(f"{root}: not a folder or image file — {_hint(root)}")
        top = retrying(
            lambda: fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=s3)), s3
        )
        if s3 and not top:
            bucket = base.split("/")[0]
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise SourceError(f"{root}: no such bucket {bucket!r} — {_hint(root)}")
        folders = [
            f.path for f in top if f.type == pafs.FileType.Directory and not f.base_name.startswith(".")
        ]

        def list_folder(folder: str) -> pa.Table:
            return _folder_rows(fs, folder, base, shown, s3)

        def list_folders(some: list[str]) -> list[pa.Table]:
            if not some:
                return []
            with ThreadPoolExecutor(min(LIST_THREADS, len(some))) as pool:
                return list(pool.map(list_folder, some))

        tables = [_listing_rows(top, base, shown)]
        if folders:
            tables.append(list_folder(folders[0]))  # also tells roughly how many files there are
            rest = folders[1:]
            if not s3 and tables[-1].num_rows * len(folders) >= LIST_PARALLEL_FILES:
                tables += _list_in_processes(rest, base, shown, list_folders)
            else:
                tables += list_folders(rest)
    except SourceError:
        raise
    except (OSError, ValueError) as e:
        raise SourceError(f"{root}: cannot list ({str(e).strip()}) — {_hint(root)}") from None
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        raise SourceError(
            f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, any case) — {_hint(root)}"
        )
    return table.sort_by("path").combine_chunks()


def _list_in_processes(
    folders: list[str], base: str, shown: str, list_here: Callable[[list[str]], list[pa.Table]]
) -> list[pa.Table]:
    """The listing rows of local `folders`: a share listed by each helper process (`python -c`,
    answering in Arrow IPC on stdout), one share by `list_here` meanwhile. A helper that fails has
    its share listed here instead, so the result never depends on the helpers."""
    n = min(os.cpu_count() or 1, LIST_PROCESSES, len(folders))
    shares = [folders[i::n] for i in range(n)]
    helpers = []
    for share in shares[1:]:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", "from imgsim.sources import _listing_helper; _listing_helper()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"folders": share, "base": base, "shown": shown}).encode())
            proc.stdin.close()
            helpers.append((proc, share))
        except OSError:
            helpers.append((None, share))
    tables = list_here(shares[0])
    for proc, share in helpers:
        listed = None
        if proc is not None:
            assert proc.stdout is not None
            try:
                with pa.ipc.open_stream(proc.stdout) as reader:
                    listed = reader.read_all()
            except (OSError, pa.ArrowInvalid):
                listed = None
            if proc.wait() != 0:
                listed = None
        tables += [listed] if listed is not None else list_here(share)
    return tables


def _listing_helper() -> None:
    """A helper process of `_list_in_processes`: folders on stdin (JSON), their rows on stdout."""
    job = json.load(sys.stdin)
    fs = pafs.LocalFileSystem()
    tables = [_folder_rows(fs, folder, job["base"], job["shown"]) for folder in job["folders"]]
    table = pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table()
    with pa.ipc.new_stream(sys.stdout.buffer, LISTING_SCHEMA) as writer:
        writer.write_table(table)


def list_images(root: str) -> list[ImageRef]:
    """`list_table(root)` as one `ImageRef` per image (for small collections and samples)."""
    table = list_table(root)
    return [
        ImageRef(p, lab, s, m)
        for p, lab, s, m in zip(
            table["path"].to_pylist(),
            table["label"].to_pylist(),
            table["size"].to_pylist(),
            table["mtime"].to_pylist(),
            strict=True,
        )
    ]


def transient(error: BaseException) -> bool:
    """True for a read failure that may pass if tried again (not: gone, refused, too large)."""
    if isinstance(error, FileNotFoundError | FileTooLarge | PermissionError | IsADirectoryError):
        return False
    text = str(error)
    return isinstance(error, OSError) and not any(s in text for s in _PERMANENT_S3_ERRORS)


_PERMANENT_S3_ERRORS = ("ACCESS_DENIED", "AccessDenied", "NoSuchKey", "NoSuchBucket", "INVALID_")


def retrying(call: Callable[[], T], retry: bool = True, attempts: int = DEFAULTS.read.attempts,
             backoff_s: float = DEFAULTS.read.backoff_s) -> T:  # fmt: skip
    """`call()`, tried up to `attempts` times in all while it fails in a way that may pass
    (`transient`), pausing `backoff_s`, then twice that, ... (at most `DEFAULTS.read.max_backoff_s`,
    with jitter) between tries. `retry=False`: one try."""
    pause = backoff_s
    for attempt in range(1, max(1, attempts if retry else 1) + 1):
        try:
            return call()
        except OSError as e:
            if not retry or attempt >= attempts or not transient(e):
                if attempt > 1:
                    raise OSError(f"{str(e).strip()} (after {attempt} attempts)") from None
                raise
        time.sleep(pause * random.uniform(0.5, 1.0))
        pause = min(pause * 2, DEFAULTS.read.max_backoff_s)
    raise AssertionError("unreachable")


def read_bytes(
    uri: str,
    max_bytes: int | None = MAX_FILE_BYTES,
    attempts: int = DEFAULTS.read.attempts,
    backoff_s: float = DEFAULTS.read.backoff_s,
) -> bytes:
    """The bytes of a local file or an `s3://` object.

    Raises `FileNotFoundError` if it is gone, `FileTooLarge` (without reading it all) if it holds
    more than `max_bytes`, and `OSError` for other read failures. S3 reads that fail in a way that
    may pass are tried again (`retrying`: `attempts` in all, from `backoff_s` apart).
    """
    return retrying(lambda: _read_once(uri, max_bytes), is_s3(uri), attempts, backoff_s)


def _read_once(uri: str, max_bytes: int | None) -> bytes:
    want = -1 if max_bytes is None else max_bytes + 1  # one byte more tells "too large" apart
    if not is_s3(uri):
        with open(uri, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                raise FileTooLarge(f"file too large ({size:,} bytes > {max_bytes:,})")
            # read(n) allocates n bytes first: ask for the file's size (+1 tells growth apart), not the cap
            data = f.read(size + 1)
    else:
        fs, path = filesystem_for(uri)
        with fs.open_input_stream(path) as f:
            data = f.read() if want < 0 else f.read(want)
    if max_bytes is not None and len(data) > max_bytes:
        raise FileTooLarge(f"file too large (over {max_bytes:,} bytes)")
    return data
