"""Ingest: stream images from a folder or `s3://` prefix into Ray Data rows.

    list (driver, metadata only) → `ray.data.from_blocks` (path, label) → `map_batches(read + decode)`

Rows: `path` (as listed: absolute local path or `s3://` URI), `label` (first sub-folder, or None),
`image` (uint8 C×S×S from `imgsim.decode.decode_image`), `error` (None, or why the input was
skipped — its image is then all zeros and must not be used), plus `read_s` / `decode_s` (each
row's share of its batch's time in those stages, for stage timing). Every listed input appears
exactly once; a file that is bad, unreadable or gone by the time it is read becomes an error row,
never a failed job. The driver holds only the listing, never image bytes or pixels.

    ray job submit --working-dir . -- python -m pipelines.ingest DATA --image-size 32
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import ray
from ray.data.extensions import ArrowTensorArray

from imgsim.config import DEFAULTS, MAX_FILE_BYTES
from imgsim.decode import greyscale_bytes, try_decode
from imgsim.errors import ImgsimError
from imgsim.sources import (
    FileTooLarge,
    ImageRef,
    apply_aws_settings,
    aws_settings,
    is_s3,
    list_images,
    read_bytes,
)

#: Images per decode task: at least this many, to amortise Ray's per-task overhead ...
READ_BATCH = 256
#: ... and at most this many, so that data streams (see `read_batch_size`).
MAX_READ_BATCH = 2048
#: Most listing rows per input block (so a huge listing is not one block per 256 images).
MAX_INPUT_BLOCKS = 2000
#: Parallel reads inside one task for S3 (latency-bound); local files are read one by one.
S3_READ_THREADS = 8

#: Kept for callers that compare against it; `error` is None for a good image.
NO_ERROR = None


def as_text(value: object) -> str | None:
    """A text cell (`error` or `label`) as a string, or None for None / "" / NaN."""
    return value if isinstance(value, str) and value != "" else None


error_reason = as_text  # the skip reason in an `error` cell, or None when the image is fine


def ok_mask(errors: Sequence[object] | np.ndarray) -> np.ndarray:
    """Boolean mask of the rows whose image decoded."""
    return np.array([error_reason(e) is None for e in errors], dtype=bool)


def _read_one(path: str, max_bytes: int) -> tuple[bytes | None, str | None]:
    """(bytes, None), or (None, reason) for a file that cannot be read."""
    try:
        return read_bytes(path, max_bytes=max_bytes), None
    except FileNotFoundError:
        return None, "file vanished before it could be read"
    except FileTooLarge as e:
        return None, str(e)
    except IsADirectoryError:
        return None, "unreadable (is a directory)"
    except PermissionError:
        return None, "unreadable (permission denied)"
    except Exception as e:  # OSError from S3 or a flaky disk, and anything odd: skip, do not crash
        return None, f"unreadable ({str(e).strip() or type(e).__name__})"


def read_all(
    paths: Sequence[str], max_bytes: int, threads: int = 1
) -> Iterator[tuple[bytes | None, str | None]]:
    """`_read_one` for each path, in order; with threads, a bounded window of reads runs ahead."""
    if threads <= 1:
        for path in paths:
            yield _read_one(path, max_bytes)
        return
    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        ahead = iter(paths)
        for path in ahead:
            pending.append(pool.submit(_read_one, path, max_bytes))
            if len(pending) >= 2 * threads:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(ahead, None)
            if nxt is not None:
                pending.append(pool.submit(_read_one, nxt, max_bytes))
            yield result


def _table(
    paths: Sequence[str],
    labels: Sequence[object],
    images: np.ndarray,
    errors: Sequence[str | None],
    read_s: float,
    decode_s: float,
) -> pa.Table:
    # An Arrow table with explicit types: a batch whose labels or errors are all None stays a
    # string column of nulls (as a numpy dict it would become a float column of NaN).
    n = len(paths)
    return pa.table(
        {
            "path": pa.array([str(p) for p in paths], pa.string()),
            "label": pa.array([as_text(v) for v in labels], pa.string()),
            "image": ArrowTensorArray.from_numpy(images),
            "error": pa.array(list(errors), pa.string()),
            "read_s": pa.array(np.full(n, read_s / max(n, 1)), pa.float64()),
            "decode_s": pa.array(np.full(n, decode_s / max(n, 1)), pa.float64()),
        }
    )


def read_and_decode(
    batch: dict[str, np.ndarray],
    image_size: int,
    channels: int,
    aws: dict[str, str] | None = None,
    keep_errors: bool = True,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> pa.Table:
    """Map a batch of `{path, label}` to ingest rows; an input that fails becomes an error row."""
    apply_aws_settings(aws)
    paths = [str(p) for p in batch["path"]]
    n = len(paths)
    images = np.zeros((n, channels, image_size, image_size), dtype=np.uint8)
    errors: list[str | None] = [None] * n
    threads = S3_READ_THREADS if any(is_s3(p) for p in paths) else 1
    read_s = decode_s = 0.0
    t0 = time.perf_counter()
    for i, (data, reason) in enumerate(read_all(paths, max_file_bytes, threads)):
        t1 = time.perf_counter()
        read_s += t1 - t0
        if data is None:
            errors[i] = reason
        else:
            try:
                arr, errors[i] = try_decode(data, image_size, channels, max_bytes=max_file_bytes)
            except Exception as e:  # a decoder bug must cost one image, not the job
                arr, errors[i] = None, f"could not decode ({type(e).__name__}: {e})"
            if arr is not None:
                images[i] = arr
        del data
        t0 = time.perf_counter()
        decode_s += t0 - t1
    labels = list(batch["label"])
    if not keep_errors:  # dropped here, in the same task: re-batching tensor columns is costly
        keep = [i for i in range(n) if errors[i] is None]
        paths, labels, errors = [paths[i] for i in keep], [labels[i] for i in keep], [None] * len(keep)
        images = images[keep]
    return _table(paths, labels, images, errors, read_s, decode_s)


def refs_dataset(refs: Sequence[ImageRef], batch_size: int = READ_BATCH) -> ray.data.Dataset:
    """A dataset of `{path, label}` (string columns) in blocks small enough that every core gets work."""
    rows_per_block = max(batch_size, -(-len(refs) // MAX_INPUT_BLOCKS))
    blocks = [
        pa.table(
            {
                "path": pa.array([r.path for r in refs[i : i + rows_per_block]], pa.string()),
                "label": pa.array([r.label for r in refs[i : i + rows_per_block]], pa.string()),
            }
        )
        for i in range(0, len(refs), rows_per_block)
    ]
    if not blocks:
        blocks = [pa.table({"path": pa.array([], pa.string()), "label": pa.array([], pa.string())})]
    # from_blocks keeps the blocks as they are and computes their metadata here; from_arrow sends
    # them to a task for it, a ray.get that cost 1.2 s before anything ran on a fresh cluster.
    return ray.data.from_blocks(blocks)


def read_batch_size(n_images: int) -> int:
    """Images per decode task: about 4 tasks per CPU in the cluster, within [READ_BATCH, MAX_READ_BATCH].

    Every task costs Ray a fixed overhead, which matters because a draft-mode JPEG decode takes
    well under a millisecond: on 2 cores, 12,000 512x512 JPEGs decoded at 2,200 img/s in tasks of
    256 and 3,400 img/s in tasks of 2,048 (a plain single-process loop: 2,600 img/s). Four tasks
    per CPU keep every core busy to the end.
    """
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    return int(min(MAX_READ_BATCH, max(READ_BATCH, n_images // (4 * max(cpus, 1)))))


def read_images(
    root: str,
    image_size: int,
    channels: int,
    *,
    refs: Sequence[ImageRef] | None = None,
    keep_errors: bool = True,
    concurrency: int | None = None,
    batch_size: int | None = None,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> ray.data.Dataset:
    """Rows `{path, label, image, error, read_s, decode_s}` for every image under `root`.

    `refs` (from `imgsim.sources.list_images`, possibly filtered or shuffled) replaces the listing
    of `root`. `keep_errors=False` drops the rows of skipped inputs. `concurrency` caps the number
    of decode tasks running at once (default: as many as there are free CPUs). `batch_size`: images
    per decode task (default `read_batch_size`).
    """
    refs = list_images(root) if refs is None else refs
    batch_size = batch_size or read_batch_size(len(refs))
    ds = refs_dataset(refs, batch_size)
    # Ray Data reserves part of the cluster for each operator by default; with one decode operator
    # that left a core idle for the first second and between tasks. Off: 12,000 JPEGs on 2 cores
    # decoded at 4,500 img/s instead of 3,300 (bench/ingest.py).
    ds.context.op_resource_reservation_enabled = False
    return ds.map_batches(
        read_and_decode,
        fn_kwargs={
            "image_size": image_size,
            "channels": channels,
            "aws": aws_settings(),
            "keep_errors": keep_errors,
            "max_file_bytes": max_file_bytes,
        },
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=concurrency,
    )


def detect_channels(source: str | Sequence[ImageRef], sample: int = 64, seed: int = 0) -> int:
    """1 if every sampled image is greyscale, else 3.

    `source` is a root (listed here) or refs. Up to `sample` images, picked at random with `seed`,
    are read in the driver; unreadable ones are ignored, and 3 is returned if none can be read.
    """
    refs = list_images(source) if isinstance(source, str) else list(source)
    picked = [r.path for r in random.Random(seed).sample(refs, min(sample, len(refs)))]
    threads = S3_READ_THREADS if any(is_s3(p) for p in picked) else 1
    seen_grey = False
    for data, _ in read_all(picked, MAX_FILE_BYTES, threads):
        grey = None if data is None else greyscale_bytes(data)
        if grey is False:
            return 3
        seen_grey = seen_grey or bool(grey)
    return 1 if seen_grey else 3


def reason_kind(reason: str) -> str:
    """The category of a skip reason ("corrupt or truncated image (…)" → "corrupt or truncated image")."""
    return reason.split(" (")[0].split(":")[0].strip()


def summarise(ds: ray.data.Dataset) -> tuple[int, list[tuple[str, str]]]:
    """(number of good images, [(path, reason)] of skipped inputs), streaming through `ds`."""
    good, skipped = 0, []
    for batch in ds.select_columns(["path", "error"]).iter_batches(batch_size=4096, batch_format="numpy"):
        for path, err in zip(batch["path"], batch["error"], strict=True):
            reason = error_reason(err)
            if reason is None:
                good += 1
            else:
                skipped.append((str(path), reason))
    skipped.sort()
    return good, skipped


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.ingest DATA`: decode everything once and report what would be skipped."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.ingest",
        description="Decode every image under DATA (a folder or s3://bucket/prefix) and report what is skipped.",
    )
    parser.add_argument("data", metavar="DATA")
    parser.add_argument("--image-size", type=int, default=DEFAULTS.preprocess.image_size)
    parser.add_argument("--channels", choices=["auto", "1", "3"], default="auto")
    parser.add_argument("--concurrency", type=int, default=None, help="most decode tasks at once")
    parser.add_argument("--skipped", metavar="FILE", help="also write the skipped inputs as JSON lines")
    parser.add_argument("--show", type=int, default=20, help="skipped inputs to print (default 20)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    try:
        refs = list_images(args.data)
        channels = detect_channels(refs) if args.channels == "auto" else int(args.channels)
        started = time.perf_counter()
        ds = read_images(args.data, args.image_size, channels, refs=refs, concurrency=args.concurrency)
        good, skipped = summarise(ds)
    except ImgsimError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    took = time.perf_counter() - started
    if args.skipped:
        from imgsim.runs import atomic_write_bytes

        lines = "".join(json.dumps({"path": p, "reason": r}) + "\n" for p, r in skipped)
        atomic_write_bytes(args.skipped, lines.encode())
    kinds = Counter(reason_kind(r) for _, r in skipped)
    if args.json:
        summary = {
            "data": args.data,
            "files": len(refs),
            "images": good,
            "skipped": len(skipped),
            "skipped_by_reason": dict(kinds.most_common()),
            "image_size": args.image_size,
            "channels": channels,
            "seconds": round(took, 2),
        }
        print(json.dumps(summary))
        return 0
    print(
        f"{len(refs)} files: {good} images decoded to {channels}x{args.image_size}x{args.image_size}, "
        f"{len(skipped)} skipped, in {took:.1f} s ({len(refs) / max(took, 1e-9):.0f} files/s)"
    )
    for kind, count in kinds.most_common():
        print(f"  {count:>6}  {kind}")
    for path, reason in skipped[: args.show]:
        print(f"  skipped {path}: {reason}")
    if len(skipped) > args.show:
        print(
            f"  … and {len(skipped) - args.show} more" + (f" (all in {args.skipped})" if args.skipped else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
