"""Dataset source (a name or a folder of CSV/Parquet files) -> Dataset of column splits, read batch by batch.

`load_dataset("synthetic")` generates the built-in data in memory (Note [Synthetic data]); a named
dataset (`ali_ccp`, `census_income`, `aliexpress`) is read from its folder (catalog.resolve_folder); any
other source is a folder path whose schema comes from `schema.json` or is inferred (never saved into the
folder: Note [The user's folder] in store.py). A folder's files are converted once into the on-disk column store
(store.py, Note [Column store]), checking every value: bad data raises DataError naming the file, column
and 1-based data row, never a pandas traceback. A `Split` holds its columns (stored files or in-memory
arrays) and yields batches gathered from a window of rows at a time (Note [Block shuffle]), list fields
included (Note [List batches]), so a split is never resident whole.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mtldsl.catalog import (
    KNOWN_DATASETS,
    DataError,
    DatasetNotFound,
    Schema,
    find_split_files,
    locate,
    named,
    resolve_folder,
    schema_for,
)

from . import synthetic
from .datacheck import checked_vocab_sizes, label_copies, same_columns
from .store import ColumnFile, ListColumn, Stored, cache_root, fail, fmt, narrow_id_dtype, open_store
from .synthetic import SYNTHETIC_ROWS, generate, split_sizes, synthetic_truth

__all__ = [
    "BLOCK_ROWS",
    "MIN_TRAIN_ROWS",
    "DataError",
    "Dataset",
    "DatasetNotFound",
    "SYNTHETIC_ROWS",
    "Split",
    "VAL_SHARE",
    "WINDOW_BLOCKS",
    "epoch_chunks",
    "load_dataset",
    "synthetic_truth",
    "train_batch_count",
]

log = logging.getLogger(__name__)

VAL_SHARE = 0.1  # share of train held out as val when a dataset has no val file
_VAL_SEED = 0  # the held-out val rows do not depend on the training seed
SCAN_ROWS = 1 << 20  # rows per read when a whole column is scanned (vocabulary and label checks)

Column = np.ndarray | ColumnFile | Tensor  # a stored file, host memory, or (moved whole) an accelerator


# --- order of an epoch (Note [Block shuffle]) -------------------------------------------------------

# Note [Block shuffle]
# A split's rows are cut into blocks of BLOCK_ROWS consecutive rows (65,536; the last may be shorter).
# An epoch's order is drawn from the epoch's generator alone (seed, epoch: Note [Resume]): first a
# permutation of the blocks, then, for each window of WINDOW_BLOCKS (8) consecutive blocks of that
# permutation, a permutation of the window's rows (512Ki rows). Batches are consecutive runs of that
# order, so a batch may straddle two windows. Every row is visited exactly once per epoch, and the
# order depends on nothing but (seed, epoch, number of rows): a resumed epoch redraws it and skips the
# batches already trained without reading them; DDP ranks draw the same order and take their shard of
# each global batch (Note [Global batch]). Reading a window costs one positioned read per block and
# column; its rows are kept as one row-major matrix per kind in their narrow dtypes (~70 MB for
# Ali-CCP's columns), at most two windows at a time, so stored splits stream from the page cache in
# large sequential reads instead of one random page per row, and a batch is one index_select per kind.
# Randomness: splits of at most one window (512Ki rows: every test, the default synthetic data) get
# a uniform permutation. Larger splits get a uniform order of blocks and uniform mixing within 8
# blocks: a batch draws its rows from 8 random blocks of the file, not from the whole file, so data
# sorted by a key (a user, a day) gives batches of ~8 values of that key's 64Ki-row neighbourhoods.
# Shuffle (or prepare) such files first if that matters; Ali-CCP's prepared files come shuffled.
# Evaluation and prediction read windows in file order, without a permutation.

BLOCK_ROWS = 1 << 16
WINDOW_BLOCKS = 8

# Note [Remainder batch]
# A training epoch of n rows in batches of B ends with a batch of n mod B rows. When that is one row
# (and B > 1) it is skipped: BatchNorm cannot normalise a single row in training mode (8 of the shipped
# specs use it), and a one-row step is the noisiest step there is, so it is skipped for every model
# alike (the same steps whatever the architecture). The row is not lost for good: the next epoch draws a
# new order (Note [Block shuffle]), so another row comes last. The step count per epoch is still a
# function of (n, B) alone (train_batch_count), so a resumed epoch skips the same batches and resume
# stays exact; under torchrun a rank's share of the tail counts the same way (distributed.py). Evaluation
# runs in eval mode and uses every row. With --batch-size 1 every batch is one row: a model with
# BatchNorm refuses it (loop.py), any other trains on every row.

MIN_TRAIN_ROWS = 2  # the smallest training batch when --batch-size > 1 (Note [Remainder batch])


def train_batch_count(n: int, batch_size: int) -> int:
    """Training steps of an epoch of n rows: every batch but a final one of a single row (Note [Remainder batch])."""
    full, tail = divmod(n, batch_size)
    return full + (1 if tail >= MIN_TRAIN_ROWS else 0)


@dataclass
class _Window:
    """Some blocks of a split, read when a batch first needs them; `perm` orders their rows (None: as read)."""

    ranges: list[tuple[int, int]]
    perm: Tensor | None  # int64, positions in the window
    rows: dict[str, Tensor] | None = None
    lists: dict[str, _Bags] | None = None  # per list field: the window's rows of it (Note [List batches])

    def __len__(self) -> int:
        return sum(b - a for a, b in self.ranges)

    def positions(self, a: int, b: int) -> Tensor | slice:
        return slice(a, b) if self.perm is None else self.perm[a:b]


Piece = tuple[_Window, "Tensor | slice"]


# Note [List batches]
# A list field is read like the other columns, a window at a time: for the window's blocks, its offsets
# and then the ids (and weights) between the first and last offset, one positioned read each (Note
# [Column store]), kept as `_Bags`: per row its length and where its ids start among the window's ids.
# A batch takes, for its rows in the epoch's order, their lengths and starts, gathers their ids with one
# index (`_ragged`: position = a run of consecutive indices per row), and rebases the offsets to the batch
# (the exclusive cumulative sum of the lengths, so the first is 0), as Note [List fields] in
# runtime/layers.py wants: batch["<f>.ids"], ["<f>.offsets"] and, for a weighted field, ["<f>.weights"].
# Rows follow the same order as the single-valued columns, so row i of the batch is list i of each field.
# A window holds its rows' ids whole: its memory grows with the lists' lengths, not with the split.


@dataclass
class _Bags:
    """Rows of one list field: per row its length and first position in `ids`; `weights` aligned with `ids`."""

    lengths: Tensor  # int64 (rows,)
    starts: Tensor  # int64 (rows,)
    ids: Tensor
    weights: Tensor | None

    @classmethod
    def of(cls, lengths: Tensor, ids: Tensor, weights: Tensor | None) -> _Bags:
        return cls(lengths, torch.cumsum(lengths, 0) - lengths, ids, weights)

    def take(self, pos: Tensor | slice) -> _Bags:
        """The rows at `pos`, their ids gathered (starts then index the new ids)."""
        lengths = self.lengths[pos] if isinstance(pos, slice) else self.lengths.index_select(0, pos.to(self.lengths.device))
        starts = self.starts[pos] if isinstance(pos, slice) else self.starts.index_select(0, pos.to(self.starts.device))
        at = _ragged(starts, lengths)
        return _Bags.of(lengths, self.ids[at], None if self.weights is None else self.weights[at])


def _ragged(starts: Tensor, lengths: Tensor) -> Tensor:
    """The positions starts[i], starts[i] + 1, ..., starts[i] + lengths[i] - 1 of every row i, concatenated."""
    total = int(lengths.sum())
    ends = torch.cumsum(lengths, 0)
    shift = torch.repeat_interleave(starts - (ends - lengths), lengths, output_size=total)
    return torch.arange(total, device=starts.device) + shift


def _table_bags(lc: ListColumn, rows: np.ndarray) -> _Bags:
    """Rows `rows` of a list table (Note [List tables] in store.py), their ids gathered in that order."""
    offsets = np.asarray(lc.offsets)  # int64, a memory map of the table's offsets
    starts = torch.from_numpy(offsets[rows])
    lengths = torch.from_numpy(offsets[rows + 1]) - starts
    at = _ragged(starts, lengths).numpy()
    weights = None if lc.weights is None else _tensor(np.asarray(lc.weights)[at])
    return _Bags.of(lengths, _tensor(np.asarray(lc.ids)[at]), weights)


def _cat_bags(parts: list[_Bags]) -> _Bags:
    if len(parts) == 1:
        return parts[0]
    weights = None if parts[0].weights is None else torch.cat([p.weights for p in parts])  # type: ignore[misc]
    return _Bags.of(torch.cat([p.lengths for p in parts]), torch.cat([p.ids for p in parts]), weights)


def _windows(n: int, generator: torch.Generator | None) -> Iterator[_Window]:
    """The windows of one epoch in order: shuffled when `generator` is given, else the file order."""
    n_blocks = max(1, math.ceil(n / BLOCK_ROWS))
    if generator is None:
        order = np.arange(n_blocks)
    else:
        order = torch.randperm(n_blocks, generator=generator).numpy()
    for w in range(0, n_blocks, WINDOW_BLOCKS):
        ranges = [(int(b) * BLOCK_ROWS, min(n, (int(b) + 1) * BLOCK_ROWS)) for b in order[w:w + WINDOW_BLOCKS]]
        size = sum(b - a for a, b in ranges)
        perm = None if generator is None else torch.randperm(size, generator=generator)
        yield _Window(ranges, perm)


def epoch_chunks(n: int, size: int, generator: torch.Generator | None) -> Iterator[list[Piece]]:
    """Consecutive runs of `size` rows of an epoch's order (the last one shorter), as pieces of windows."""
    pieces: list[Piece] = []
    have = 0
    for window in _windows(n, generator):
        start = 0
        while start < len(window):
            take = min(size - have, len(window) - start)
            pieces.append((window, window.positions(start, start + take)))
            have += take
            start += take
            if have == size:
                yield pieces
                pieces, have = [], 0
    if pieces:
        yield pieces


