"""The row schema: one definition of the columns that ingest, embedding, indexing and search share.

- **Ingest rows** (`pipelines.ingest.read_images`, Ray Data): `path` (str, as listed: absolute local
  path or `s3://` URI), `label` (str or null: the first sub-folder), `image` (uint8 C×S×S from
  `imgsim.data.decode`), `error` (null, or why the input was skipped: its image is then all zeros and
  must not be used), `content_hash` (hex digest of the file's bytes, null if unreadable), `width`
  / `height` (the original image's pixels, 0 if not decoded), `read_s` / `decode_s` (each row's
  share of its batch's seconds in those stages).
- **Embedding rows** (`pipelines.embed`): the ingest rows without `image`, plus `embedding`
  (float32 D, zeros on an error row) and `encode_s`.
- **File rows** (`pipelines.build_index` staging parts): the embedding rows without the timings,
  plus `size` and `mtime` of the listed file (`imgsim.data.sources.ImageRef`): what incremental
  indexing compares.
- **Index rows** (`RUN/index/embeddings.parquet`, one per usable image, row number = result id):
  `path`, `label`, `cluster` (int64), `embedding` (list<float32>), and `content_hash`, `width`,
  `height`, `size`, `mtime`.

Embeddings are stored as Arrow `list<float32>` everywhere (`embedding_array`), and read back as one
float32 (N, D) matrix without a Python object per row (`embedding_matrix`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

#: Columns of RUN/index/embeddings.parquet besides `embedding`, in order.
INDEX_COLUMNS = ("path", "label", "cluster", "content_hash", "width", "height", "size", "mtime")
#: File rows: what build_index stages per input and compares on a re-run.
FILE_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("size", pa.int64()),
        ("mtime", pa.int64()),
        ("error", pa.string()),
        ("content_hash", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("embedding", pa.list_(pa.float32())),
    ]
)


def as_text(value: object) -> str | None:
    """A text cell (`error`, `label`, `content_hash`) as a string, or None for None / "" / NaN."""
    return value if isinstance(value, str) and value != "" else None


error_reason = as_text  # the skip reason in an `error` cell, or None when the image is fine


#: Skip reasons that come from reading a file, not from its bytes: the next `imgsim index` tries
#: those files again (the store may be back), while a corrupt image stays skipped until it changes.
READ_FAILURES = ("unreadable", "file vanished")


def is_read_failure(reason: object) -> bool:
    """True for a skip reason of a file that could not be read (see `READ_FAILURES`)."""
    return isinstance(reason, str) and reason.startswith(READ_FAILURES)


def ok_mask(errors: Sequence[object] | np.ndarray) -> np.ndarray:
    """Boolean mask of the rows whose image decoded."""
    return np.array([error_reason(e) is None for e in errors], dtype=bool)


def content_hash(data: bytes) -> str:
    """The content hash stored with each row: equal bytes, equal hash (exact duplicates)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def text_array(values: Sequence[object]) -> pa.Array:
    """A string column; None / "" / NaN become null (a numpy batch of all-None would be float NaN)."""
    return pa.array([as_text(v) for v in values], pa.string())


#: Rows per Arrow chunk of an embedding column (keeps list offsets far below 2**31).
EMBEDDING_CHUNK_ROWS = 1 << 20


def embedding_array(matrix: np.ndarray) -> pa.ChunkedArray:
    """A float32 (N, D) matrix as an Arrow `list<float32>` column, built without Python lists."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    dim = matrix.shape[1] if matrix.ndim == 2 else 0
    chunks = []
    for start in range(0, len(matrix), EMBEDDING_CHUNK_ROWS):
        part = matrix[start : start + EMBEDDING_CHUNK_ROWS]
        offsets = pa.array(np.arange(len(part) + 1, dtype=np.int32) * dim)
        chunks.append(pa.ListArray.from_arrays(offsets, pa.array(part.reshape(-1), pa.float32())))
    return pa.chunked_array(chunks, type=pa.list_(pa.float32()))


def embedding_matrix(table_or_column: Any) -> np.ndarray:
    """The `embedding` column (of a table, or the column itself) as a float32 (N, D) array."""
    col = table_or_column["embedding"] if isinstance(table_or_column, pa.Table) else table_or_column
    if len(col) == 0:
        return np.zeros((0, 0), np.float32)
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    values = [c.flatten().to_numpy(zero_copy_only=False) for c in chunks if len(c)]
    flat = values[0] if len(values) == 1 else np.concatenate(values)
    return np.asarray(flat, dtype=np.float32).reshape(len(col), -1)


def read_embeddings(
    run: str | os.PathLike[str], columns: Sequence[str] = ("path", "label", "cluster")
) -> tuple[np.ndarray, dict[str, list]]:
    """(embeddings (N, D) float32, {column: values}) from RUN/index/embeddings.parquet."""
    import pyarrow.parquet as pq

    from imgsim.errors import RunNotFound
    from imgsim.io.runs import RunPaths

    path = RunPaths(run).embeddings
    if not path.is_file():
        raise RunNotFound(f"no index in {run} — run `imgsim index DATA --model {run}` first")
    table = pq.read_table(path, columns=["embedding", *columns])
    return embedding_matrix(table), {c: table[c].to_pylist() for c in columns}
