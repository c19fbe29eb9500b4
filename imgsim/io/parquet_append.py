"""Append rows to a copy of a Parquet file without decoding the rows it already holds.

    appended = append_rows(old, new_rows, target, use_dictionary=["label"])   # False: write it whole

A Parquet file is its column chunks followed by a footer (Thrift compact protocol) that says where
each row group's chunks are. Appending row groups therefore needs only: the old file's bytes up to
its footer (a file copy, done by the kernel), the new rows' chunks written as pyarrow writes them,
and one footer listing the old row groups and the new ones, the new ones' byte offsets shifted by
where their chunks now start. That is what an incremental `imgsim index` does to
`embeddings.parquet` (one file, by the contract), instead of decoding and encoding a million
unchanged rows to add ten thousand.

The footer is rewritten by a small reader/writer of the Thrift compact protocol that keeps every
field as it was read (unknown fields included) and changes only the offsets named in `_OFFSETS` and
the row count. It refuses, returning False so the caller writes the file whole, whatever it does not
expect: a different schema, encryption, page indexes (their page offsets would need shifting too),
a footer it cannot parse. The result is read back and checked before the caller swaps it in.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MAGIC = b"PAR1"

# Thrift compact protocol types
_STOP, _TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(13)

# Field ids of parquet.thrift used here
_FILE_NUM_ROWS, _FILE_ROW_GROUPS, _FILE_ENCRYPTION, _FILE_SCHEMA = 3, 4, 8, 2
_RG_COLUMNS, _RG_FILE_OFFSET, _RG_ORDINAL = 1, 5, 7
_CC_FILE_OFFSET, _CC_META, _CC_OFFSET_INDEX, _CC_COLUMN_INDEX, _CC_CRYPTO = 2, 3, 4, 6, 8
#: ColumnMetaData's byte offsets: data_page_offset, index_page_offset, dictionary_page_offset,
#: bloom_filter_offset.
_OFFSETS = (9, 10, 11, 14)


class _Unsupported(ValueError):
    """A footer this module does not rewrite (the caller writes the file whole instead)."""


# -- Thrift compact protocol: values as read, written back the same -------------------------------
# struct: list of [field id, type, value]; list/set: (element type, [values]);
# map: (key type, value type, [(k, v)]); bool fields carry their value in the type.
def _varint(buf: bytes, at: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[at]
        at += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, at
        shift += 7


def _unzigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _read_value(buf: bytes, at: int, kind: int) -> tuple[Any, int]:
    if kind in (_TRUE, _FALSE):  # a bool element of a list (a bool field has no value bytes)
        return buf[at], at + 1
    if kind == _BYTE:
        return buf[at], at + 1
    if kind in (_I16, _I32, _I64):
        n, at = _varint(buf, at)
        return _unzigzag(n), at
    if kind == _DOUBLE:
        return buf[at : at + 8], at + 8
    if kind == _BINARY:
        n, at = _varint(buf, at)
        return buf[at : at + n], at + n
    if kind in (_LIST, _SET):
        head = buf[at]
        at += 1
        size, elem = head >> 4, head & 0x0F
        if size == 15:
            size, at = _varint(buf, at)
        items = []
        for _ in range(size):
            item, at = _read_value(buf, at, elem)
            items.append(item)
        return (elem, items), at
    if kind == _MAP:
        size, at = _varint(buf, at)
        if size == 0:
            return (0, 0, []), at
        types = buf[at]
        at += 1
        kt, vt = types >> 4, types & 0x0F
        pairs = []
        for _ in range(size):
            k, at = _read_value(buf, at, kt)
            v, at = _read_value(buf, at, vt)
            pairs.append((k, v))
        return (kt, vt, pairs), at
    if kind == _STRUCT:
        return _read_struct(buf, at)
    raise _Unsupported(f"Thrift type {kind}")


def _read_struct(buf: bytes, at: int) -> tuple[list[list[Any]], int]:
    fields: list[list[Any]] = []
    last = 0
    while True:
        head = buf[at]
        at += 1
        kind = head & 0x0F
        if kind == _STOP:
            return fields, at
        delta = head >> 4
        if delta:
            fid = last + delta
        else:
            n, at = _varint(buf, at)
            fid = _unzigzag(n)
        if kind in (_TRUE, _FALSE):
            value = None
        else:
            value, at = _read_value(buf, at, kind)
        fields.append([fid, kind, value])
        last = fid


def _put_varint(out: bytearray, n: int) -> None:
    while True:
        if n < 0x80:
            out.append(n)
            return
        out.append((n & 0x7F) | 0x80)
        n >>= 7


def _zigzag(n: int) -> int:
    return (n << 1) ^ (n >> 63)


def _write_value(out: bytearray, kind: int, value: Any) -> None:
    if kind in (_TRUE, _FALSE, _BYTE):
        out.append(value)
    elif kind in (_I16, _I32, _I64):
        _put_varint(out, _zigzag(value))
    elif kind == _DOUBLE:
        out += value
    elif kind == _BINARY:
        _put_varint(out, len(value))
        out += value
    elif kind in (_LIST, _SET):
        elem, items = value
        if len(items) < 15:
            out.append(len(items) << 4 | elem)
        else:
            out.append(0xF0 | elem)
            _put_varint(out, len(items))
        for item in items:
            _write_value(out, elem, item)
    elif kind == _MAP:
        kt, vt, pairs = value
        _put_varint(out, len(pairs))
        if pairs:
            out.append(kt << 4 | vt)
            for k, v in pairs:
                _write_value(out, kt, k)
                _write_value(out, vt, v)
    elif kind == _STRUCT:
        _write_struct(out, value)
    else:
        raise _Unsupported(f"Thrift type {kind}")


def _write_struct(out: bytearray, fields: list[list[Any]]) -> None:
    last = 0
    for fid, kind, value in fields:
        if 0 < fid - last <= 15:
            out.append((fid - last) << 4 | kind)
        else:
            out.append(kind)
            _put_varint(out, _zigzag(fid))
        if kind not in (_TRUE, _FALSE):
            _write_value(out, kind, value)
        last = fid
    out.append(_STOP)


def _field(fields: list[list[Any]], fid: int) -> list[Any] | None:
    return next((f for f in fields if f[0] == fid), None)


# -- footers -------------------------------------------------------------------------------------------
def _footer(data: bytes | memoryview, size: int) -> tuple[list[list[Any]], int]:
    """The parsed footer of a Parquet file whose last bytes are `data` (the file is `size` long), and
    where the footer starts (= where the column chunks end)."""
    if bytes(data[-4:]) != MAGIC:
        raise _Unsupported("not a Parquet file (or an encrypted footer)")
    (length,) = struct.unpack("<I", bytes(data[-8:-4]))
    if length + 8 > len(data):
        raise _Unsupported("footer longer than read")
    meta, end = _read_struct(bytes(data[-8 - length : -8]), 0)
    if end != length:
        raise _Unsupported("footer length mismatch")
    return meta, size - 8 - length


def _read_footer(path: Path) -> tuple[list[list[Any]], int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - 8))
        (length,) = struct.unpack("<I", f.read(4))
        f.seek(max(0, size - 8 - length))
        return _footer(f.read(), size)


def _shift_row_group(rg: list[list[Any]], by: int, ordinal: int) -> None:
    """Move a row group's byte offsets by `by` (and give it ordinal `ordinal` if it has one)."""
    for f in rg:
        if f[0] == _RG_FILE_OFFSET:
            f[2] += by
        elif f[0] == _RG_ORDINAL:
            f[2] = ordinal
    columns = _field(rg, _RG_COLUMNS)
    if columns is None:
        raise _Unsupported("row group without columns")
    for chunk in columns[2][1]:
        for f in chunk:
            if f[0] in (_CC_OFFSET_INDEX, _CC_COLUMN_INDEX, _CC_CRYPTO):
                raise _Unsupported("page indexes or encryption")
            if f[0] == _CC_FILE_OFFSET:
                f[2] += by
        meta = _field(chunk, _CC_META)
        if meta is None:
            raise _Unsupported("column chunk without metadata")
        for f in meta[2]:
            if f[0] in _OFFSETS:
                f[2] += by