def sub_chunk(pieces: list[Piece], a: int, b: int) -> list[Piece]:
    """Rows [a, b) of a chunk (a rank's shard of a global batch)."""
    out: list[Piece] = []
    at = 0
    for window, pos in pieces:
        k = pos.stop - pos.start if isinstance(pos, slice) else len(pos)
        lo, hi = max(a, at), min(b, at + k)
        if lo < hi:
            if isinstance(pos, slice):
                out.append((window, slice(pos.start + lo - at, pos.start + hi - at)))
            else:
                out.append((window, pos[lo - at:hi - at]))
        at += k
    return out


def chunk_len(pieces: list[Piece]) -> int:
    return sum((p.stop - p.start) if isinstance(p, slice) else len(p) for _, p in pieces)


# --- splits ---------------------------------------------------------------------------------------


def _read(col: Column, a: int, b: int) -> np.ndarray | Tensor:
    if isinstance(col, ColumnFile):
        return col.read(a, b)
    return col[a:b]


def _take(a: np.ndarray | Tensor, pos: np.ndarray | Tensor | slice) -> np.ndarray | Tensor:
    if isinstance(pos, slice):
        return a[pos]
    if isinstance(a, Tensor):
        if not isinstance(pos, Tensor):
            pos = torch.from_numpy(np.ascontiguousarray(pos, dtype=np.int64))
        return a.index_select(0, pos.to(a.device))
    return a[pos]


