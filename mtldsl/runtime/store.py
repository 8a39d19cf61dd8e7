"""On-disk column store: one dataset file (CSV or Parquet) + its schema -> checked, narrow, per-column .npy files.

Takes a source file, the schema and an optional row cap; gives `Stored` (row count, one `ColumnFile`
per column, one `ListColumn` per list field, each sparse and list field's largest id, which labels hold only 0/1). The first use converts the file
in chunks of CHUNK_ROWS rows (Parquet row group by row group, CSV through pandas' chunked reader),
checking every value on the way (bad data raises DataError naming the file, column and 1-based row);
later uses only read the manifest. Note [Column store] says what is stored where and when it is rebuilt.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
from pandas.api import types as ptypes

from mtldsl.catalog import DataError, Schema, list_table_path
from mtldsl.datafiles import open_csv, read_header, unreadable

__all__ = ["CACHE_DIR", "CACHE_ENV", "CHUNK_ROWS", "FORMAT", "ColumnFile", "ListColumn", "Role", "Stored", "cache_root",
           "narrow_id_dtype", "npy_writer", "open_columns", "open_store", "publish", "user_cache"]

log = logging.getLogger(__name__)

# Note [Column store]
# A dataset file `<folder>/train.csv` (or .parquet) is converted once into the folder
# `<cache>/train.csv.<rows cap or "all">/`: one headered .npy file per column (written sequentially,
# never through a memory map, so converting does not make the file resident) and `manifest.json`.
# Sparse ids take the narrowest of uint8/int16/int32/int64 that holds the field's largest id (pass 1
# reads and checks every chunk and finds the row count, the largest ids and whether each label is 0/1;
# pass 2 reads it again and writes); dense columns are float32; labels uint8 when they hold only 0 and
# 1, else float32; a group id that is not a sparse field gets its own narrow integer column. Memory is
# bounded by CHUNK_ROWS and one Parquet row group (read one at a time), not by the file. (Synthetic data
# beyond synthetic.MEMORY_ROWS rows is generated into the same layout, one folder per split.)
# The manifest records the store format, the source file's size and mtime (ns), the row cap and the
# schema's columns: any difference rebuilds the store. A store is built in a temporary folder beside
# its final place and published with os.replace (`publish`), so an interrupted build leaves nothing a
# later run could mistake for a store (a leftover `.tmp-*` folder is ignored, and removed by the next
# build). Builds take a lock file (`.lock-<store>`, flock): of several processes loading the same
# data at once (torchrun ranks), one builds and the others wait for it and read its store.
# <cache> is `$MTLDSL_CACHE_DIR` when set; else `<folder>/.mtldsl-cache/` when mtldsl wrote the data
# folder (`mtldsl data prepare`: it holds prepare.json); else `$XDG_CACHE_HOME/mtldsl` (default
# ~/.cache/mtldsl), in a subfolder named by the data folder's name and a hash of its absolute path
# (Note [The user's folder]).

# Note [The user's folder]
# mtldsl never writes into a data folder it did not create: not an inferred schema.json, not a column
# store, not a lock file, even when the folder is writable (a hidden `.mtldsl-cache/` is still a write
# into someone else's folder: it fills their disk quota, shows in their `git status` and their backups,
# and a stale one used to win over their edits). An inferred schema is not stored anywhere: it is
# inferred again on each use (catalog.infer_schema: the header and INFER_ROWS rows, fast and
# deterministic), so it always describes the files as they are now; the run folder records the schema a
# run trained on (schema.json). Column stores live in the user cache, keyed by each file's size and
# mtime (a changed file is converted again), so a stale cache never wins over the data. Folders written
# by `mtldsl data prepare` are mtldsl's, and keep their store beside the data.
# Reading never maps a column: a ColumnFile reads row ranges with positioned reads, a window of blocks
# at a time (data.py, Note [Block shuffle]). Pages of a memory map stay in the process's resident set
# until unmapped, so mapping a 40M-row column would make peak RSS grow with the file again; reads
# leave them in the page cache only, which the kernel shares and reclaims.
# A list field (Note [List fields] in runtime/layers.py; Parquet only, Note [List columns]) is stored as
# CSR: its ids concatenated in row order (narrowest integer type, like a sparse field), row offsets (n + 1
# int64, the first 0) and, when the schema names a weights column, the weights (float32, aligned with the
# ids). Rows [a, b) are offsets [a, b] and then ids [offsets[a], offsets[b]): two positioned reads, so
# reading a list field is bounded by the window's ids, like every other column.

# Note [List columns]
# List fields come from Parquet list<integer> columns and their weights from list<float> (or list<int>)
# columns of the same lengths row by row. CSV has no list type and no spelling is invented for one:
# a CSV file whose schema has list fields is refused with a message saying to write Parquet. Checked
# per row, each error naming file, column and 1-based row: a missing list (null; an empty list `[]` is
# fine and pools to zeros), a missing id inside a list, a negative id, a column that is not a list of
# integers, weights that are missing, not a list of numbers, not finite, or of another length than the
# ids; and a list in a single-valued column (an empty one is "an empty list where a value is required").

# Note [List tables]
# List fields often belong to an entity that many rows share: Ali-CCP's four behaviour lists are the user's
# (its common-features line), shared by ~58 samples each. Written per row, they are most of a folder's bytes
# and of `data prepare`'s time, so a folder may keep them once per entity, in a list table. schema.json's
# `list_rows` names an integer column of every split file; a split file `<stem>.<suffix>` then has no list
# columns, and its rows' list fields (and weights) are row `list_rows` of the Parquet file
# `<stem>.lists.parquet` beside it (list_table_path: train.lists.parquet for train.parquet), which holds
# only those list columns, checked like inline ones (Note [List columns]). The split file itself may then be
# CSV: only the list table needs Parquet's list type. The list table becomes a store of its own (CSR, built,
# keyed and published like any store); a split row pointing past its last row is a DataError naming the split
# file, the column and the row. Its CSR is memory-mapped (ColumnFile.mapped, the one exception to reading by
# row ranges) because a window's rows point anywhere in it; the pages that stay resident are bounded by the
# table, which grows with the entities (users), not with the split's rows. A window's rows of a list field
# are gathered from the table (data.py, Note [List batches]), so batches equal those of inline list columns.

CACHE_DIR = ".mtldsl-cache"
CACHE_ENV = "MTLDSL_CACHE_DIR"  # when set, every store lives under it (tests; data on a shared read-only mount)
CHUNK_ROWS = 1 << 18  # rows per conversion chunk (~30 MB of parsed columns for Ali-CCP's 33)
FORMAT = 2  # the store layout (2: list fields); a different number rebuilds every store
MANIFEST = "manifest.json"
PREPARED = "prepare.json"  # written by `mtldsl data prepare`: the folder is mtldsl's (Note [The user's folder])


class Role(Enum):
    label = "label"
    sparse = "sparse"
    dense = "dense"
    group = "group"
    list_ids = "list"  # a list field's ids, concatenated (Note [Column store])
    list_offsets = "offsets"  # its n + 1 row offsets
    list_weights = "weights"  # its weights, aligned with the ids
    list_rows = "rows"  # each row's row of its list table (Note [List tables])


@dataclass(frozen=True)
class ColumnFile:
    """One stored column: a headered .npy file of `n` values, read in row ranges (never mapped whole)."""

    path: Path
    dtype: np.dtype
    offset: int  # bytes before the first value
    n: int

    @classmethod
    def open(cls, path: Path) -> ColumnFile:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            assert not fortran and len(shape) == 1, path
            return cls(path, np.dtype(dtype), f.tell(), int(shape[0]))

    def __len__(self) -> int:
        return self.n

    @property
    def nbytes(self) -> int:
        return self.n * self.dtype.itemsize

    def read(self, start: int, stop: int) -> np.ndarray:
        """Values [start, stop) as a fresh array (one positioned read)."""
        start, stop = max(0, start), min(self.n, stop)
        out = np.empty(max(0, stop - start), dtype=self.dtype)
        if out.size:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.offset + start * self.dtype.itemsize)
                view = memoryview(out).cast("B")
                got = 0
                while got < len(view):
                    k = f.readinto(view[got:])
                    if not k:
                        raise OSError(f"{self.path}: truncated column file")
                    got += k
        return out

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        a = self.read(0, self.n)
        return a if dtype is None else a.astype(dtype)

    def mapped(self) -> np.ndarray:
        """The whole column as a read-only memory map (only for a list table: Note [List tables])."""
        if not self.n:
            return np.empty(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=(self.n,))


@dataclass(frozen=True)
class ListColumn:
    """A list field as CSR (Note [Column store]): `offsets` (n + 1 int64), `ids` and optional `weights` (float32).

    Each part is a ColumnFile (a store), a numpy array (in memory) or a tensor (moved to an accelerator)."""

    ids: object
    offsets: object
    weights: object | None = None
    rows: object | None = None  # set: the parts above are a list table's, rows each row's row (Note [List tables])


@dataclass(frozen=True)
class Stored:
    """A converted file: its columns (schema names) and what pass 1 learnt about them."""

    source: Path
    n: int
    labels: dict[str, ColumnFile]
    sparse: dict[str, ColumnFile]
    dense: dict[str, ColumnFile]
    groups: ColumnFile | None  # the user id column (the sparse field's file when it is one)
    max_ids: dict[str, int]  # per sparse and list field
    lists: dict[str, ListColumn] = field(default_factory=dict)


def narrow_id_dtype(lo: int, hi: int) -> np.dtype:
    """The narrowest of uint8, int16, int32, int64 holding every integer in [lo, hi]."""
    if lo >= 0 and hi < 2**8:
        return np.dtype(np.uint8)
    for t in (np.int16, np.int32):
        info = np.iinfo(t)
        if info.min <= lo and hi <= info.max:
            return np.dtype(t)
    return np.dtype(np.int64)


def user_cache() -> Path:
    """$MTLDSL_CACHE_DIR, else $XDG_CACHE_HOME/mtldsl (default ~/.cache/mtldsl)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")) / "mtldsl"


