"""Ingest: stream images from a folder or `s3://` prefix into Ray Data rows.

    list (driver, metadata only) → `ray.data.from_blocks` (path, label) → `map_batches(read + decode)`

Rows: the ingest rows of `imgsim.data.rows` (path, label, image, error, content_hash, width, height,
read_s, decode_s). Every listed input appears exactly once; a file that is bad, unreadable or gone
by the time it is read becomes an error row, never a failed job. The driver holds only the
listing, never image bytes or pixels.

    ray job submit --working-dir . -- python -m pipelines.ingest DATA --image-size 32   # = imgsim ingest
"""

from __future__ import annotations

import io
import json
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from PIL import Image

from imgsim.config import DEFAULTS, MAX_FILE_BYTES
from imgsim.console.progress import bar, stage
from imgsim.data.decode import DecodeError, decode_image_and_size, greyscale_bytes
from imgsim.data.rows import content_hash, error_reason, text_array
from imgsim.data.sources import (
    FileTooLarge,
    ImageRef,
    apply_aws_settings,
    aws_settings,
    is_s3,
    list_images,
    list_table,
    read_bytes,
)
from pipelines.runtime import ensure_ray, initialised_ray

if TYPE_CHECKING:  # Ray is imported where a job is built: embedding in this process never needs it
    import ray

#: Images per decode task: at least this many, to amortise Ray's per-task overhead ...
READ_BATCH = 256
#: ... and at most this many, so that data streams (see `read_batch_size`).
MAX_READ_BATCH = 2048
#: Most listing rows per input block (so a huge listing is not one block per 256 images).
MAX_INPUT_BLOCKS = 2000
#: Parallel reads inside one task for S3 (latency-bound); local files are read one by one.
S3_READ_THREADS = 8


def list_inputs(root: str) -> list[ImageRef]:
    """`list_images(root)`, shown as the "list" stage on the console."""
    with stage(f"list {root}", unit="images") as p:
        refs = list_images(root)
        p.set(len(refs))
    return refs


def list_inputs_table(root: str, *, ordered: bool = True) -> pa.Table:
    """`imgsim.data.sources.list_table(root, ordered=...)` (Arrow columns: what an index of millions
    lists), shown as the "list" stage on the console."""
    with stage(f"list {root}", unit="images") as p:
        table = list_table(root, ordered=ordered)
        p.set(table.num_rows)
    return table


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
    hashes: Sequence[str | None],
    sizes: np.ndarray,
    read_s: float,
    decode_s: float,
) -> pa.Table:
    """Ingest rows as an Arrow table with explicit types (see `imgsim.data.rows`)."""
    from ray.data.extensions import ArrowTensorArray  # here: a process embedding in itself never needs it

    n = len(paths)
    return pa.table(
        {
            "path": pa.array([str(p) for p in paths], pa.string()),
            "label": text_array(labels),
            "image": ArrowTensorArray.from_numpy(images),
            "error": text_array(errors),
            "content_hash": text_array(hashes),
            "width": pa.array(sizes[:, 0], pa.int32()),
            "height": pa.array(sizes[:, 1], pa.int32()),
            "read_s": pa.array(np.full(n, read_s / max(n, 1)), pa.float64()),
            "decode_s": pa.array(np.full(n, decode_s / max(n, 1)), pa.float64()),
        }
    )


def _decode(data: bytes, image_size: int, channels: int, max_bytes: int) -> tuple[Any, Any, str | None]:
    """(array, (width, height), None), or (None, (0, 0), reason) for an input that cannot be used."""
    try:
        arr, size = decode_image_and_size(data, image_size, channels, max_bytes=max_bytes)
        return arr, size, None
    except DecodeError as e:
        return None, (0, 0), e.reason
    except Exception as e:  # a decoder bug must cost one image, not the job
        return None, (0, 0), f"could not decode ({type(e).__name__}: {e})"


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
    columns = decode_columns(batch, image_size, channels, keep_errors, max_file_bytes)
    extra = columns.pop("extra")
    table = _table(**columns)
    for name, values in extra.items():
        table = table.append_column(name, pa.array(values))
    return table


def decode_batch(
    batch: dict[str, np.ndarray], image_size: int, channels: int, max_file_bytes: int = MAX_FILE_BYTES
) -> dict[str, np.ndarray]:
    """`read_and_decode`'s rows as the numpy batch Ray Data would hand the next stage (images as one
    uint8 array), without an Arrow table in between: for embedding in this process."""
    columns = decode_columns(batch, image_size, channels, True, max_file_bytes)
    n = len(columns["paths"])

    def objects(values: list[Any]) -> np.ndarray:
        out = np.empty(n, object)
        out[:] = values
        return out

    return {
        "path": objects(columns["paths"]),
        "label": objects(columns["labels"]),
        "image": columns["images"],
        "error": objects(columns["errors"]),
        "content_hash": objects(columns["hashes"]),
        "width": columns["sizes"][:, 0],
        "height": columns["sizes"][:, 1],
        "read_s": np.full(n, columns["read_s"] / max(n, 1)),
        "decode_s": np.full(n, columns["decode_s"] / max(n, 1)),
        **columns["extra"],
    }


