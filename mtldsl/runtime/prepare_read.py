"""Raw Ali-CCP text -> column chunks and feature entries, with no per-line Python on the hot path.

`read_chunks(path, names, block_size)` takes a raw file and gives `Chunk`s: pyarrow string columns of at
most one block of text (about `block_size` bytes) each, with where they sit in the file so that an error
can name its line. `parse_entries(feature_lists, fields)` takes a chunk's feature-list column and gives
`Entries`: per row and wanted field, the index of the field's last entry (or every entry), its id and value tokens.
`to_float` is Python's float() over a string array, vectorised. Note [Ali-CCP raw format] in
runtime/prepare.py is the spec of the text; Note [Reading raw lines] below says how lines are read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from ..catalog import DataError

__all__ = ["Chunk", "Entries", "parse_entries", "read_chunks", "split_parts", "string_bytes", "to_float"]

# Note [Reading raw lines]
# A raw file is read in blocks of `block_size` bytes cut after their last newline (a longer line makes
# its block longer), and each block is parsed by pyarrow's CSV parser: explicit column names and string
# types, no quoting, no escaping, empty lines skipped. So a row is a non-empty line, and the text of
# one block is all that is held (the file object does no read-ahead of its own). A chunk knows the
# block's byte offset and first line number; when the block has no empty line, row i is line
# `line0 + i`, else the block is read again to count, only when an error names a line.
# pyarrow rejects a whole block when one line in it does not parse (too few or too many commas, text
# that is not UTF-8); that block is then read line by line in Python exactly as the per-line reader
# did (`line.split(",", n - 1)`: commas beyond the last column stay in the feature list). Its good
# lines before the bad one are handed over as a chunk first (an earlier bad label still wins, as in
# file order), then the bad line raises; with no bad line the block is just slower. So the errors,
# their line numbers and what is accepted are today's.

_COLUMNS_HINT = {
    6: "(sample_id,click,purchase,common_feature_index,num_features,feature_list)",
    3: "(common_feature_index,num_features,feature_list)",
}


@dataclass
class Chunk:
    """The rows of one block of a raw file: string columns in `names` order, and where the block sits."""

    path: Path
    first: int  # ordinal of the first row among the file's non-empty lines
    columns: list[pa.Array]
    line0: int  # 1-based line number of the block's first line
    offset: int  # byte offset of the block
    nbytes: int
    dense: bool  # no empty line in the block: row i is line line0 + i
    lines: np.ndarray | None = None  # 1-based line number of each row, when the block was read line by line

    def __len__(self) -> int:
        return len(self.columns[0]) if self.columns else 0

    def line(self, i: int) -> int:
        """The 1-based line number of row i (Note [Reading raw lines])."""
        if self.lines is not None:
            return int(self.lines[i])
        if self.dense:
            return self.line0 + i
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            text = f.read(self.nbytes)
        seen = -1
        for k, raw in enumerate(text.split(b"\n")):
            if raw.rstrip(b"\r"):
                seen += 1
                if seen == i:
                    return self.line0 + k
        raise IndexError(i)

    def where(self, i: int) -> str:
        return f"{self.path}: line {self.line(i)}"


def _parse_block(block: memoryview, names: Sequence[str]) -> list[pa.Array]:
    table = pcsv.read_csv(
        pa.py_buffer(block),
        read_options=pcsv.ReadOptions(column_names=list(names), block_size=len(block) + 1, use_threads=False),
        parse_options=pcsv.ParseOptions(delimiter=",", quote_char=False, escape_char=False, double_quote=False,
                                        newlines_in_values=False, ignore_empty_lines=True),
        convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in names}, strings_can_be_null=False,
                                            quoted_strings_can_be_null=False),
    )
    return [c.combine_chunks() if c.num_chunks != 1 else c.chunk(0) for c in table.columns]


def _blocks(f: BinaryIO, block_size: int) -> Iterator[memoryview]:
    """The file's text in blocks of about block_size bytes, each cut after a newline (the last one may not end in one)."""
    carry = b""
    while True:
        data = f.read(block_size)
        if not data:
            if carry:
                yield memoryview(carry)
            return
        buf = carry + data if carry else data
        del data  # one copy of the block is held, not two
        end = buf.rfind(b"\n") + 1
        if end == 0:  # a line longer than the block: read on
            carry = buf
            continue
        carry = buf[end:]
        yield memoryview(buf)[:end]


