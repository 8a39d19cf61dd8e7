"""Raw Ali-CCP text -> column chunks and feature entries, with no per-line Python on the hot path.

`read_chunks(path, names, block_size)` takes a raw file and gives `Chunk`s: pyarrow string columns of at
most one block of text (about `block_size` bytes) each, with where they sit in the file so that an error
can name its line. `parse_entries(feature_lists, fields)` takes a chunk's feature-list column and gives
`Entries`: per row and wanted field, the index of the field's last entry, its id and value tokens.
`to_float` is Python's float() over a string array, vectorised. Note [Ali-CCP raw format] in
runtime/prepare.py is the spec of the text; Note [Reading raw lines] below says how lines are read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from ..catalog import DataError

__all__ = ["Chunk", "Entries", "line_position", "parse_entries", "read_chunks", "to_float"]

# Note [Reading raw lines]
# The raw files are read by pyarrow's streaming CSV reader: explicit column names and string types, no
# quoting, no escaping, empty lines skipped. A row is therefore a non-empty line, and a chunk knows the
# ordinal of its first row among the file's non-empty lines; the 1-based line number of a row is found
# only when an error names it (`line_position`, one scan of the file), so the happy path never counts
# lines. pyarrow rejects a whole block when one line in it does not parse (too few or too many commas,
# text that is not UTF-8, a line longer than the block); the reader then reads that block line by line
# in Python exactly as the per-line reader did (`line.split(",", n - 1)`: commas beyond the last column
# stay in the feature list), hands the good lines before the bad one over as a chunk (so an earlier bad
# label still wins, as in file order) and raises for the bad line; if no line is bad it resumes pyarrow
# after that block. So the errors and their line numbers are today's, and so is what is accepted.

_COLUMNS_HINT = {
    6: "(sample_id,click,purchase,common_feature_index,num_features,feature_list)",
    3: "(common_feature_index,num_features,feature_list)",
}


@dataclass
class Chunk:
    """Rows of one raw file: string columns in `names` order, the `first` row's ordinal among non-empty lines."""

    path: Path
    first: int
    columns: list[pa.Array]
    lines: np.ndarray | None = None  # 1-based line numbers, when the rows were read line by line

    def __len__(self) -> int:
        return len(self.columns[0]) if self.columns else 0

    def line(self, i: int) -> int:
        """The 1-based line number of row i (Note [Reading raw lines])."""
        if self.lines is not None:
            return int(self.lines[i])
        return line_position(self.path, self.first + i)[1]

    def where(self, i: int) -> str:
        return f"{self.path}: line {self.line(i)}"


def line_position(path: Path, ordinal: int) -> tuple[int, int]:
    """Byte offset and 1-based line number of the non-empty line with 0-based `ordinal` (or of the end of file)."""
    seen, pos, n = 0, 0, 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.rstrip(b"\r\n"):
                if seen == ordinal:
                    return pos, n
                seen += 1
            pos += len(raw)
    return pos, n + 1


def _open(f: pa.NativeFile, names: Sequence[str], block_size: int) -> pcsv.CSVStreamingReader:
    return pcsv.open_csv(
        f,
        read_options=pcsv.ReadOptions(column_names=list(names), block_size=block_size, use_threads=True),
        parse_options=pcsv.ParseOptions(delimiter=",", quote_char=False, escape_char=False, double_quote=False,
                                        newlines_in_values=False, ignore_empty_lines=True),
        convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in names}, strings_can_be_null=False,
                                            quoted_strings_can_be_null=False),
    )


def read_chunks(path: Path, names: Sequence[str], block_size: int,
                progress: Callable[[int, int], None] | None = None) -> Iterator[Chunk]:
    """The rows of `path` in chunks of about `block_size` bytes; `progress(bytes read, rows read)` after each."""
    offset, first = 0, 0
    with pa.OSFile(str(path)) as f:
        while True:
            f.seek(offset)
            try:
                for batch in _open(f, names, block_size):
                    yield Chunk(path, first, batch.columns)
                    first += batch.num_rows
                    if progress is not None:
                        progress(f.tell(), first)
                return
            except pa.ArrowInvalid:
                pass  # a block pyarrow cannot parse: read it line by line (Note [Reading raw lines])
            chunk, error, offset = _read_lines(path, first, names, block_size)
            if len(chunk):
                yield chunk
                first += len(chunk)
            if error is not None:
                raise DataError(error)
            if progress is not None:
                progress(offset, first)


def _read_lines(path: Path, first: int, names: Sequence[str], block_size: int) -> tuple[Chunk, str | None, int]:
    """From row `first`, lines read one by one until a bad line or one block: (good rows, error, next offset)."""
    offset, n = line_position(path, first)
    begin, k = offset, len(names)
    rows: list[list[str]] = []
    lines: list[int] = []
    error = None
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in f:
            offset += len(raw)
            stripped = raw.rstrip(b"\r\n")
            if stripped:
                try:
                    cols = stripped.decode("utf-8").split(",", k - 1)
                except UnicodeDecodeError:
                    error = f"{path}: line {n}: not UTF-8 text"
                    break
                if len(cols) != k:
                    error = (f"{path}: line {n}: expected {k} comma-separated columns {_COLUMNS_HINT[k]}, "
                             f"got {len(cols)}")
                    break
                rows.append(cols)
                lines.append(n)
            n += 1
            if offset - begin >= block_size:
                break
    columns = [pa.array([r[j] for r in rows], pa.string()) for j in range(k)]
    return Chunk(path, first, columns, np.asarray(lines, dtype=np.int64)), error, offset


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

    def ids(self, entry: np.ndarray) -> pa.Array:
        """The id tokens of the entries `entry` (indices into `start`)."""
        return self.tokens.take(pa.array(self.start[entry] + 1))

    def values(self, entry: np.ndarray) -> pa.Array:
        return self.tokens.take(pa.array(self.start[entry] + 2))


def parse_entries(feature_lists: pa.Array, fields: pa.Array) -> Entries:
    """Split every feature list on \\x01, \\x02 and \\x03 and read triples (Note [Ali-CCP raw format]).

    A repeated field keeps its last entry. Rows whose part count is not a multiple of 3 get no entries:
    the caller decides whether that is an error (it is not for a dropped noise row).
    """
    n = len(feature_lists)
    text = pc.replace_substring(pc.replace_substring(feature_lists, "\x02", "\x01"), "\x03", "\x01")
    lists = pc.split_pattern(text, "\x01")
    tokens = lists.flatten()
    offsets = lists.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    offsets -= offsets[0]
    parts = np.diff(offsets)
    parts[pc.equal(pc.binary_length(feature_lists), 0).to_numpy(zero_copy_only=False)] = 0  # "" is no entry
    per_row = np.where(parts % 3 == 0, parts // 3, 0)
    n_entries = int(per_row.sum())
    row = np.repeat(np.arange(n, dtype=np.int64), per_row)
    first_entry = np.cumsum(per_row) - per_row
    start = offsets[:-1][row] + 3 * (np.arange(n_entries, dtype=np.int64) - first_entry[row])
    n_fields = len(fields)
    code = pc.index_in(tokens.take(pa.array(start)), value_set=fields).to_numpy(zero_copy_only=False)
    code = np.nan_to_num(code, nan=-1).astype(np.int64) if code.dtype.kind == "f" else code.astype(np.int64)
    wanted = code >= 0
    slot = np.full(n * n_fields, -1, dtype=np.int64)
    np.maximum.at(slot, row[wanted] * n_fields + code[wanted], np.flatnonzero(wanted))  # the last entry wins
    return Entries(parts, tokens, start, slot.reshape(n, n_fields))


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