def decode_columns(
    batch: dict[str, np.ndarray],
    image_size: int,
    channels: int,
    keep_errors: bool = True,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> dict[str, Any]:
    """`read_and_decode`'s rows as Python columns (the images one uint8 array), for a caller in this
    process that wants arrays, not an Arrow table: `paths`, `labels`, `images`, `errors`, `hashes`,
    `sizes`, `read_s`, `decode_s`, and `extra` (the batch's other columns, e.g. size, mtime)."""
    paths = [str(p) for p in batch["path"]]
    n = len(paths)
    images = np.zeros((n, channels, image_size, image_size), dtype=np.uint8)
    sizes = np.zeros((n, 2), dtype=np.int32)
    errors: list[str | None] = [None] * n
    hashes: list[str | None] = [None] * n
    threads = S3_READ_THREADS if any(is_s3(p) for p in paths) else 1
    read_s = decode_s = 0.0
    t0 = time.perf_counter()
    for i, (data, reason) in enumerate(read_all(paths, max_file_bytes, threads)):
        t1 = time.perf_counter()
        read_s += t1 - t0
        if data is None:
            errors[i] = reason
        else:
            hashes[i] = content_hash(data)
            arr, sizes[i], errors[i] = _decode(data, image_size, channels, max_file_bytes)
            if arr is not None:
                images[i] = arr
        del data
        t0 = time.perf_counter()
        decode_s += t0 - t1
    labels = list(batch["label"])
    extra = {k: v for k, v in batch.items() if k not in ("path", "label")}  # e.g. size, mtime
    if not keep_errors:  # dropped here, in the same task: re-batching tensor columns is costly
        keep = [i for i in range(n) if errors[i] is None]
        paths, labels, hashes = [paths[i] for i in keep], [labels[i] for i in keep], [hashes[i] for i in keep]
        errors, images, sizes = [None] * len(keep), images[keep], sizes[keep]
        extra = {k: v[keep] for k, v in extra.items()}
    return {"paths": paths, "labels": labels, "images": images, "errors": errors, "hashes": hashes,
            "sizes": sizes, "read_s": read_s, "decode_s": decode_s, "extra": extra}  # fmt: skip


def refs_table(refs: Sequence[ImageRef] | pa.Table) -> pa.Table:
    """A listing (`imgsim.data.sources.list_table`) as it is; ImageRefs as the same columns."""
    if isinstance(refs, pa.Table):
        return refs
    return pa.table(
        {
            "path": pa.array([r.path for r in refs], pa.string()),
            "label": pa.array([r.label for r in refs], pa.string()),
            "size": pa.array([r.size for r in refs], pa.int64()),
            "mtime": pa.array([r.mtime for r in refs], pa.int64()),
        }
    )


def refs_dataset(refs: Sequence[ImageRef] | pa.Table, batch_size: int = READ_BATCH) -> ray.data.Dataset:
    """A dataset of the listing's rows (`path`, `label`, and `size`, `mtime`, which the rows carry
    through to the end) in blocks small enough that every core gets work."""
    import ray

    table = refs_table(refs)
    rows_per_block = max(batch_size, -(-table.num_rows // MAX_INPUT_BLOCKS))
    blocks = [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]
    # from_blocks keeps the blocks as they are and computes their metadata here; from_arrow sends
    # them to a task for it, a ray.get that cost over a second before anything ran on a fresh
    # cluster (docs/scaling.md, "Figures behind decisions").
    return ray.data.from_blocks(blocks or [table])


def read_batch_size(n_images: int) -> int:
    """Images per decode task: about 4 tasks per CPU in the cluster, within [READ_BATCH, MAX_READ_BATCH].

    Every task costs Ray a fixed overhead, which matters because a draft-mode JPEG decode takes
    well under a millisecond, so larger tasks were much faster (docs/scaling.md, "Figures behind
    decisions"). Four tasks per CPU keep every core busy to the end.
    """
    ray = initialised_ray()
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray is not None else 1
    return int(min(MAX_READ_BATCH, max(READ_BATCH, n_images // (4 * max(cpus, 1)))))


def read_images(
    root: str,
    image_size: int,
    channels: int,
    *,
    refs: Sequence[ImageRef] | pa.Table | None = None,
    keep_errors: bool = True,
    concurrency: int | None = None,
    batch_size: int | None = None,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> ray.data.Dataset:
    """Rows `{path, label, image, error, read_s, decode_s, size, mtime}` for every image under `root`.

    `refs` (a `imgsim.data.sources.list_table` listing or `list_images` refs, possibly filtered or
    shuffled) replaces the listing of `root`. `keep_errors=False` drops the rows of skipped inputs. `concurrency` caps the number
    of decode tasks running at once (default: as many as there are free CPUs). `batch_size`: images
    per decode task (default `read_batch_size`).
    """
    import ray

    refs = list_table(root) if refs is None else refs
    batch_size = batch_size or read_batch_size(len(refs))
    ds = refs_dataset(refs, batch_size)
    # Ray Data reserves part of the cluster for each operator by default; with one decode operator
    # that left a core idle for the first second and between tasks (bench/ingest.py; docs/scaling.md,
    # "Figures behind decisions").
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
        compute=ray.data.TaskPoolStrategy(size=concurrency),
    )


@dataclass(frozen=True)
class DataSample:
    """What a random sample of the inputs says about the data: channels and pixel sizes."""

    channels: int  # 1 if every readable sampled image is greyscale, else 3
    sizes: list[tuple[int, int]]  # (width, height) of each readable sampled image


def sample_data(source: str | Sequence[ImageRef], sample: int = 64, seed: int = 0) -> DataSample:
    """Read up to `sample` images, picked at random with `seed`, in the driver (headers and colour
    only; unreadable ones are ignored). `source` is a root (listed here) or refs."""
    refs = list_images(source) if isinstance(source, str) else list(source)
    picked = [r.path for r in random.Random(seed).sample(refs, min(sample, len(refs)))]
    threads = S3_READ_THREADS if any(is_s3(p) for p in picked) else 1
    colour, seen_grey, sizes = False, False, []
    for data, _ in read_all(picked, MAX_FILE_BYTES, threads):
        if data is None:
            continue
        grey = greyscale_bytes(data)
        colour = colour or grey is False
        seen_grey = seen_grey or bool(grey)
        try:
            with Image.open(io.BytesIO(data)) as img:
                sizes.append(img.size)
        except Exception:  # not an image: the decode step skips and reports it
            continue
    return DataSample(1 if seen_grey and not colour else 3, sizes)


def detect_channels(source: str | Sequence[ImageRef], sample: int = 64, seed: int = 0) -> int:
    """1 if every sampled image is greyscale, else 3 (3 too if none can be read); see `sample_data`."""
    return sample_data(source, sample, seed).channels


def reason_kind(reason: str) -> str:
    """The category of a skip reason ("corrupt or truncated image (…)" → "corrupt or truncated image")."""
    return reason.split(" (")[0].split(":")[0].strip()


def summarise(ds: ray.data.Dataset, total: int | None = None) -> tuple[int, list[tuple[str, str]]]:
    """(number of good images, [(path, reason)] of skipped inputs), streaming through `ds` (a
    "decode" progress bar of `total` inputs)."""
    good, skipped = 0, []
    batches = ds.select_columns(["path", "error"]).iter_batches(batch_size=4096, batch_format="numpy")
    with bar(total, "decode", "images") as p:
        for batch in batches:
            for path, err in zip(batch["path"], batch["error"], strict=True):
                reason = error_reason(err)
                if reason is None:
                    good += 1
                else:
                    skipped.append((str(path), reason))
            p.update(len(batch["path"]))
    skipped.sort()
    return good, skipped


def check_images(
    data: str,
    image_size: int = DEFAULTS.preprocess.image_size,
    channels: int | None = None,
    *,
    concurrency: int | None = None,
    skipped_out: str | None = None,
) -> dict[str, Any]:
    """Decode everything under `data` once, as indexing would; report what is usable and what is
    skipped (`skipped_inputs`: sorted (path, reason) pairs; also written to `skipped_out` as JSON lines)."""
    from imgsim.io.atomic import atomic_write_bytes

    refs = list_inputs(data)
    channels = channels or detect_channels(refs)
    ensure_ray()
    started = time.perf_counter()
    ds = read_images(data, image_size, channels, refs=refs, concurrency=concurrency)
    good, skipped = summarise(ds, len(refs))
    took = time.perf_counter() - started
    if skipped_out:
        lines = "".join(json.dumps({"path": p, "reason": r}) + "\n" for p, r in skipped)
        atomic_write_bytes(skipped_out, lines.encode())
    return {
        "data": data,
        "files": len(refs),
        "images": good,
        "skipped": len(skipped),
        "skipped_by_reason": dict(Counter(reason_kind(r) for _, r in skipped).most_common()),
        "image_size": image_size,
        "channels": channels,
        "seconds": round(took, 2),
        "skipped_inputs": skipped,
    }


if __name__ == "__main__":
    from imgsim.console.command import run_as_module
    from pipelines.commands.ingest import COMMAND

    sys.exit(run_as_module(COMMAND))