def cache_root(folder: Path) -> Path:
    """Where the stores of a data folder live (Note [Column store])."""
    explicit = os.environ.get(CACHE_ENV)
    if not explicit and (folder / PREPARED).is_file() and os.access(folder, os.W_OK):
        try:
            (folder / CACHE_DIR).mkdir(exist_ok=True)
            return folder / CACHE_DIR
        except OSError:
            pass
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    root = user_cache() / f"{folder.name}-{key}"
    root.mkdir(parents=True, exist_ok=True)
    return root


# --- checks (every value, by file, column and 1-based row) -----------------------------------------


def check_columns(path: Path, header: list[str], needed: list[str], schema: Schema) -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        cols = ", ".join(f"'{c}'" for c in missing)
        s = "s" if len(missing) > 1 else ""
        raise DataError(f"{path}: missing column{s} {cols} (needed by the '{schema.name}' schema)")


def _show(value: object) -> str:
    text = str(value)
    return repr(text if len(text) <= 40 else text[:37] + "...")


def fail(path: Path, col: str, i: int, what: str) -> DataError:
    """The DataError of 0-based data row `i` of `path` (printed 1-based)."""
    return DataError(f"{path}: column '{col}', row {i + 1}: {what}")


def fmt(x: float) -> str:
    x = float(x)
    if not math.isfinite(x):
        return str(x)  # nan, inf, -inf
    return str(int(x)) if x.is_integer() else repr(x)