def merged_footer(old: list[list[Any]], new: list[list[Any]], shift: int) -> bytes:
    """The footer of `old`'s row groups followed by `new`'s, whose chunks moved by `shift` bytes."""
    for meta in (old, new):
        if _field(meta, _FILE_ENCRYPTION) is not None:
            raise _Unsupported("encrypted file")
    old_schema, new_schema = _field(old, _FILE_SCHEMA), _field(new, _FILE_SCHEMA)
    if old_schema is None or new_schema is None or old_schema[2] != new_schema[2]:
        raise _Unsupported("the schemas differ")
    old_groups, new_groups = _field(old, _FILE_ROW_GROUPS), _field(new, _FILE_ROW_GROUPS)
    old_rows, new_rows = _field(old, _FILE_NUM_ROWS), _field(new, _FILE_NUM_ROWS)
    if old_groups is None or new_groups is None or old_rows is None or new_rows is None:
        raise _Unsupported("no row groups")
    for i, rg in enumerate(old_groups[2][1]):
        _shift_row_group(rg, 0, i)  # checks the old groups (no page index) and keeps ordinals in order
    for i, rg in enumerate(new_groups[2][1], start=len(old_groups[2][1])):
        _shift_row_group(rg, shift, i)
    old_groups[2][1].extend(new_groups[2][1])
    old_rows[2] += new_rows[2]
    out = bytearray()
    _write_struct(out, old)
    return bytes(out)