def read_chunks(path: Path, names: Sequence[str], block_size: int,
                progress: Callable[[int, int], None] | None = None) -> Iterator[Chunk]:
    """The rows of `path` in chunks of about `block_size` bytes; `progress(bytes read, rows read)` after each."""
    first, offset, line0 = 0, 0, 1
    with open(path, "rb") as f:
        for block in _blocks(f, block_size):
            newlines = block.obj.count(b"\n", 0, len(block))
            try:
                columns = _parse_block(block, names)
            except pa.ArrowInvalid:  # a line pyarrow cannot parse: read the block line by line (Note [Reading raw lines])
                chunk, error = _block_lines(path, block, names, first, line0, offset)
                if len(chunk):
                    yield chunk
                if error is not None:
                    raise DataError(error) from None
            else:
                n_lines = newlines + (not bytes(block[-1:]) == b"\n")
                chunk = Chunk(path, first, columns, line0, offset, len(block), len(columns[0]) == n_lines)
                if len(chunk):
                    yield chunk
            first += len(chunk)
            offset += len(block)
            line0 += newlines
            if progress is not None:
                progress(offset, first)


def _block_lines(path: Path, block: memoryview, names: Sequence[str], first: int, line0: int,
                 offset: int) -> tuple[Chunk, str | None]:
    """A block read one line at a time: (its good rows up to the first bad line, that line's error or None)."""
    k = len(names)
    rows: list[list[str]] = []
    lines: list[int] = []
    error = None
    for n, raw in enumerate(bytes(block).split(b"\n"), line0):
        stripped = raw.rstrip(b"\r")
        if not stripped:
            continue
        try:
            cols = stripped.decode("utf-8").split(",", k - 1)
        except UnicodeDecodeError:
            error = f"{path}: line {n}: not UTF-8 text"
            break
        if len(cols) != k:
            error = f"{path}: line {n}: expected {k} comma-separated columns {_COLUMNS_HINT[k]}, got {len(cols)}"
            break
        rows.append(cols)
        lines.append(n)
    columns = [pa.array([r[j] for r in rows], pa.string()) for j in range(k)]
    return Chunk(path, first, columns, line0, offset, len(block), False, np.asarray(lines, dtype=np.int64)), error


@dataclass
class Entries:
    """The feature entries of a chunk's feature lists, each a (field, id, value) triple of `tokens`.

    `parts[r]`: parts of row r's list (0 for an empty list; a multiple of 3 unless malformed).
    `last[r, j]`: index (into `start`) of the last entry of wanted field j in row r, -1 when absent.
    """

    parts: np.ndarray
    tokens: pa.Array
    start: np.ndarray  # token index of each entry's field part
    last: np.ndarray
    code: np.ndarray | None = None  # per entry: its wanted field's position, -1 for another field
    row: np.ndarray | None = None  # per entry: its row

    def every(self, j: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every entry of wanted field j (of the rows where `rows` is True), in file order, and the count per row
        (a list field keeps all its entries: Note [Ali-CCP raw format])."""
        assert self.code is not None and self.row is not None
        mine = self.code == j
        if rows is not None:
            mine &= rows[self.row]
        entry = np.flatnonzero(mine)
        return entry, np.bincount(self.row[entry], minlength=len(self.parts)).astype(np.int64)

    def ids(self, entry: np.ndarray) -> pa.Array:
        """The id tokens of the entries `entry` (indices into `start`)."""
        return self.tokens.take(pa.array(self.start[entry] + 1))

    def values(self, entry: np.ndarray) -> pa.Array:
        return self.tokens.take(pa.array(self.start[entry] + 2))


def string_bytes(a: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A string (or binary) array's bytes without a copy: (int64 offsets from 0, n + 1 of them; the uint8 text)."""
    n = len(a)
    wide = pa.types.is_large_string(a.type) or pa.types.is_large_binary(a.type)
    offset_type = np.dtype(np.int64 if wide else np.int32)
    _, offsets_buf, data_buf = a.buffers()
    off = np.frombuffer(offsets_buf, dtype=offset_type, count=n + 1, offset=a.offset * offset_type.itemsize)
    off = off.astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8, count=int(off[-1] - off[0]), offset=int(off[0])) \
        if data_buf is not None else np.zeros(0, dtype=np.uint8)
    return off - off[0], data