def _cat(parts: list[np.ndarray | Tensor]) -> np.ndarray | Tensor:
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)  # type: ignore[arg-type]
    return np.concatenate(parts)  # type: ignore[arg-type]


def _tensor(a: np.ndarray | Tensor) -> Tensor:
    return a if isinstance(a, Tensor) else torch.from_numpy(np.ascontiguousarray(a))


def _stack(cols: list[np.ndarray | Tensor], n: int) -> np.ndarray | Tensor:
    """(n, len(cols)) row-major, in the columns' common dtype (narrow ids stay narrow)."""
    if cols and isinstance(cols[0], Tensor):
        dtype = functools.reduce(torch.promote_types, [c.dtype for c in cols])  # type: ignore[union-attr]
        return torch.stack([c.to(dtype) for c in cols], dim=1)  # type: ignore[union-attr]
    if not cols:
        return np.empty((n, 0), dtype=np.float32)
    out = np.empty((n, len(cols)), dtype=np.result_type(*cols))
    for j, c in enumerate(cols):
        out[:, j] = c
    return out


@dataclass(eq=False)
class Split:
    """The rows of one split, as columns (schema names); batches are gathered a window at a time.

    Columns are ColumnFiles (a stored split: read on demand), numpy arrays (in memory) or, after `to` an
    accelerator, tensors there. `index` selects rows of the columns (a held-out val, `take`), ascending
    for stored columns. With `products`, a batch's labels are those products of label columns (the
    objective's label products: binding.py), else the label columns themselves; always float32.
    """

    sparse_cols: dict[str, Column]
    dense_cols: dict[str, Column]
    label_cols: dict[str, Column]
    group_col: Column | None
    index: np.ndarray | None = None
    products: dict[str, tuple[str, ...]] | None = None
    truth_cols: dict[str, np.ndarray] | None = field(default=None, repr=False)  # synthetic only: synthetic_truth
    stream_to: torch.device | None = None  # rows stay here, batches go there (Note [Streamed batches])
    list_cols: dict[str, ListColumn] = field(default_factory=dict)  # list fields as CSR (Note [List batches])

    @classmethod
    def from_tensors(cls, sparse: Tensor, dense: Tensor, labels: Mapping[str, Tensor], groups: Tensor | None,
                     truth: Mapping[str, Tensor] | None = None) -> Split:
        """An in-memory split from (N, F) ids, (N, D) dense values, (N,) labels and groups (columns named 0..)."""
        return cls(
            sparse_cols={str(j): sparse[:, j].numpy() for j in range(sparse.shape[1])},
            dense_cols={str(j): dense[:, j].numpy() for j in range(dense.shape[1])},
            label_cols={k: v.numpy() for k, v in labels.items()},
            group_col=None if groups is None else groups.numpy(),
            truth_cols=None if truth is None else {k: v.numpy() for k, v in truth.items()},
        )

    def __len__(self) -> int:
        if self.index is not None:
            return len(self.index)
        return len(next(iter(self.label_cols.values())))

    @property
    def has_groups(self) -> bool:
        return self.group_col is not None

    def _columns(self) -> dict[str, Column]:
        cols: dict[str, Column] = {}
        cols.update({f"s:{k}": c for k, c in self.sparse_cols.items()})
        cols.update({f"d:{k}": c for k, c in self.dense_cols.items()})
        cols.update({f"l:{k}": c for k, c in self.label_cols.items()})
        if self.group_col is not None:
            cols["g"] = self.group_col
        return cols

    @property
    def nbytes(self) -> int:
        """Bytes of the rows' columns (what moving the split to a device would take there)."""
        n = len(self)
        rows = sum(n * (c.dtype.itemsize if isinstance(c, (np.ndarray, ColumnFile)) else c.element_size())
                   for c in self._columns().values())
        inline = [lc for lc in self.list_cols.values() if lc.rows is None]
        parts = [p for lc in inline for p in (lc.ids, lc.offsets, lc.weights) if p is not None]
        tables = self._table_list_bytes([lc for lc in self.list_cols.values() if lc.rows is not None])
        return rows + tables + sum(p.nbytes if isinstance(p, (np.ndarray, ColumnFile)) else p.numel() * p.element_size()
                                   for p in parts)

    def _table_list_bytes(self, fields: list[ListColumn]) -> int:
        """Bytes of the split's rows of list fields read from list tables, as `to` moves them (one scan of each
        list-table row column, which a table's fields share: Note [List tables] in store.py)."""
        total = 0
        for rows in {id(lc.rows): lc.rows for lc in fields}.values():
            sharing = [lc for lc in fields if lc.rows is rows]
            offsets = [np.asarray(lc.offsets) for lc in sharing]
            n_ids = [0] * len(sharing)
            for _, at in self.scan(rows):  # type: ignore[arg-type]
                at = np.asarray(at, dtype=np.int64)
                for k, off in enumerate(offsets):
                    n_ids[k] += int((off[at + 1] - off[at]).sum())
            for lc, n in zip(sharing, n_ids):
                per_id = np.asarray(lc.ids).dtype.itemsize + (4 if lc.weights is not None else 0)
                total += 8 * (len(self) + 1) + n * per_id
        return total

    def _rows_of(self, col: Column, a: int, b: int) -> np.ndarray | Tensor:
        """Rows [a, b) of the split (not of the column) from one column."""
        if self.index is None:
            return _read(col, a, b)
        rows = self.index[a:b]
        if not len(rows):
            return _read(col, 0, 0)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        return _take(_read(col, lo, hi), rows - lo)

    def _bags_of(self, lc: ListColumn, a: int, b: int) -> _Bags:
        """Rows [a, b) of the split from one list field (Note [List batches])."""
        if self.index is None:
            if lc.rows is not None:
                return _table_bags(lc, np.asarray(_read(lc.rows, a, b), dtype=np.int64))
            off = _tensor(_read(lc.offsets, a, b + 1)).to(torch.int64)
            lo, hi = int(off[0]), int(off[-1])
            weights = None if lc.weights is None else _tensor(_read(lc.weights, lo, hi))
            return _Bags.of(off[1:] - off[:-1], _tensor(_read(lc.ids, lo, hi)), weights)
        rows = self.index[a:b]
        r0 = int(rows.min()) if len(rows) else 0
        r1 = int(rows.max()) + 1 if len(rows) else 0
        whole = replace(self, index=None)._bags_of(lc, r0, r1)
        return whole.take(torch.from_numpy(np.ascontiguousarray(rows - r0, dtype=np.int64)))

    def _load(self, window: _Window) -> dict[str, Tensor]:
        """The window's rows as one row-major matrix per kind ("s", "d", "l": columns in order, in their common
        narrow dtype) and the group vector ("g"), so a batch is one row gather per kind; its list fields go to
        `window.lists` (Note [List batches])."""
        if window.rows is None:
            def rows(c: Column) -> np.ndarray | Tensor:
                return _cat([self._rows_of(c, a, b) for a, b in window.ranges])

            window.rows = {kind: _tensor(_stack([rows(c) for c in cols.values()], len(window)))
                           for kind, cols in (("s", self.sparse_cols), ("d", self.dense_cols), ("l", self.label_cols))}
            if self.group_col is not None:
                window.rows["g"] = _tensor(rows(self.group_col))
            window.lists = {f: _cat_bags([self._bags_of(lc, a, b) for a, b in window.ranges])
                            for f, lc in self.list_cols.items()}
        return window.rows

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype, like: np.ndarray | Tensor) -> Tensor:
        if isinstance(like, Tensor) and like.device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=like.device)
        pin = self.stream_to is not None and self.stream_to.type == "cuda"
        return torch.empty(shape, dtype=dtype, pin_memory=pin)

    def _deliver(self, t: Tensor) -> Tensor:
        # Note [Streamed batches]: a split too large for its accelerator stays on the host (in the column
        # store or in memory); each batch is gathered there into pinned (page-locked) memory (Split._empty)
        # and sent with a non-blocking copy, so the host gathers batch k+1 while the device still computes
        # batch k. Torch's caching host allocator keeps a pinned block alive until the copy reading it has
        # finished. On a CPU (stream_to = cpu in tests) the same code runs, without the pinning.
        if self.stream_to is None:
            return t
        return t.to(self.stream_to, non_blocking=True)

    def _products(self, raw: dict[str, Tensor]) -> dict[str, Tensor]:
        """The label columns (float32) -> the batch's labels: the products when set (as Objective.targets)."""
        if self.products is None:
            return raw
        out = {}
        for key, names in self.products.items():
            y = raw[names[0]]
            for c in names[1:]:
                y = y * raw[c]
            out[key] = y
        return out

    def gather(self, pieces: list[Piece]) -> dict[str, Tensor | dict[str, Tensor] | None]:
        """One batch: {"sparse" (B, F) int64, "dense" (B, D) float32, "labels": {name: (B,) float32}, "groups"
        (B,) int64 or None, and per list field "<f>.ids", "<f>.offsets" (+ "<f>.weights"): Note [List batches]}
        of the rows in `pieces` (epoch_chunks), on the batch device."""
        parts: dict[str, list[np.ndarray | Tensor]] = {}
        bags: dict[str, list[_Bags]] = {f: [] for f in self.list_cols}
        for window, pos in pieces:
            for k, v in self._load(window).items():
                parts.setdefault(k, []).append(_take(v, pos))
            for f, b in (window.lists or {}).items():
                bags[f].append(b.take(pos))
        rows = {k: _cat(v) for k, v in parts.items()}

        def convert(a: np.ndarray | Tensor, dtype: torch.dtype) -> Tensor:
            out = self._empty(tuple(a.shape), dtype, a)  # pinned when streaming to CUDA
            return out.copy_(_tensor(a))

        raw = convert(rows["l"], torch.float32)
        labels = self._products({k: raw[:, j] for j, k in enumerate(self.label_cols)})
        batch = {
            "sparse": self._deliver(convert(rows["s"], torch.int64)),
            "dense": self._deliver(convert(rows["d"], torch.float32)),
            "labels": {k: self._deliver(v.contiguous()) for k, v in labels.items()},
            "groups": None if self.group_col is None else self._deliver(convert(rows["g"], torch.int64)),
        }
        for f, b in bags.items():  # Note [List batches]: offsets rebased to the batch
            got = _cat_bags(b)
            batch[f"{f}.ids"] = self._deliver(convert(got.ids, torch.int64))
            batch[f"{f}.offsets"] = self._deliver(convert(got.starts, torch.int64))
            if got.weights is not None:
                batch[f"{f}.weights"] = self._deliver(convert(got.weights, torch.float32))
        return batch

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        skip: int = 0,
        min_rows: int = 1,
    ) -> Iterator[dict[str, Tensor]]:
        """Yield {"sparse", "dense", "labels": {name: ...}, "groups"} batches covering every row once.

        With shuffle, the epoch's block-shuffled order (Note [Block shuffle], drawn from `generator`);
        without, file order. The first `skip` batches are passed over without reading them (a resumed
        epoch); a last batch of fewer than `min_rows` rows is not yielded. `groups` is None when the dataset
        has no group id. Batches land on `stream_to` when it is
        set (Note [Streamed batches]).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if shuffle and generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        for k, pieces in enumerate(epoch_chunks(len(self), batch_size, generator if shuffle else None)):
            if (drop_last or chunk_len(pieces) < min_rows) and chunk_len(pieces) < batch_size:
                return  # the last chunk: dropped, or too small to train on (Note [Remainder batch])
            if k >= skip:
                yield self.gather(pieces)  # type: ignore[misc]

    def take(self, index: Tensor | np.ndarray) -> Split:
        """The rows at `index` (positions in this split), as a new split over the same columns."""
        idx = index.numpy() if isinstance(index, Tensor) else np.asarray(index)
        idx = idx.astype(np.int64, copy=False)
        return replace(self, index=idx if self.index is None else self.index[idx],
                       truth_cols=None if self.truth_cols is None else {k: v[idx] for k, v in self.truth_cols.items()})

    def to(self, device: torch.device | str) -> Split:
        """The same split with its rows on `device` (moved once, before training); a CPU reads them where they are."""
        device = torch.device(device)
        if device.type == "cpu":
            return self

        def mv(c: Column) -> Tensor:
            return _tensor(self._rows_of(c, 0, len(self))).to(device)

        return Split(
            sparse_cols={k: mv(c) for k, c in self.sparse_cols.items()},
            dense_cols={k: mv(c) for k, c in self.dense_cols.items()},
            label_cols={k: mv(c) for k, c in self.label_cols.items()},
            group_col=None if self.group_col is None else mv(self.group_col),
            products=self.products,
            truth_cols=self.truth_cols,
            list_cols=self.moved_lists(device),
        )

    def moved_lists(self, device: torch.device | str) -> dict[str, ListColumn]:
        """The split's rows of each list field as CSR tensors on `device` (what `to` moves)."""
        out = {}
        for f in self.list_cols:
            offsets, ids, weights = self.bags(f)
            out[f] = ListColumn(ids.to(device), offsets.to(device), None if weights is None else weights.to(device))
        return out

    # Whole columns, materialised: for tests, tools and small data; training and evaluation never call these.

    def _whole(self, cols: Mapping[str, Column], dtype: torch.dtype) -> Tensor:
        n = len(self)
        if not cols:
            return torch.empty((n, 0), dtype=dtype)
        return torch.stack([_tensor(self._rows_of(c, 0, n)).to(dtype) for c in cols.values()], dim=1)

    @property
    def sparse(self) -> Tensor:
        """int64 (N, F), the whole split (see above)."""
        return self._whole(self.sparse_cols, torch.int64)

    @property
    def dense(self) -> Tensor:
        """float32 (N, D), the whole split (see above)."""
        return self._whole(self.dense_cols, torch.float32)

    @property
    def labels(self) -> dict[str, Tensor]:
        """float32 (N,) per label (or label product), the whole split (see above)."""
        n = len(self)
        return self._products({k: _tensor(self._rows_of(c, 0, n)).to(torch.float32)
                               for k, c in self.label_cols.items()})

    @property
    def groups(self) -> Tensor | None:
        """int64 (N,), the whole split (see above); None without a group id."""
        if self.group_col is None:
            return None
        return _tensor(self._rows_of(self.group_col, 0, len(self))).to(torch.int64)

    @property
    def truth(self) -> dict[str, Tensor] | None:
        if self.truth_cols is None:
            return None
        return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in self.truth_cols.items()}

    def scan(self, col: Column) -> Iterator[tuple[int, np.ndarray | Tensor]]:
        """A whole column of the split in runs of SCAN_ROWS rows: (first row, values)."""
        for a in range(0, len(self), SCAN_ROWS):
            yield a, self._rows_of(col, a, min(len(self), a + SCAN_ROWS))

    def bags(self, field_name: str) -> tuple[Tensor, Tensor, Tensor | None]:
        """A list field of the whole split (see above): offsets (N + 1,) int64, ids, weights or None."""
        b = self._bags_of(self.list_cols[field_name], 0, len(self))
        return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(b.lengths.cpu(), 0)]), b.ids, b.weights

    def first_at_least(self, field_name: str, size: int) -> tuple[int, int] | None:
        """(0-based row, id) of the first id >= size in sparse or list column `field_name`; None when there is none."""
        if field_name in self.list_cols:
            for a in range(0, len(self), SCAN_ROWS):
                b = self._bags_of(self.list_cols[field_name], a, min(len(self), a + SCAN_ROWS))
                over = (b.ids >= size).cpu()
                if bool(over.any()):
                    k = int(torch.argmax(over.to(torch.uint8)))
                    row = int(torch.searchsorted(torch.cumsum(b.lengths.cpu(), 0), k, right=True))
                    return a + row, int(b.ids[k])
            return None
        for a, values in self.scan(self.sparse_cols[field_name]):
            over = values >= size
            if bool(over.any()):
                i = int(np.argmax(np.asarray(over.cpu() if isinstance(over, Tensor) else over)))
                return a + i, int(values[i])
        return None