def _numeric(path: Path, df: pd.DataFrame, col: str, expected: str, base: int) -> np.ndarray:
    """The column as a float64/int64 array; text cells that are not numbers raise DataError."""
    s = df[col]
    if ptypes.is_unsigned_integer_dtype(s.dtype) and s.dtype.itemsize == 8 and not s.hasnans:
        over = (s > np.iinfo(np.int64).max).to_numpy()
        if over.any() and "id" in expected:  # as the file has it, not wrapped to a negative number
            i = _first(over)
            raise fail(path, col, base + i, f"id {s.iloc[i]} does not fit a signed 64-bit integer")
        if over.any():
            return s.to_numpy(dtype=np.float64, copy=True)
    if ptypes.is_bool_dtype(s.dtype) or (ptypes.is_integer_dtype(s.dtype) and not s.hasnans):
        return s.to_numpy(dtype=np.int64, copy=True)  # copy: pandas may hand out read-only views
    if ptypes.is_numeric_dtype(s.dtype):
        return s.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
    num = pd.to_numeric(s, errors="coerce")
    bad = num.isna().to_numpy()
    if bad.any():
        # A cell that parses to NaN ('nan') is left for the caller's NaN check; anything else is not a number.
        text = s.astype("string").fillna("").to_numpy(dtype=object)
        for i in np.flatnonzero(bad):
            cell = str(text[i]).strip()
            if cell == "":
                raise fail(path, col, base + i, "missing value")
            try:
                float(cell)
            except ValueError:
                raise fail(path, col, base + i, f"expected {expected}, got {_show(text[i])}") from None
    return num.to_numpy(dtype=np.float64, na_value=np.nan)


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def _ids(path: Path, df: pd.DataFrame, col: str, base: int, *, non_negative: bool = True) -> np.ndarray:
    a = _numeric(path, df, col, "an integer id", base)
    if a.dtype != np.int64:
        bad = ~np.isfinite(a) | (a != np.round(a))
        if bad.any():
            i = _first(bad)
            raise fail(path, col, base + i, f"expected an integer id, got {fmt(a[i])}")
        huge = np.abs(a) >= 2.0**63
        if huge.any():
            i = _first(huge)
            raise fail(path, col, base + i, f"id {_text_at(path, col, base + i) or fmt(a[i])} does not fit a "
                                            "signed 64-bit integer")
        a = a.astype(np.int64)
    if non_negative and (a < 0).any():
        i = _first(a < 0)
        raise fail(path, col, base + i, f"expected a non-negative integer id, got {a[i]}")
    return a