def split_parts(feature_lists: pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Every part of every feature list, split on \\x01, \\x02 and \\x03: (parts, parts per row, row's first part).

    One pass of numpy over the column's bytes: the separators are found, dropped from a copy of the text,
    and the parts are string views between them (an empty list has no part; "a\\x01" has two, "a" and "").
    """
    off, data = string_bytes(feature_lists)
    is_sep = (data - np.uint8(1)) < 3  # \x01, \x02, \x03 (0 wraps to 255)
    seps = np.flatnonzero(is_sep)
    text = data[~is_sep]
    del is_sep
    sep_before = np.searchsorted(seps, off)  # separators before each row boundary
    nonempty = off[1:] > off[:-1]
    parts = np.where(nonempty, np.diff(sep_before) + 1, 0)
    # a part starts after each separator and at the start of each non-empty row; in the text without
    # separators, the part after separator j starts at seps[j] - j, a row's first at off[r] - sep_before[r]
    row_start = off[:-1][nonempty]
    starts = np.insert(seps - np.arange(len(seps)), np.searchsorted(seps + 1, row_start, side="right"),
                       row_start - sep_before[:-1][nonempty])
    del seps
    bounds = np.append(starts, len(text)).astype(np.int32)
    tokens = pa.StringArray.from_buffers(len(starts), pa.py_buffer(bounds), pa.py_buffer(text))
    return tokens, parts, np.cumsum(parts) - parts


def parse_entries(feature_lists: pa.Array, fields: pa.Array) -> Entries:
    """Split every feature list on \\x01, \\x02 and \\x03 and read triples (Note [Ali-CCP raw format]).

    A repeated field keeps its last entry. Rows whose part count is not a multiple of 3 get no entries:
    the caller decides whether that is an error (it is not for a dropped noise row).
    """
    n = len(feature_lists)
    tokens, parts, first_part = split_parts(feature_lists)
    per_row = np.where(parts % 3 == 0, parts // 3, 0)
    n_entries = int(per_row.sum())
    row = np.repeat(np.arange(n, dtype=np.int32), per_row)
    first_entry = np.cumsum(per_row) - per_row
    start = (first_part[row] + 3 * (np.arange(n_entries, dtype=np.int64) - first_entry[row])).astype(np.int32)
    n_fields = len(fields)
    code = pc.fill_null(pc.index_in(tokens.take(pa.array(start)), value_set=fields), -1)
    code = code.to_numpy(zero_copy_only=False)
    wanted = np.flatnonzero(code >= 0)
    slot = np.full(n * n_fields, -1, dtype=np.int32)
    key = row[wanted].astype(np.int64) * n_fields + code[wanted]
    np.maximum.at(slot, key, wanted.astype(np.int32))  # the last entry of a field wins
    return Entries(parts, tokens, start, slot.reshape(n, n_fields), code, row)


def to_float(values: pa.Array) -> np.ndarray:
    """float() of each string, NaN where float() fails: pyarrow's cast, and Python's for an array it rejects."""
    try:
        return pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass  # text pyarrow does not read but float() may (" 1", "1_0"): one by one, rare
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values.to_pylist()):
        try:
            out[i] = float(v)
        except ValueError:
            out[i] = np.nan
    return out
