"""Where images come from: a local folder or an `s3://bucket/prefix`.

Listing returns metadata only (path, label, size, change token); bytes are read later, in
parallel, by the ingest pipeline. S3 filesystems are built explicitly from the standard AWS
settings, because pyarrow's `S3FileSystem()` does not read `AWS_ENDPOINT_URL` by itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pyarrow.fs as pafs

from imgsim.config import IMAGE_EXTENSIONS
from imgsim.errors import ImgsimError


class SourceError(ImgsimError):
    """A DATA folder or prefix that cannot be listed or read."""


@dataclass(frozen=True)
class ImageRef:
    """One image found under a root.

    `mtime` is the change token used by incremental indexing: the modification time in
    nanoseconds for local files and S3 objects (S3's LastModified), together with `size`.
    """

    path: str
    label: str | None
    size: int
    mtime: int


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _aws_setting(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None, profile: str | None) -> pafs.S3FileSystem:
    kwargs: dict[str, object] = {}
    access_key = _aws_setting("AWS_ACCESS_KEY_ID")
    secret_key = _aws_setting("AWS_SECRET_ACCESS_KEY")
    token = _aws_setting("AWS_SESSION_TOKEN")
    if not (access_key and secret_key):
        # Profiles, SSO, instance roles: let boto3's credential chain find them.
        import boto3

        creds = boto3.Session(profile_name=profile).get_credentials()
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            access_key, secret_key, token = frozen.access_key, frozen.secret_key, frozen.token
    if access_key and secret_key:
        kwargs.update(access_key=access_key, secret_key=secret_key, session_token=token)
    else:
        kwargs["anonymous"] = True
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    kwargs["region"] = region or "us-east-1"
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem from AWS_ENDPOINT_URL(_S3), AWS keys, AWS_REGION and AWS_PROFILE."""
    return _s3_filesystem(
        _aws_setting("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
        _aws_setting("AWS_REGION", "AWS_DEFAULT_REGION"),
        _aws_setting("AWS_PROFILE"),
    )


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `uri` and the path to hand it (bucket/key for S3)."""
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://") :]
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def label_for(root: str, path: str) -> str | None:
    """The first sub-folder of `path` under `root`, or None for an image directly in `root`."""
    rel = path[len(root) :].lstrip("/") if path.startswith(root) else path
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 else None


def list_images(root: str) -> list[ImageRef]:
    """Every image under `root` (recursively, sorted by path). Raises `SourceError` if unreadable."""
    fs, base = filesystem_for(root)
    base = base.rstrip("/")
    try:
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.NotFound and not is_s3(root):
            raise SourceError(f"{root}: no such folder — check the path")
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=is_s3(root)))
    except SourceError:
        raise
    except (OSError, ValueError) as e:
        hint = " — check AWS_ENDPOINT_URL, credentials and the bucket name" if is_s3(root) else ""
        raise SourceError(f"{root}: cannot list ({e}){hint}") from None
    prefix = "s3://" if is_s3(root) else ""
    refs = []
    for f in infos:
        if f.type != pafs.FileType.File or not is_image_name(f.base_name) or f.base_name.startswith("."):
            continue
        mtime = f.mtime_ns if f.mtime_ns is not None else 0
        refs.append(ImageRef(prefix + f.path, label_for(base, f.path), int(f.size or 0), int(mtime)))
    if not refs:
        raise SourceError(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    refs.sort(key=lambda r: r.path)
    return refs


def read_bytes(uri: str) -> bytes:
    """The bytes of a local file or an `s3://` object."""
    fs, path = filesystem_for(uri)
    with fs.open_input_stream(path) as f:
        return f.read()