def _text_at(path: Path, col: str, i: int) -> str | None:
    """The text of 0-based data row `i` in column `col` of a CSV file, as written (for an error message only)."""
    if path.suffix == ".parquet":
        return None
    with open_csv(path) as f:
        reader = csv.reader(f)
        header = next(reader, [])
        for k, row in enumerate(reader):
            if k == i:
                j = header.index(col)
                return row[j].strip() if j < len(row) else None
    return None


def _finite(path: Path, df: pd.DataFrame, col: str, base: int) -> np.ndarray:
    a = _numeric(path, df, col, "a number", base).astype(np.float64, copy=False)
    bad = ~np.isfinite(a)
    if bad.any():
        i = _first(bad)
        raise fail(path, col, base + i, f"expected a finite number, got {fmt(a[i])}")
    return a


def _chunk_arrays(df: pd.DataFrame, path: Path, schema: Schema, base: int) -> dict[tuple[Role, str], np.ndarray]:
    """Check every cell of one chunk (rows base.. of the file): labels, then sparse, then dense, then the group."""
    out: dict[tuple[Role, str], np.ndarray] = {}
    for col in schema.labels:
        out[Role.label, col] = _finite(path, df, col, base)
    for col in schema.sparse:
        if col in schema.hashed:  # any 64-bit id, taken modulo the buckets (Note [Vocabulary bound] in datacheck.py)
            out[Role.sparse, col] = _ids(path, df, col, base, non_negative=False) % schema.hashed[col]
        else:
            out[Role.sparse, col] = _ids(path, df, col, base)
    for col in schema.dense:
        out[Role.dense, col] = _finite(path, df, col, base)
    if schema.user_id is not None and schema.user_id not in schema.sparse:
        out[Role.group, schema.user_id] = _ids(path, df, schema.user_id, base, non_negative=False)
    if schema.list_rows:
        out[Role.list_rows, schema.list_rows] = _ids(path, df, schema.list_rows, base)
    return out


# --- list fields (Note [List columns]) ------------------------------------------------------------


@dataclass
class ListChunk:
    """One chunk of a list field, checked: per row its list length, the ids in row order, the weights or None."""

    lengths: np.ndarray  # int64 (rows,)
    ids: np.ndarray  # int64 (sum of lengths,)
    weights: np.ndarray | None  # float32, aligned with ids


def _list_columns(schema: Schema) -> set[str]:
    """The list columns of a split file: none when its lists live in a list table (Note [List tables])."""
    return set() if schema.list_rows else set(schema.list_columns)


def _inline(schema: Schema) -> tuple[str, ...]:
    """The list fields a split file holds itself (none when they live in a list table: Note [List tables])."""
    return () if schema.list_rows else schema.lists


def _first_valid(a: object) -> int:
    valid = np.asarray(a.is_valid())  # type: ignore[attr-defined]
    return int(np.argmax(valid)) if valid.any() else 0


def _is_list(t: object) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))