@dataclass
class Dataset:
    schema: Schema  # with vocab_sizes filled (max id + 1 over all splits; fixed for synthetic)
    train: Split
    val: Split
    test: Split
    source: str  # "synthetic" or the folder path
    val_from_train: bool = False  # no val file: VAL_SHARE of train was held out as val
    notes: tuple[str, ...] = ()  # human-readable remarks worth printing (e.g. the held-out val)
    warnings: tuple[str, ...] = ()  # likely mistakes in the data, printed even without progress output

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise KeyError(f"no split '{name}' (train, val, test)")
        return getattr(self, name)


# --- loading --------------------------------------------------------------------------------------


def load_dataset(
    source: str = "synthetic",
    *,
    data_dir: str | Path | None = None,
    rows: int | None = None,
    seed: int = 0,
    labels: Sequence[str] | None = None,
    binary_labels: Sequence[str] = (),
    schema: Schema | None = None,
    hash_ids: int | None = None,
    lists: Sequence[str] | None = None,
) -> Dataset:
    """Load a named dataset or a folder (through its column store: Note [Column store]).

    rows: for synthetic, the total row count (default SYNTHETIC_ROWS, split 80/10/10); for real data,
    a cap on the rows read from each file. seed: the synthetic data's seed (real data ignores it).
    labels: label columns of a folder without schema.json. binary_labels: label columns that must be
    0 or 1 (the binary tasks'; the loader does not know task kinds). schema: a folder's schema as the
    caller resolved it (with the spec's labels: Note [Inferred labels] in catalog.py); else resolved here.
    hash_ids: hash every sparse field not hashed by the schema into that many buckets (Note [Vocabulary bound]).
    lists: the list fields to load (None: all): a folder's other list columns are never read or stored
    (Note [Unread lists]).
    An inferred schema is never written into the folder (Note [The user's folder] in store.py).
    """
    if rows is not None and rows < 1:
        raise ValueError(f"rows must be positive, got {rows}")
    key = named(source)
    if key == "synthetic":
        return _load_synthetic(SYNTHETIC_ROWS if rows is None else rows, seed)
    if key is not None:
        info = KNOWN_DATASETS[key]
        schema = schema_for(key, data_dir, labels=labels)  # fixed (Note [Ali-CCP lists]); rejects a labels override
        folder = resolve_folder(key, data_dir)
        prefix: str | None = info.file_prefix
    else:
        folder = locate(source, data_dir)
        if schema is None:
            schema = schema_for(str(folder), labels=labels)
        prefix = None
    if hash_ids is not None:
        schema = replace(schema, hashed={**{f: hash_ids for f in schema.sparse}, **schema.hashed})
    if lists is not None:
        schema = only_lists(schema, lists)
    unknown_binary = [c for c in binary_labels if c not in schema.labels]
    if unknown_binary:
        raise DataError(f"{folder}: binary label(s) {', '.join(map(repr, unknown_binary))} are not label columns")
    return _load_folder(folder, schema, prefix=prefix, rows=rows, binary_labels=tuple(binary_labels))


