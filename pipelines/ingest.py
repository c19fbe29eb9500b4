"""Ingest: stream images from a folder or `s3://` prefix into Ray Data rows.

list (driver, metadata only) → `ray.data.from_items` → `map_batches(read + decode)` in parallel.
Rows: `path`, `label`, `image` (uint8 C×S×S), `error` (None, or why the input was skipped; its
image is then all zeros). The driver never holds image bytes or pixels.

    ray job submit --working-dir . -- python -m pipelines.ingest DATA --image-size 32
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from typing import Any

import numpy as np
import ray

from imgsim.decode import greyscale_bytes, try_decode
from imgsim.sources import ImageRef, list_images, read_bytes

#: Images per decode task: large enough to amortise task overhead, small enough to stream.
READ_BATCH = 256


def read_and_decode(batch: dict[str, np.ndarray], image_size: int, channels: int) -> dict[str, Any]:
    """Map a batch of refs to decoded rows; a file that cannot be read or decoded becomes an error row.

    `read_s` / `decode_s` carry each row's share of the batch's time in those stages, so a job
    can report where its time went (see pipelines.embed.stage_times).
    """
    paths = batch["path"]
    n = len(paths)
    images = np.zeros((n, channels, image_size, image_size), dtype=np.uint8)
    errors: list[str | None] = [None] * n
    read_s = decode_s = 0.0
    for i, path in enumerate(paths):
        t0 = time.perf_counter()
        try:
            data = read_bytes(str(path))
        except FileNotFoundError:
            errors[i] = "file vanished before it could be read"
            continue
        except OSError as e:
            errors[i] = f"unreadable: {e}"
            continue
        finally:
            read_s += time.perf_counter() - t0
        t1 = time.perf_counter()
        arr, errors[i] = try_decode(data, image_size, channels)
        if arr is not None:
            images[i] = arr
        decode_s += time.perf_counter() - t1
    return {
        "path": paths,
        "label": batch["label"],
        "image": images,
        "error": np.array(errors, dtype=object),
        "read_s": np.full(n, read_s / max(n, 1)),
        "decode_s": np.full(n, decode_s / max(n, 1)),
    }


def drop_errors(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep only rows that decoded."""
    keep = np.array([e is None for e in batch["error"]], dtype=bool)
    return {k: v[keep] for k, v in batch.items()}


def refs_dataset(refs: list[ImageRef], batch_size: int = READ_BATCH) -> ray.data.Dataset:
    """A dataset of image references, split so every core gets work."""
    items = [{"path": r.path, "label": r.label} for r in refs]
    blocks = max(1, min(len(items) // batch_size + 1, 2000))
    return ray.data.from_items(items, override_num_blocks=blocks)


def read_images(
    root: str,
    image_size: int,
    channels: int,
    *,
    refs: list[ImageRef] | None = None,
    keep_errors: bool = True,
    batch_size: int = READ_BATCH,
) -> ray.data.Dataset:
    """Rows `{path, label, image, error}` for every image under `root` (or for `refs`, if given)."""
    refs = list_images(root) if refs is None else refs
    ds = refs_dataset(refs, batch_size).map_batches(
        read_and_decode,
        fn_kwargs={"image_size": image_size, "channels": channels},
        batch_size=batch_size,
        batch_format="numpy",
    )
    if not keep_errors:
        ds = ds.map_batches(drop_errors, batch_format="numpy", batch_size=None)
    return ds


def detect_channels(refs: list[ImageRef], sample: int = 64, seed: int = 0) -> int:
    """1 if every sampled image is greyscale, else 3 (unreadable samples are ignored)."""
    picked = random.Random(seed).sample(refs, min(sample, len(refs)))
    for ref in picked:
        try:
            grey = greyscale_bytes(read_bytes(ref.path))
        except OSError:
            continue
        if grey is False:
            return 3
    return 1


def main() -> None:
    parser = argparse.ArgumentParser(description="Decode every image under DATA and report what was skipped.")
    parser.add_argument("data", metavar="DATA")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, choices=[1, 3], default=None)
    args = parser.parse_args()
    refs = list_images(args.data)
    channels = args.channels or detect_channels(refs)
    start = time.perf_counter()
    good, reasons = 0, Counter()
    skipped: list[tuple[str, str]] = []
    for batch in read_images(args.data, args.image_size, channels, refs=refs).iter_batches(
        batch_size=1024, batch_format="numpy"
    ):
        for path, err in zip(batch["path"], batch["error"], strict=True):
            if err is None:
                good += 1
            else:
                reasons[err.split(":")[0]] += 1
                skipped.append((str(path), str(err)))
    took = time.perf_counter() - start
    print(
        f"{len(refs)} files: {good} images decoded, {len(skipped)} skipped in {took:.1f} s ({len(refs) / took:.0f}/s)"
    )
    for path, reason in skipped[:20]:
        print(f"  skipped {path}: {reason}")


if __name__ == "__main__":
    main()