def _flat(path: Path, col: str, a: object, base: int, ok: Callable[[object], bool], what: str) -> tuple[np.ndarray, object]:
    """A list column's per-row lengths and its values (a pyarrow array), after the type and missing-value checks."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = a.type  # type: ignore[attr-defined]
    if not _is_list(t) or not (ok(t.value_type) or pa.types.is_null(t.value_type)):
        shown = f"list<{t.value_type}>" if _is_list(t) else str(t)
        raise fail(path, col, base + _first_valid(a), f"expected {what}, got a Parquet column of type {shown}")
    if a.null_count:  # type: ignore[attr-defined]
        i = int(np.argmax(~np.asarray(a.is_valid())))  # type: ignore[attr-defined]
        raise fail(path, col, base + i, "missing list (write an empty list for a row without ids)")
    lengths = pc.list_value_length(a).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(a)
    if values.null_count:
        k = int(np.argmax(~np.asarray(values.is_valid())))
        raise fail(path, col, base + _row_of(lengths, k), "missing value inside the list")
    return lengths, values


def _row_of(lengths: np.ndarray, k: int) -> int:
    """The row (of a chunk) holding the k-th value of its concatenated lists."""
    return int(np.searchsorted(np.cumsum(lengths), k, side="right"))


def _check_list(path: Path, schema: Schema, f: str, raw: dict[str, object], base: int) -> ListChunk:
    """Check one chunk of list field `f` (and its weights): Note [List columns]."""
    import pyarrow as pa

    lengths, values = _flat(path, f, raw[f], base, pa.types.is_integer, "a list of integer ids (Parquet list<int>)")
    ids = values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)  # type: ignore[attr-defined]
    if (ids < 0).any():
        k = _first(ids < 0)
        raise fail(path, f, base + _row_of(lengths, k), f"expected non-negative integer ids, got {ids[k]}")
    weights = None
    wcol = schema.list_weights.get(f)
    if wcol is not None:
        numeric = (lambda t: pa.types.is_floating(t) or pa.types.is_integer(t))
        wlen, wvalues = _flat(path, wcol, raw[wcol], base, numeric, "a list of numbers (Parquet list<float>)")
        if (wlen != lengths).any():
            i = _first(wlen != lengths)
            raise fail(path, wcol, base + i, f"{wlen[i]} weight(s) for {lengths[i]} id(s) in '{f}': "
                                             "a weights list has one weight per id")
        w = wvalues.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)  # type: ignore[attr-defined]
        bad = ~np.isfinite(w)
        if bad.any():
            k = _first(bad)
            raise fail(path, wcol, base + _row_of(lengths, k), f"expected finite weights, got {fmt(w[k])}")
        weights = w.astype(np.float32)
    return ListChunk(lengths, ids, weights)


def _refuse_lists(path: Path, table: object, schema: Schema) -> None:
    """A list in a column the schema reads as single-valued: the first such row is the error."""
    import pyarrow.compute as pc

    for col in schema.columns:
        if col in _list_columns(schema):
            continue
        a = table.column(col)  # type: ignore[attr-defined]
        if not _is_list(a.type):
            continue
        lengths = pc.fill_null(pc.list_value_length(a), 0).to_numpy().astype(np.int64)
        i = _first_valid(a.combine_chunks()) if a.null_count < len(a) else 0
        if lengths[i] == 0:
            raise fail(path, col, i, "an empty list where a value is required (a single-valued column; "
                                     "a list field is named under 'lists' in schema.json)")
        raise fail(path, col, i, f"expected one value, got a list of {lengths[i]} (a list field is named under "
                                 "'lists' in schema.json)")


# --- reading a source file in chunks ------------------------------------------------------------------

Chunk = tuple[pd.DataFrame, dict[str, object]]  # the single-valued columns, and the list columns (pyarrow arrays)


def _chunks(path: Path, schema: Schema, rows: int | None) -> Iterator[Chunk]:
    """The schema's columns of `path`, CHUNK_ROWS rows at a time, at most `rows` rows (CSV cells kept verbatim)."""
    needed = list(schema.columns)
    header = read_header(path)  # checked names: no duplicates, no padding, no other delimiter (catalog.py)
    check_columns(path, header, needed, schema)
    listed = _list_columns(schema)
    flat = [c for c in needed if c not in listed]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        left = rows
        base = 0
        for group in range(pf.num_row_groups):  # one row group in memory at a time (no read-ahead)
            try:
                table = pf.read_row_group(group, columns=needed, use_threads=False)
            except Exception as e:  # a truncated or corrupt row group
                raise DataError(f"{path}: not a readable Parquet file (row group {group}: {e})") from None
            for start in range(0, table.num_rows, CHUNK_ROWS):
                batch = table.slice(start, CHUNK_ROWS if left is None else min(CHUNK_ROWS, left))
                if left is not None:
                    left -= batch.num_rows
                if base == 0:
                    _refuse_lists(path, batch, schema)
                yield (batch.select(flat).to_pandas(),
                       {c: batch.column(c).combine_chunks() for c in needed if c in listed})
                base += batch.num_rows
                if left is not None and left <= 0:
                    return
            del table
        return
    if _inline(schema):
        raise DataError(f"{path}: list field(s) {', '.join(map(repr, schema.lists))} need a Parquet file: CSV has no "
                        "list type (write list<int> ids and list<float> weights to Parquet; Note [List columns])")
    # Every column is read (usecols would drop a row's extra fields silently); pandas then refuses a row with
    # more fields than the header, and warns (made an error here) when it is the first one.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            reader = pd.read_csv(path, header=0, names=header, nrows=rows, chunksize=CHUNK_ROWS, index_col=False,
                                 keep_default_na=False,  # keep 'n/a', '' … as text so the error can quote them
                                 na_values=[], low_memory=False)
            with reader:
                for df in reader:
                    yield df[needed], {}
    except pd.errors.ParserWarning:
        raise DataError(f"{path}: row 1: more fields than the header's {len(header)} "
                        "(an unquoted comma inside a value?)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as e:
        raise _parse_error(path, e) from None


def _parse_error(path: Path, e: BaseException) -> DataError:
    """pandas' CSV errors, worded by file and 1-based data row where pandas says the line."""
    text = str(e).strip()
    m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", text)
    if m:
        return DataError(f"{path}: row {int(m[2]) - 1}: {m[3]} fields, the header has {m[1]} "
                         "(an unquoted comma inside a value?)")
    if isinstance(e, (UnicodeDecodeError, OSError)):  # the row of the bad bytes, as the header read says it
        return unreadable(path, e, 0)
    return DataError(f"{path}: cannot parse: {text}")


# --- building and opening a store ---------------------------------------------------------------------


def _key(path: Path, schema: Schema, rows: int | None) -> dict[str, object]:
    st = path.stat()
    return {"format": FORMAT, "source": {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns},
            "rows": rows, "labels": list(schema.labels), "sparse": list(schema.sparse), "dense": list(schema.dense),
            "user_id": schema.user_id, "lists": list(_inline(schema)),  # a list table's lists: its own key
            "list_weights": {f: w for f, w in schema.list_weights.items() if f in _inline(schema)},
            **({"hashed": dict(schema.hashed)} if schema.hashed else {}),
            **({"list_rows": schema.list_rows} if schema.list_rows else {})}


def _file_name(role: Role, j: int) -> str:
    return f"{role.value}{j:03d}.npy"


@dataclass
class _Scan:
    """What pass 1 learnt: rows, each file's dtype and length, each sparse and list field's largest id."""

    n: int
    dtypes: dict[tuple[Role, str], np.dtype]
    sizes: dict[tuple[Role, str], int]
    max_ids: dict[str, int]
    list_rows_max: int | None = None  # the largest list row (Note [List tables])


def _scan(path: Path, schema: Schema, rows: int | None) -> _Scan:
    """Pass 1: check every value; the row count, each column's stored dtype and each sparse field's largest id."""
    n = 0
    lo: dict[tuple[Role, str], int] = {}
    hi: dict[tuple[Role, str], int] = {}
    n_ids = {f: 0 for f in _inline(schema)}
    binary: dict[str, bool] = {c: True for c in schema.labels}
    for df, raw in _chunks(path, schema, rows):
        for key, a in _chunk_arrays(df, path, schema, n).items():
            role, col = key
            if role is Role.label:
                binary[col] = binary[col] and bool(((a == 0) | (a == 1)).all())
            elif role in (Role.sparse, Role.group, Role.list_rows) and len(a):
                lo[key] = min(lo.get(key, 0), int(a.min()))
                hi[key] = max(hi.get(key, 0), int(a.max()))
        for f in _inline(schema):
            lc = _check_list(path, schema, f, raw, n)
            n_ids[f] += len(lc.ids)
            if len(lc.ids):
                hi[Role.list_ids, f] = max(hi.get((Role.list_ids, f), 0), int(lc.ids.max()))
        n += len(df)
    if n == 0:
        raise DataError(f"{path}: no data rows")
    dtypes: dict[tuple[Role, str], np.dtype] = {}
    sizes: dict[tuple[Role, str], int] = {}
    for col in schema.labels:
        dtypes[Role.label, col] = np.dtype(np.uint8 if binary[col] else np.float32)
    for col in schema.sparse:
        dtypes[Role.sparse, col] = narrow_id_dtype(lo.get((Role.sparse, col), 0), hi.get((Role.sparse, col), 0))
    for col in schema.dense:
        dtypes[Role.dense, col] = np.dtype(np.float32)
    if schema.user_id is not None and schema.user_id not in schema.sparse:
        key = (Role.group, schema.user_id)
        dtypes[key] = narrow_id_dtype(lo.get(key, 0), hi.get(key, 0))
    if schema.list_rows:
        key = (Role.list_rows, schema.list_rows)
        dtypes[key] = narrow_id_dtype(0, hi.get(key, 0))
    for f in _inline(schema):
        dtypes[Role.list_ids, f] = narrow_id_dtype(0, hi.get((Role.list_ids, f), 0))
        dtypes[Role.list_offsets, f] = np.dtype(np.int64)
        sizes[Role.list_ids, f], sizes[Role.list_offsets, f] = n_ids[f], n + 1
        if f in schema.list_weights:
            dtypes[Role.list_weights, f] = np.dtype(np.float32)
            sizes[Role.list_weights, f] = n_ids[f]
    max_ids = {col: hi.get((Role.sparse, col), 0) for col in schema.sparse}
    max_ids.update({f: hi.get((Role.list_ids, f), 0) for f in _inline(schema)})
    rows_max = hi.get((Role.list_rows, schema.list_rows), 0) if schema.list_rows else None
    return _Scan(n, dtypes, sizes, max_ids, rows_max)


def npy_writer(stack: contextlib.ExitStack, path: Path, dtype: np.dtype, n: int) -> BinaryIO:
    """A file holding the header of an (n,) array of `dtype`; its values are appended in order."""
    f = stack.enter_context(open(path, "wb"))
    np.lib.format.write_array_header_1_0(
        f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)})
    return f