# Note [Unread lists]
# ~~~~~~~~~~~~~~~~~~~
# Whole behaviour lists are most of a prepared Ali-CCP folder: uncompressed in the column store they
# took 40 GiB of its 47 at full size, although a spec that says `fields all` never reads them. So
# training, evaluation and prediction load only the list fields the generated model reads
# (LIST_FIELDS): the schema they load with names just those (and their weights), and the column store,
# keyed by the schema, converts just those. A file has one store, so a spec that reads other lists than
# the last one converts the file again. A folder whose lists live in list tables (Note [List tables] in
# store.py; `data prepare` writes them) avoids that: its split files' stores hold the list-table column
# whatever the spec reads, and only the list tables, small, are converted again; a spec that reads no
# list opens no list table.


def only_lists(schema: Schema, keep: Sequence[str]) -> Schema:
    """The schema with only the list fields in `keep` (and their weights): Note [Unread lists]."""
    lists = tuple(f for f in schema.lists if f in keep)
    return replace(schema, lists=lists, list_weights={f: w for f, w in schema.list_weights.items() if f in lists})


def _stored_split(st: Stored) -> Split:
    return Split(sparse_cols=dict(st.sparse), dense_cols=dict(st.dense), label_cols=dict(st.labels),
                 group_col=st.groups, list_cols=dict(st.lists))


