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

import os
import random
import re
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
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
#: Local folders are listed by GNU find processes (at most one per core, and `LIST_PROCESSES`), each
#: given a share of the top-level folders: find does the `stat` of each file in C, and its output
#: becomes Arrow columns without a Python object per file. 1M files: 5.8 s through pyarrow's
#: listing (which holds the GIL to turn each file into a row), ~3 s with two finds (docs/results.md, "A million images").
LIST_PROCESSES = 4
#: Starting folders handed to one find command (well under the kernel's argument-size limit).
FIND_FOLDERS_PER_CALL = 1000

#: The columns of a listing table (`list_table`), one row per image.
LISTING_SCHEMA = pa.schema(
    [("path", pa.string()), ("label", pa.string()), ("size", pa.int64()), ("mtime", pa.int64())]
)


#: An image file name (`IMAGE_EXTENSIONS`, any case), and a path with a hidden file or folder in it.
_IMAGE_NAME = "(?i)(" + "|".join(re.escape(ext) for ext in IMAGE_EXTENSIONS) + ")$"
_HIDDEN_PART = r"(^|/)\."


def _rows(paths: pa.Array, cut: int, sizes: pa.Array, mtimes: pa.Array, shown: str) -> pa.Table:
    """Listing rows from the columns of the regular files found (`paths` as found: `cut` characters
    of base folder, then a "/", then the relative path): the filtering (image names, hidden parts) and
    the labels (first folder under the base) are Arrow kernels over the columns."""
    rel = pc.utf8_ltrim(pc.utf8_slice_codeunits(paths, cut), "/")
    keep = pc.and_(
        pc.match_substring_regex(rel, _IMAGE_NAME), pc.invert(pc.match_substring_regex(rel, _HIDDEN_PART))
    )
    rel = rel.filter(keep)
    first = pc.list_element(pc.split_pattern(rel, "/", max_splits=1), 0)
    labels = pc.if_else(pc.match_substring(rel, "/"), first, pa.scalar(None, pa.string()))
    joined = pc.binary_join_element_wise(shown + "/", rel, "")
    return pa.Table.from_arrays(
        [joined, labels, sizes.filter(keep), mtimes.filter(keep)], schema=LISTING_SCHEMA
    )


def _listing_rows(infos: list[pafs.FileInfo], base: str, shown: str) -> pa.Table:
    """The image files among `infos` (pyarrow's listing, found under `base`) as listing rows; each
    file costs three attribute reads in Python."""
    files = [f for f in infos if f.type == pafs.FileType.File]
    return _rows(
        pa.array([f.path for f in files], pa.string()),
        len(base),
        pa.array([f.size or 0 for f in files], pa.int64()),
        pa.array([f.mtime_ns or 0 for f in files], pa.int64()),
        shown,
    )


def _folder_rows(fs: pafs.FileSystem, folder: str, base: str, shown: str, s3: bool = False) -> pa.Table:
    """The listing rows of everything under `folder` (one recursive listing, retried on S3)."""
    selector = pafs.FileSelector(folder, recursive=True)
    return _listing_rows(retrying(lambda: fs.get_file_info(selector), s3), base, shown)


