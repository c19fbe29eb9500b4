"""Embed: a Ray Data actor pool runs the encoder over every image.

The mapper is a callable class (clip-retrieval's shape): `__init__` loads the model once per actor,
`__call__(batch)` maps a batch of ingest rows to embeddings. Error rows pass through with their
reason and a zero embedding. Rows carry per-stage seconds (read / decode / encode) so the job can
report which stage is slow.

    ray job submit --working-dir . -- python -m pipelines.embed DATA --model RUN --out PARQUET_DIR
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from imgsim.config import DEFAULTS
from imgsim.console.progress import bar, log
from imgsim.data.rows import as_text, ok_mask
from imgsim.data.sources import ImageRef, is_s3
from imgsim.models import autoencoder as model_lib
from pipelines.ingest import decode_batch, read_images
from pipelines.runtime import ensure_ray

if TYPE_CHECKING:  # Ray is imported where a job is built: embedding in this process never needs it
    import ray

SLOW_READ_SHARE = 0.5  # S3 reads taking more than this share of worker time are worth a line


class Embedder:
    """Ray Data mapper: uint8 images → float32 embeddings with the run's encoder."""

    def __init__(self, run: str, use_gpu: bool = False, threads: int | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = model_lib.load(run, device=self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        started = time.perf_counter()
        ok = ok_mask(batch["error"])
        emb = np.zeros((len(ok), self.model.config.dim), dtype=np.float32)
        if ok.any():
            emb[ok] = self.model.embed(batch["image"][ok])
        encode_s = (time.perf_counter() - started) / max(len(ok), 1)
        out = {k: v for k, v in batch.items() if k != "image"}
        out["embedding"] = emb
        out["encode_s"] = np.full(len(ok), encode_s)
        return out


def embed_dataset(
    ds: ray.data.Dataset,
    run: str,
    *,
    concurrency: int | None = None,
    use_gpu: bool = False,
    batch_size: int = DEFAULTS.index.embed_batch_size,
) -> ray.data.Dataset:
    """Map ingest rows to `{path, label, embedding, error, read_s, decode_s, encode_s}` with
    `concurrency` actors (default: `actor_count(use_gpu)`)."""
    import ray

    concurrency = concurrency or actor_count(use_gpu)
    return ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"run": run, "use_gpu": use_gpu, "threads": None if use_gpu else 1},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
    )


def actor_count(use_gpu: bool) -> int:
    """Embedding actors by default: one per GPU of the cluster with --gpu (each holds a whole GPU),
    else `IndexConfig.concurrency`."""
    if use_gpu:
        import ray

        return max(1, int(ray.cluster_resources().get("GPU", 0)))
    return DEFAULTS.index.concurrency


@dataclass
class StageTimes:
    """Seconds spent per stage, summed over all rows (workers run in parallel, so the sum of the
    stages can exceed wall time)."""

    read: float = 0.0
    decode: float = 0.0
    encode: float = 0.0
    write: float = 0.0
    rows: int = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        self.read += float(np.sum(batch["read_s"]))
        self.decode += float(np.sum(batch["decode_s"]))
        self.encode += float(np.sum(batch["encode_s"]))
        self.rows += len(batch["path"])

    def breakdown(self) -> str:
        """Which stage the time went to (clip-retrieval's per-stage timing)."""
        write = f", driver write {self.write:.1f}" if self.write >= 0.05 else ""
        return (
            f"worker seconds: read {self.read:.1f}, decode {self.decode:.1f}, encode {self.encode:.1f}{write}"
        )

    def warn_if_slow_reads(self, data: str) -> None:
        """One line when reading from S3 took most of the workers' time (the store, not imgsim, is
        the bottleneck)."""
        busy = self.read + self.decode + self.encode
        if is_s3(data) and self.rows and busy > 0 and self.read / busy > SLOW_READ_SHARE:
            log(
                f"slow S3: reading took {100 * self.read / busy:.0f} % of the workers' time "
                f"({1000 * self.read / self.rows:.0f} ms per image from {data}); a store in the same "
                "region as the cluster, or more CPUs for the reads, would help"
            )