def _check_binary(st: Stored, split: Split, binary: tuple[str, ...]) -> None:
    """A binary label stored as float32 (it holds something else than 0/1): the first such row is the error."""
    for col in binary:
        c = st.labels[col]
        if c.dtype == np.uint8:
            continue  # only 0 and 1 (Note [Column store])
        for a, y in split.scan(c):
            bad = (y != 0) & (y != 1)
            if bad.any():
                i = int(np.argmax(bad))
                raise fail(st.source, col, a + i, f"expected a binary label 0 or 1, got {fmt(float(str(y[i])))}")


def _load_folder(
    folder: Path, schema: Schema, *, prefix: str | None, rows: int | None, binary_labels: tuple[str, ...]
) -> Dataset:
    files = find_split_files(folder, prefix)
    for split in ("train", "test"):
        if split not in files:
            raise DatasetNotFound(f"{folder}: no {split} file ({split}.csv, {split}.parquet or *_{split}_sample.csv)")
    same_columns(files, schema)
    root = cache_root(folder)
    stored: dict[str, Stored] = {}
    splits: dict[str, Split] = {}
    for name, path in files.items():
        stored[name] = open_store(path, schema, rows, root)
        splits[name] = _stored_split(stored[name])
        _check_binary(stored[name], splits[name], binary_labels)
    vocab = checked_vocab_sizes(schema, stored, splits)  # before the val hold-out, so rows still match the files
    notes: list[str] = []
    val_from_train = "val" not in splits
    if val_from_train:
        n = len(splits["train"])
        if n < 2:
            raise DataError(f"{files['train']}: {n} data row(s): too few to hold out a validation split")
        n_val = max(1, round(VAL_SHARE * n))
        perm = np.random.default_rng(_VAL_SEED).permutation(n)
        index_type = narrow_id_dtype(0, n)
        val_idx, train_idx = np.sort(perm[:n_val]).astype(index_type), np.sort(perm[n_val:]).astype(index_type)
        del perm
        splits["val"] = replace(splits["train"], index=val_idx)
        splits["train"] = replace(splits["train"], index=train_idx)
        notes.append(f"no val file in {folder}: held out {n_val} of {n} train rows ({VAL_SHARE:.0%}) as val")
        log.info(notes[-1])
    return Dataset(
        schema=replace(schema, vocab_sizes=vocab),
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        source=str(folder),
        val_from_train=val_from_train,
        notes=tuple(notes),
        warnings=label_copies(splits["train"], files["train"]),
    )