def list_table(root: str, *, ordered: bool = True) -> pa.Table:
    """Every image under `root`, recursively, as an Arrow table (`LISTING_SCHEMA`: path, label, size,
    mtime) sorted by path (`ordered=False`: in the order found, for a caller that sorts only the rows
    it keeps: sorting a million paths takes ~0.6 s); raises `SourceError` if there is none.

    Images have one of `IMAGE_EXTENSIONS` (any case). Hidden files and folders (name starting with
    ".") are left out, as are things that are not regular files; symbolic links are followed. `root`
    may also be one image file. Local folders are listed by GNU find processes (`_find_rows`); S3
    prefixes, and local folders where find is missing or fails, by pyarrow, each top-level folder on
    its own (`LIST_THREADS` at a time) and turned into columns at once, so a million images never
    exist as a million Python objects.
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
        tables = [_listing_rows(top, base, shown)]
        found = None if s3 or not folders else _find_rows(folders, base, shown)
        if found is not None:
            tables.append(found)
        elif folders:
            with ThreadPoolExecutor(min(LIST_THREADS, len(folders))) as pool:
                tables += pool.map(lambda folder: _folder_rows(fs, folder, base, shown, s3), folders)
    except SourceError:
        raise
    except (OSError, ValueError) as e:
        raise SourceError(f"{root}: cannot list ({str(e).strip()}) — {_hint(root)}") from None
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        raise SourceError(
            f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, any case) — {_hint(root)}"
        )
    return (table.sort_by("path") if ordered else table).combine_chunks()


def _find_rows(folders: list[str], base: str, shown: str) -> pa.Table | None:
    """The listing rows of the local `folders`, from GNU find processes (a share of the folders each,
    run at once); None where find is missing, is not GNU find (no -fprintf), or fails in any way (a
    folder that cannot be read, a path that is not UTF-8): then pyarrow lists them instead, and says
    what is wrong."""
    n = max(1, min(os.cpu_count() or 1, LIST_PROCESSES, len(folders)))
    shares = [folders[i::n] for i in range(n)]
    try:  # find's output goes to a temporary folder: one that cannot be made is find failing too
        with tempfile.TemporaryDirectory(prefix="imgsim-list-") as tmp, ThreadPoolExecutor(n) as pool:
            found = list(pool.map(lambda i: _find_share(shares[i], f"{tmp}/{i}"), range(n)))
    except OSError:
        return None
    if any(part is None for part in found):
        return None
    paths, sizes, mtimes = (pa.chunked_array([part[k] for part in found]) for k in range(3))  # type: ignore[index]
    if base.endswith("/") or shown != base:
        return _rows(paths, len(base), sizes, mtimes, shown)
    # find has already left out hidden parts and non-images, and printed each path as `base/rel`:
    # only the labels remain, the component after base's (every file is in a top-level folder)
    label = base.count("/") + 1
    labels = pc.list_element(pc.split_pattern(paths, "/", max_splits=label + 1), label)
    return pa.Table.from_arrays([paths, labels, sizes, mtimes], schema=LISTING_SCHEMA)


#: find's test for an image name: `-iname '*.png' -o ...` for each of `IMAGE_EXTENSIONS`.
_FIND_IMAGE_NAMES = [
    arg
    for i, ext in enumerate(IMAGE_EXTENSIONS)
    for arg in ([] if i == 0 else ["-o"]) + ["-iname", f"*{ext}"]
]


def _find_share(
    folders: list[str], prefix: str, follow: bool = False
) -> tuple[pa.Array, pa.Array, pa.Array] | None:
    """(paths, sizes, mtimes in ns) of the regular files under `folders` (hidden ones pruned, links
    followed), by GNU find in calls of `FIND_FOLDERS_PER_CALL` folders; None if any call fails.

    find writes three files: the paths of regular files NUL-terminated (a name may hold any byte but
    NUL), per such file `size.seconds.fraction` (its %s and %T@), which pyarrow's CSV reader parses in
    C, and the paths of symbolic links. find does not follow links itself (-H: only the starting
    folders): it then stats each file by its name in an open folder, where following links makes it
    stat the whole path (0.4 s less on 1M files, docs/results.md). A link is stat'ed here instead: a link to
    an image is listed under the link's path, a link to a folder is listed by find with every link
    followed (-L, `follow`), as is all under it; broken links are left out, as find -L leaves them."""
    parts = []
    for start in range(0, len(folders), FIND_FOLDERS_PER_CALL):
        base = f"{prefix}-{start}"
        names, numbers, links = f"{base}.paths", f"{base}.numbers", f"{base}.links"
        command = ["find", "-L" if follow else "-H", *folders[start : start + FIND_FOLDERS_PER_CALL],
                   "-mindepth", "1", "(", "-name", ".*", "-prune", ")",
                   "-o", "(", "-type", "f", "(", *_FIND_IMAGE_NAMES, ")",
                   "-fprint0", names, "-fprintf", numbers, r"%s.%T@\n", ")",
                   "-o", "(", "-type", "l", "-fprint0", links, ")"]  # fmt: skip
        try:
            done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True)
            if done.returncode != 0 or done.stdout:
                return None
            parts.append(_parse_find(names, numbers))
            linked, linked_folders = _followed_links(links)
            parts.append(linked)
        except (OSError, ValueError, pa.ArrowInvalid):
            return None
        if linked_folders:
            below = _find_share(linked_folders, f"{base}-linked", follow=True)
            if below is None:
                return None
            parts.append(below)
    return tuple(pa.concat_arrays([p[k] for p in parts]) for k in range(3))  # type: ignore[return-value]


def _followed_links(links: str) -> tuple[tuple[pa.Array, pa.Array, pa.Array], list[str]]:
    """The rows of the links (NUL-terminated paths in the file `links`) to image files, and the links
    to folders; ValueError for a path that is not UTF-8 (as in `_parse_find`)."""
    with open(links, "rb") as f:
        found = [p.decode() for p in f.read().split(b"\0")[:-1]]
    paths, sizes, mtimes, folders = [], [], [], []
    for path in found:
        try:
            st = os.stat(path)
        except OSError:  # broken, or a loop
            continue
        if stat.S_ISDIR(st.st_mode):
            folders.append(path)
        elif stat.S_ISREG(st.st_mode) and is_image_name(path):
            paths.append(path)
            sizes.append(st.st_size)
            mtimes.append(st.st_mtime_ns)
    rows = (pa.array(paths, pa.string()), pa.array(sizes, pa.int64()), pa.array(mtimes, pa.int64()))
    return rows, folders


def _parse_find(names: str, numbers: str) -> tuple[pa.Array, pa.Array, pa.Array]:
    """The columns of one find call's two files (`_find_share`); ValueError if they disagree."""
    with open(names, "rb") as f:
        data = f.read()
    ends = np.flatnonzero(np.frombuffer(data, np.uint8) == 0)
    offsets = np.concatenate([[0], ends + 1]).astype(np.int64)
    with_nul = pa.Array.from_buffers(
        pa.large_binary(), len(ends), [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )
    paths = pc.binary_slice(with_nul, 0, -1).cast(pa.large_string()).cast(pa.string())  # UTF-8 checked
    if os.path.getsize(numbers) == 0:
        table = pa.table(
            {"size": pa.array([], pa.int64()), "s": pa.array([], pa.int64()), "f": pa.array([], pa.string())}
        )
    else:
        table = pacsv.read_csv(
            numbers,
            read_options=pacsv.ReadOptions(column_names=["size", "s", "f"]),
            parse_options=pacsv.ParseOptions(delimiter=".", quote_char=False),
            convert_options=pacsv.ConvertOptions(
                column_types={"size": pa.int64(), "s": pa.int64(), "f": pa.string()},
                strings_can_be_null=False,
            ),
        )
    if table.num_rows != len(paths) or (table.num_rows and pc.min(table["s"]).as_py() < 0):
        raise ValueError("find's two outputs disagree, or a time before 1970")  # pyarrow lists instead
    fraction = pc.utf8_slice_codeunits(pc.utf8_rpad(table["f"], 9, "0"), 0, 9).cast(pa.int64())
    mtimes = pc.add(pc.multiply(table["s"], 1_000_000_000), fraction)
    return paths, table["size"].combine_chunks(), mtimes.combine_chunks()


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