def append_rows(
    old: str | os.PathLike[str],
    new: Iterable[pa.Table],
    target: str | os.PathLike[str],
    **writer_options: Any,
) -> bool:
    """Write to `target` the rows of the Parquet file `old` followed by the `new` tables (each of
    `old`'s Arrow schema), the old row groups copied as bytes. Returns False, leaving `target` to the
    caller to write whole, when the file cannot be appended to this way (module docstring)."""
    old, target = Path(old), Path(target)
    try:
        old_meta, old_end = _read_footer(old)
        schema = pq.read_schema(old)
        sink = pa.BufferOutputStream()
        count = 0
        with pq.ParquetWriter(sink, schema, **writer_options) as writer:
            for table in new:
                writer.write_table(table.cast(schema))  # refuses other columns or another order
                count += table.num_rows
        part = sink.getvalue()
        new_meta, new_end = _footer(memoryview(part), part.size)
        footer = merged_footer(old_meta, new_meta, old_end - len(MAGIC))
        expected = _field(old_meta, _FILE_NUM_ROWS)[2]  # type: ignore[index]  (merged: old + new rows)
    except (_Unsupported, IndexError, KeyError, ValueError, OSError, pa.ArrowException, struct.error):
        return False
    shutil.copyfile(old, target)  # copy_file_range / sendfile: no pass through Python
    with open(target, "r+b") as f:
        f.truncate(old_end)
        f.seek(old_end)
        f.write(memoryview(part)[len(MAGIC) : new_end])
        f.write(footer)
        f.write(struct.pack("<I", len(footer)))
        f.write(MAGIC)
    try:
        written = pq.ParquetFile(target)
        groups = written.metadata.num_row_groups
        ok = written.metadata.num_rows == expected and written.schema_arrow.equals(schema)
        if ok and count:  # the last new row group decodes where the footer says it is
            ok = (
                written.read_row_group(groups - 1).num_rows == written.metadata.row_group(groups - 1).num_rows
            )
    except (OSError, pa.ArrowException):
        ok = False
    if not ok:
        target.unlink(missing_ok=True)
    return ok
