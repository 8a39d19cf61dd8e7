"""Writing a prepared folder: the split files and their list tables, row group by row group, and publishing
them into OUT (runtime/prepare.py runs the passes that feed them)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..catalog import LIST_ROW, SCHEMA_FILE, list_table_path
from .prepare_join import CommonIds

__all__ = ["LABELS", "SplitWriter", "publish", "remove_stale", "table_schemas"]

LABELS = ("click", "purchase")


class SplitWriter:
    """One split's Parquet file, written one row group of exactly `row_group_size` rows at a time (the last may be short)."""

    def __init__(self, path: Path, schema: pa.Schema, row_group_size: int, lists: pa.Schema | None = None) -> None:
        self.path = path
        self.schema = schema
        self.writer = pq.ParquetWriter(str(path), schema, compression="zstd")
        self.row_group_size = row_group_size
        self.held: list[pa.Table] = []
        self.n_held = 0
        self.written = 0
        self.max_held = 0
        self.closed = False
        # the split's list table (Note [List tables] in runtime/store.py)
        self.lists = None if lists is None else SplitWriter(list_table_path(path), lists, row_group_size)

    @property
    def paths(self) -> list[Path]:
        return [self.path, *self.lists.paths] if self.lists is not None else [self.path]

    def start_lists(self, common: Sequence[CommonIds], n_lines: int) -> None:
        """Begin the list table with the common-features lines and an empty row (Note [Own lists])."""
        assert self.lists is not None
        for a in range(0, n_lines + 1, self.row_group_size):
            b = min(n_lines + 1, a + self.row_group_size)
            lines = [x for c in common for x in c.lines(a, b)]
            self.lists.append(pa.Table.from_arrays(lines, schema=self.lists.schema))

    def add_lists(self, own: pa.Table, table: pa.Table) -> pa.Table:
        """Append rows' own lists to the list table; `table` with its placeholder list rows -1 - k made theirs."""
        assert self.lists is not None
        first = self.lists.written + self.lists.n_held
        self.lists.append(own)
        k = table.schema.get_field_index(LIST_ROW)
        at = table.column(k).to_numpy()
        return table.set_column(k, LIST_ROW, pa.array(np.where(at < 0, first - 1 - at, at).astype(np.int32)))

    def append(self, table: pa.Table) -> None:
        self.held.append(table)
        self.n_held += table.num_rows
        if self.n_held >= self.row_group_size:
            self._write(self.n_held - self.n_held % self.row_group_size)
        self.max_held = max(self.max_held, self.n_held)

    def _write(self, n: int) -> None:
        """Write the first n held rows (a multiple of row_group_size, or all at the end) as row groups."""
        table = pa.concat_tables(self.held).combine_chunks()
        for start in range(0, n, self.row_group_size):
            group = table.slice(start, min(self.row_group_size, n - start))
            self.writer.write_table(group, row_group_size=self.row_group_size)
        rest = table.slice(n)
        self.held = [rest] if rest.num_rows else []
        self.n_held = rest.num_rows
        self.written += n

    def close(self) -> None:
        if self.n_held:
            self._write(self.n_held)
        self.writer.close()
        self.closed = True
        if self.lists is not None:
            self.lists.close()

    def abandon(self) -> None:
        """Close the file without writing what is held (after an error; the folder is removed)."""
        if not self.closed:
            with contextlib.suppress(Exception):
                self.writer.close()
            self.closed = True
        if self.lists is not None:
            self.lists.abandon()


def table_schemas(schema: Any) -> tuple[pa.Schema, pa.Schema | None]:
    """The columns of train/val/test.parquet (labels, sparse ids, the list-table row, dense values) and of their
    list tables (list ids and weights; None without list fields): Note [List tables] in runtime/store.py."""
    rows = [(LIST_ROW, pa.int32())] if schema.lists else []
    table = pa.schema([(c, pa.int8()) for c in LABELS] + [(f, pa.int32()) for f in schema.sparse] + rows
                      + [(d, pa.float32()) for d in schema.dense])
    lists = [c for f in schema.lists
             for c in ((f, pa.list_(pa.int32())), (schema.list_weights[f], pa.list_(pa.float32())))]
    return table, pa.schema(lists) if lists else None


def remove_stale(out: Path) -> None:
    """Remove temporary folders of prepares that were killed (their process is gone) from OUT."""
    for stale in out.glob(".prepare-*-*"):
        m = re.fullmatch(r"\.prepare-(\d+)-.*", stale.name)
        if m is None or not stale.is_dir() or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass  # alive, or not ours to signal


def publish(work: Path, out: Path, names: Sequence[str]) -> dict[str, str]:
    """fsync every file, then move them into OUT in order (data first, schema.json last), then fsync OUT.

    An earlier prepare's schema.json goes first: a reader that starts while the data files are being
    replaced finds no schema (a "not prepared" error) rather than the old schema over new data.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out / SCHEMA_FILE)
    for old in out.glob("*.lists.parquet"):  # an earlier prepare's list tables (this one may have none)
        if old.name not in names:
            old.unlink()
    for name in names:
        fd = os.open(work / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    written = {}
    for name in names:
        os.replace(work / name, out / name)
        written[name] = str(out / name)
    with contextlib.suppress(OSError):
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return written