def _narrow(a: np.ndarray) -> np.ndarray:
    """Non-negative ids in the narrowest integer type that holds them (as the column store keeps them)."""
    return a.astype(narrow_id_dtype(0, int(a.max()) if len(a) else 0))


# --- synthetic data -------------------------------------------------------------------------------


def _load_synthetic(rows: int, seed: int) -> Dataset:
    if rows < 10:
        raise ValueError(f"the synthetic dataset needs at least 10 rows, got {rows}")
    schema = KNOWN_DATASETS["synthetic"].schema
    notes = (f"synthetic: {rows} rows (80/10/10), seed {seed}",)
    if rows > synthetic.MEMORY_ROWS:  # generated chunk by chunk into a column store, read like a folder's
        splits = {name: _stored_split(st) for name, st in synthetic.stored(rows, seed).items()}
        return Dataset(schema=schema, train=splits["train"], val=splits["val"], test=splits["test"],
                       source="synthetic", notes=notes)
    cols, truth = generate(rows, seed)
    sparse = {c: _narrow(np.asarray(cols.pop(c))) for c in schema.sparse}
    dense = {c: np.asarray(cols.pop(c), dtype=np.float32) for c in schema.dense}
    labels = {c: np.asarray(cols.pop(c)).astype(np.uint8) for c in schema.labels}  # 0/1 (as a store keeps them)
    truth32 = {k: np.asarray(x, dtype=np.float32) for k, x in truth.items()}
    del cols, truth
    n_train, n_val, _ = split_sizes(rows)
    bounds = {"train": slice(0, n_train), "val": slice(n_train, n_train + n_val), "test": slice(n_train + n_val, rows)}
    splits = {
        name: Split(
            sparse_cols={c: a[s] for c, a in sparse.items()},
            dense_cols={c: a[s] for c, a in dense.items()},
            label_cols={c: a[s] for c, a in labels.items()},
            group_col=sparse["101"][s],
            truth_cols={k: x[s] for k, x in truth32.items()},
        )
        for name, s in bounds.items()
    }
    return Dataset(
        schema=schema,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        source="synthetic",
        notes=notes,
    )