def embed_images(
    root: str,
    run: str,
    *,
    refs: list[ImageRef] | None = None,
    concurrency: int | None = None,
    use_gpu: bool = False,
    batch_size: int = DEFAULTS.index.embed_batch_size,
) -> ray.data.Dataset:
    """The embedding dataset for every image under `root` (or `refs`), preprocessed as the model expects."""
    cfg = model_lib.load(run).config
    ds = read_images(root, cfg.image_size, cfg.channels, refs=refs)
    return embed_dataset(ds, run, concurrency=concurrency, use_gpu=use_gpu, batch_size=batch_size)


def embed_in_process(
    todo: pa.Table, run: str, *, batch_size: int = DEFAULTS.index.embed_batch_size
) -> Iterator[dict[str, np.ndarray]]:
    """The embedding rows of a listing (`imgsim.data.sources.list_table` columns), computed in this process
    with the same read/decode and `Embedder` as the Ray Data job, one batch at a time: a thread reads
    and decodes the next batch while the encoder (which leaves Python's lock) embeds this one, in one
    torch thread (with one per core, torch's idle threads spin on the core the decoding needs; this
    process's torch thread count is restored afterwards).

    For a handful of images: a Ray Data job first starts its actor pool (seconds, more on a busy
    machine), which costs more than embedding a few thousand small images here (docs/scaling.md).
    """
    import torch

    threads = torch.get_num_threads()
    embedder = Embedder(run, threads=1)
    cfg = embedder.model.config

    def decoded(start: int) -> dict[str, np.ndarray]:
        chunk = todo.slice(start, batch_size)
        batch = {name: chunk[name].to_numpy(zero_copy_only=False) for name in chunk.column_names}
        return decode_batch(batch, cfg.image_size, cfg.channels)

    starts = range(0, todo.num_rows, batch_size)
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(decoded, starts[0]) if starts else None
            for i in range(len(starts)):
                batch = pending.result()  # type: ignore[union-attr]
                pending = pool.submit(decoded, starts[i + 1]) if i + 1 < len(starts) else None
                yield embedder(batch)
    finally:
        torch.set_num_threads(threads)


def embed_folder(
    root: str, run: str, **kwargs: Any
) -> tuple[list[str], list[str | None], np.ndarray, list[dict]]:
    """(paths, labels, embeddings, skipped records) for every image under `root` — for eval queries."""
    from pipelines.ingest import list_inputs

    refs = list_inputs(root)
    ensure_ray()
    paths: list[str] = []
    labels: list[str | None] = []
    chunks: list[np.ndarray] = []
    skipped: list[dict] = []
    times = StageTimes()
    batches = embed_images(root, run, refs=refs, **kwargs).iter_batches(batch_size=4096, batch_format="numpy")
    with bar(len(refs), "embed", "images") as progress:
        for batch in batches:
            times.add(batch)
            ok = ok_mask(batch["error"])
            skipped += [
                {"path": str(p), "reason": str(e)}
                for p, e in zip(batch["path"][~ok], batch["error"][~ok], strict=True)
            ]
            paths += [str(p) for p in batch["path"][ok]]
            labels += [as_text(lab) for lab in batch["label"][ok]]
            chunks.append(batch["embedding"][ok])
            progress.update(len(batch["path"]))
        progress.note(times.breakdown())
    times.warn_if_slow_reads(root)
    emb = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    return paths, labels, emb, skipped


def write_embeddings(
    root: str, run: str, out: str, *, concurrency: int | None = None, use_gpu: bool = False
) -> None:
    """Embed every image under `root` and write the embedding rows (no timings) as Parquet under `out`."""
    from imgsim.data.sources import filesystem_for

    ensure_ray()
    ds = embed_images(root, run, concurrency=concurrency, use_gpu=use_gpu)
    fs, path = filesystem_for(out)
    ds.drop_columns(["read_s", "decode_s", "encode_s"]).write_parquet(path, filesystem=fs)


if __name__ == "__main__":
    import sys

    from imgsim.console.command import run_as_module
    from pipelines.commands.embed import COMMAND

    sys.exit(run_as_module(COMMAND))