def _build(path: Path, schema: Schema, rows: int | None, work: Path) -> None:
    """Convert `path` into the folder `work` (both passes, then the manifest)."""
    scan = _scan(path, schema, rows)
    n, dtypes = scan.n, scan.dtypes
    names = {key: _file_name(key[0], j) for j, key in enumerate(dtypes)}
    with contextlib.ExitStack() as stack:
        files = {key: npy_writer(stack, work / names[key], dtype, scan.sizes.get(key, n))
                 for key, dtype in dtypes.items()}
        for f in _inline(schema):
            files[Role.list_offsets, f].write(np.zeros(1, dtype=np.int64).tobytes())
        at = {f: 0 for f in _inline(schema)}  # ids written per list field
        written = 0
        for df, raw in _chunks(path, schema, rows):
            for key, a in _chunk_arrays(df, path, schema, written).items():
                files[key].write(np.ascontiguousarray(a.astype(dtypes[key])).tobytes())
            for f in _inline(schema):
                lc = _check_list(path, schema, f, raw, written)
                files[Role.list_ids, f].write(lc.ids.astype(dtypes[Role.list_ids, f]).tobytes())
                files[Role.list_offsets, f].write((at[f] + np.cumsum(lc.lengths)).astype(np.int64).tobytes())
                if lc.weights is not None:
                    files[Role.list_weights, f].write(lc.weights.tobytes())
                at[f] += len(lc.ids)
            written += len(df)
        assert written == n, (path, written, n)
        assert all(at[f] == scan.sizes[Role.list_ids, f] for f in _inline(schema)), (path, at)
    manifest = {**_key(path, schema, rows), "n": n, "max_ids": scan.max_ids, "list_rows_max": scan.list_rows_max,
                "files": [[key[0].value, key[1], names[key]] for key in dtypes]}
    (work / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def _read_manifest(folder: Path) -> dict[str, object] | None:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _current(manifest: dict[str, object] | None, key: dict[str, object]) -> bool:
    return manifest is not None and all(manifest.get(k) == v for k, v in key.items())


def publish(final: Path, key: dict[str, object], build: Callable[[Path], None]) -> dict[str, object]:
    """The manifest of the store at `final`, built first (`build(work folder)`, which writes the manifest
    with `key` in it) when absent or stale, and published atomically (Note [Column store])."""
    manifest = _read_manifest(final)
    if _current(manifest, key):
        return manifest  # type: ignore[return-value]
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".lock-{final.name}"):
        manifest = _read_manifest(final)  # another process (a torchrun rank) may have built it meanwhile
        if _current(manifest, key):
            return manifest  # type: ignore[return-value]
        for stale in root.glob(f".tmp-{final.name}.*"):  # a killed build's (under the lock, nobody else's)
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}.", dir=root))
        try:
            build(work)
            if final.exists():
                shutil.rmtree(final)
            os.replace(work, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    manifest = _read_manifest(final)
    assert manifest is not None
    return manifest


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (flock) for one build at a time; no lock where the file system has none."""
    with open(path, "a+b") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        yield


def open_columns(folder: Path, files: list[list[str]]) -> dict[Role, dict[str, ColumnFile]]:
    """The manifest's [role, column, file name] entries, opened, by role."""
    cols: dict[Role, dict[str, ColumnFile]] = {r: {} for r in Role}
    for role, col, name in files:
        cols[Role(role)][col] = ColumnFile.open(folder / name)
    return cols


def open_store(path: Path, schema: Schema, rows: int | None, root: Path | None = None) -> Stored:
    """The store of `path` (converted first when absent or stale: Note [Column store])."""
    root = cache_root(path.parent) if root is None else root
    final = root / f"{path.name}.{'all' if rows is None else rows}"

    def build(work: Path) -> None:
        log.info("converting %s into the column store %s", path, final)
        _build(path, schema, rows, work)

    manifest = publish(final, _key(path, schema, rows), build)
    cols = open_columns(final, manifest["files"])  # type: ignore[arg-type]
    groups = None
    if schema.user_id is not None:
        groups = cols[Role.sparse].get(schema.user_id) or cols[Role.group][schema.user_id]
    lists = {f: ListColumn(ids, cols[Role.list_offsets][f], cols[Role.list_weights].get(f))
             for f, ids in cols[Role.list_ids].items()}
    max_ids = dict(manifest["max_ids"])  # type: ignore[call-overload]
    if schema.list_rows and schema.lists:  # no list field read: the list table stays closed (Note [Unread lists])
        table = _open_list_table(path, schema, root, cols[Role.list_rows][schema.list_rows], manifest)
        lists, max_ids = table.lists, {**max_ids, **table.max_ids}
    return Stored(source=path, n=int(manifest["n"]),  # type: ignore[arg-type]
                  labels=cols[Role.label], sparse=cols[Role.sparse], dense=cols[Role.dense], groups=groups,
                  max_ids=max_ids, lists=lists)


def _open_list_table(path: Path, schema: Schema, root: Path, rows: ColumnFile, manifest: dict[str, object]) -> Stored:
    """The list table of split file `path`, its list fields mapped and pointed at by `rows` (Note [List tables])."""
    table = list_table_path(path)
    if not table.is_file():
        raise DataError(f"{path}: its list fields ({', '.join(schema.lists)}) live in a list table (schema.json's "
                        f"'list_rows' is '{schema.list_rows}'), but {table} is missing")
    alone = Schema(name=schema.name, labels=(), sparse=(), dense=(), groups={}, user_id=None, lists=schema.lists,
                   list_weights=schema.list_weights)
    stored = open_store(table, alone, None, root)
    top = manifest.get("list_rows_max")
    if isinstance(top, int) and top >= stored.n:  # name the first row pointing past the table
        for a in range(0, rows.n, CHUNK_ROWS):
            v = rows.read(a, a + CHUNK_ROWS)
            if (v >= stored.n).any():
                k = _first(v >= stored.n)
                raise fail(path, str(schema.list_rows), a + k, f"list row {v[k]} is beyond the {stored.n} rows of "
                                                              f"its list table {table}")
    mapped = {f: ListColumn(c.ids.mapped(), c.offsets.mapped(),  # type: ignore[attr-defined]
                            None if c.weights is None else c.weights.mapped(), rows)  # type: ignore[attr-defined]
              for f, c in stored.lists.items()}
    return replace(stored, lists=mapped)
