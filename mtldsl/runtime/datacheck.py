"""Checks over a dataset folder's files and splits: what the value-by-value conversion (store.py) cannot see.

Takes the split files, the schema and the stored splits (data.Split); gives the vocabulary sizes, bounded
(Note [Vocabulary bound]), or a DataError naming file, column and row; a column only the train file has,
blamed on it; warnings for features that copy a label; the rows whose labels contradict the spec's links
(`purchase = 1` with `click = 0`). Splits are read through Split.scan/_rows_of, never whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtldsl.catalog import MAX_VOCAB, DataError, Schema
from mtldsl.datafiles import read_header

from .store import Stored, fail

__all__ = ["COPY_ROWS", "checked_vocab_sizes", "label_copies", "same_columns", "unlinked_rows"]


# Note [Vocabulary bound]
# A field's embedding table has max id + 1 rows, so one stray id (2^40, a raw 64-bit hash) would ask for
# terabytes. A field's vocabulary is limited to MAX_VOCAB (2^27, 134,217,728 rows: 2 GiB per 4 dimensions
# of float32, 8 GiB at dim 16, before the optimizer's state); the first id at or beyond it is an error
# naming the file, column, row and the table it would make. Id spaces that are hashes (or raw ids far
# sparser than their range) are hashed into a fixed number of buckets instead: `"hash_ids": {"field":
# buckets}` in the folder's schema.json takes every id of that field modulo the buckets (any 64-bit
# integer, negative ones too, is accepted there), and `mtldsl train --hash-ids N` does so for every id
# field the schema does not hash (ids below N are unchanged, so small fields keep their size). A hashed
# field's vocabulary is its largest id after hashing + 1, at most the bucket count. Colliding ids then
# share a row, as in any hashed embedding; a run records its --hash-ids, and evaluate/predict reuse it.


def checked_vocab_sizes(schema: Schema, stored: Mapping[str, Stored], splits: Mapping[str, Any]) -> dict[str, int]:
    """max id + 1 over all splits (of a hashed field: its ids after hashing); with declared sizes (schema.json), an
    id beyond them is a DataError, and so is a vocabulary over MAX_VOCAB (Note [Vocabulary bound])."""
    fields = (*schema.sparse, *schema.lists)
    computed = {col: max(st.max_ids[col] for st in stored.values()) + 1 for col in fields}
    for col in fields:
        if computed[col] > MAX_VOCAB and col not in schema.hashed:
            name, (i, v) = _first_id_at_least(stored, splits, col, MAX_VOCAB)
            raise fail(stored[name].source, col, i, f"id {v} would make an embedding table of {v + 1} rows "
                       f"({_size(v + 1)} per 4 dimensions of float32), over the limit of {MAX_VOCAB} rows; if the ids "
                       f"are hashes or sparse, hash them into buckets: --hash-ids {1 << 20}, or \"hash_ids\": "
                       f"{{\"{col}\": {1 << 20}}} in the folder's schema.json (Note [Vocabulary bound])")
    if schema.vocab_sizes is None:
        return computed
    for col in fields:
        size = schema.vocab_sizes[col]
        if computed[col] > size:
            name, (i, v) = _first_id_at_least(stored, splits, col, size)
            raise fail(stored[name].source, col, i, f"id {v} is outside the declared vocabulary size {size}")
    return dict(schema.vocab_sizes)


def _first_id_at_least(stored: Mapping[str, Stored], splits: Mapping[str, Any], col: str,
                       size: int) -> tuple[str, tuple[int, int]]:
    """The split and (0-based row, id) of the first id >= size of `col` (the caller knows there is one)."""
    for name in stored:
        found = splits[name].first_at_least(col, size)
        if found is not None:
            return name, found
    raise AssertionError(f"no id >= {size} in column {col!r}")


def _size(n_rows: int) -> str:
    """n rows x 16 bytes (4 float32 dimensions), in binary units."""
    size = float(n_rows * 16)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    raise AssertionError("unreachable")




def same_columns(files: Mapping[str, Path], schema: Schema) -> None:
    """A column the schema needs that only the train file has is that file's fault, not the others': say so
    (the store's check of each file would blame the first file that lacks it)."""
    if len(files) < 2:
        return
    headers = {name: set(read_header(path)) for name, path in files.items()}
    for col in schema.columns:
        lacking = [name for name, header in headers.items() if col not in header]
        if lacking and "train" not in lacking and len(lacking) == len(files) - 1:
            others = ", ".join(files[name].name for name in lacking)
            raise DataError(f"{files['train']}: column '{col}' is in this file only ({others} lack it): remove it, "
                            f"or add it to every split")


def unlinked_rows(dataset: Any, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], dict[str, int]]:
    """Per (label, condition) pair the spec links (`label purchase where click`, `click * purchase`): how many
    rows of each split have label = 1 with condition = 0. Only the pairs and splits with such rows."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    for label, cond in pairs:
        for name in ("train", "val", "test"):
            split = dataset.split(name)
            if label not in split.label_cols or cond not in split.label_cols:
                continue
            ys = split.scan(split.label_cols[label])
            cs = split.scan(split.label_cols[cond])
            count = sum(int(((np.asarray(y) != 0) & (np.asarray(c) == 0)).sum()) for (_, y), (_, c) in zip(ys, cs))
            if count:
                out.setdefault((label, cond), {})[name] = count
    return out


COPY_ROWS = 1 << 16  # train rows compared when looking for copies of a label among the features


def label_copies(train: Any, path: Path) -> tuple[str, ...]:
    """Warnings for features equal to a label on the first COPY_ROWS train rows (a label leaking into the
    inputs makes every metric perfect and the model useless)."""
    n = min(len(train), COPY_ROWS)
    labels = {c: np.asarray(train._rows_of(col, 0, n), dtype=np.float64) for c, col in train.label_cols.items()}
    labels = {c: y for c, y in labels.items() if len(np.unique(y)) > 1}
    out = []
    for f, col in (*train.sparse_cols.items(), *train.dense_cols.items()):
        x = np.asarray(train._rows_of(col, 0, n), dtype=np.float64)
        for c, y in labels.items():
            if np.array_equal(x, y):
                out.append(f"{path}: column '{f}' equals the label '{c}' on the first {n} rows: a copy of the label "
                           "among the features leaks it into the inputs; drop it (or list it under 'labels' in a "
                           "schema.json)")
    return tuple(out)
