"""Raw Tianchi Ali-CCP files -> the dataset folder runtime/data.py reads, vectorised, in bounded memory.

`prepare_ali_ccp(raw, out)` reads `sample_skeleton_{train,test}.csv` and `common_features_{train,test}.csv`
(in RAW or RAW/train, RAW/test) and writes `train.parquet`, `val.parquet`, `test.parquet`, with the whole
behaviour lists (the default) their list tables `<split>.lists.parquet` (Note [List tables] in
runtime/store.py), `schema.json` (the catalog's `ali_ccp` schema with vocabulary sizes: catalog.ALI_CCP_LISTS
with the list-table column, or the single-valued one with `last_entry`), `vocab.parquet` (raw feature id ->
model id per field) and `prepare.json` (settings, row counts, ranges) into OUT. Note [Ali-CCP raw format]
describes the input and the mapping; Note [Prepare passes] how it runs.

The raw text is cut into blocks of `block_size` bytes, parsed by pyarrow's CSV parser, and every step
runs on whole chunks (pyarrow compute kernels and numpy), never line by line (runtime/prepare_read.py),
in `workers` threads, the test split beside the train one (Note [Prepare threads]). Memory is bounded
by design: workers + 1 chunks of skeleton rows per split at a time, each split's Parquet writer holds
fewer than `row_group_size` rows between chunks, and what grows with the data is the common-features
tables of the two splits (Note [Join memory] in runtime/prepare_join.py) and the per-field id counts
(one entry per distinct raw id, which the vocabulary needs anyway), never the number of skeleton rows.
Outputs are written under a temporary folder in OUT and moved into place at the end, so an
interrupted run leaves the previous files (or none), never half-written ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..catalog import (ALI_CCP_LISTS, KNOWN_DATASETS, LIST_ROW, SCHEMA_FILE, DataError, DatasetNotFound, data_roots,
                       schema_to_json)
from .host import keep_freed_memory
from .prepare_join import SKELETON_COLUMNS, CommonIds, CommonTable, Fields, IdCounts, ListRows, Vocab, build_vocab, parse_rows
from .prepare_read import Chunk, read_chunks
from .prepare_write import SplitWriter, publish, remove_stale, table_schemas

__all__ = [
    "DEFAULT_BLOCK",
    "DEFAULT_MIN_COUNT",
    "DEFAULT_ROW_GROUP",
    "DEFAULT_WORKERS",
    "DEFAULT_VAL_SHARE",
    "PREPARABLE",
    "PrepareReport",
    "default_out",
    "prepare",
    "prepare_ali_ccp",
]

# Note [Ali-CCP raw format]
# Tianchi dataset 408 (ESMM, Ma et al., SIGIR 2018). No header lines.
#   sample_skeleton_<split>.csv:  sample_id,click,purchase,common_feature_index,num_features,feature_list
#   common_features_<split>.csv:  common_feature_index,num_features,feature_list
# A feature is (field_id, feature_id, value). The write-ups disagree on the separators: torch-rechub's
# and PaddleRec's readers split features on \x01 and a feature as field\x02id\x03value, other
# descriptions swap \x01 and \x02. Each feature has exactly three parts in that order either way, so
# prepare_read.parse_entries splits on all three control characters and reads triples: both spellings parse.
# The common features (user profile and behaviour fields) are shared by every sample with the same
# common_feature_index; the skeleton holds the ad-side and cross fields.
# Mapping, as torch-rechub's examples/ranking/data/ali-ccp/preprocess_ali_ccp.py does it:
# - samples with click=0 and purchase=1 (noise: a purchase without a click) are dropped;
# - the behaviour fields 109_14, 110_14, 127_14 and 150_14 are lists (Note [Ali-CCP lists] in catalog.py):
#   by default every entry is kept, in file order, as list<int32> ids with the entries' values as
#   list<float32> weights `<f>_w` (a row without the field gets an empty list), in the split's list table:
#   one row per common-features line, then an empty row, then rows for samples with lists of their own
#   (Note [Own lists] in prepare_join.py), each sample naming its row in `list_row`; each entry counts once
#   for the vocabulary below (once per sample that joins its line), and a value that is not a finite
#   number is an error at its line. With
#   `--last-entry` (torch-rechub's mapping) they are single-valued like every other field:
# - a field listed several times in one sample (e.g. the 210 field) keeps its last entry;
#   a field present in both files takes the common-features entry (its whole list, for a list field);
# - sparse field f: raw feature ids seen at least `min_count` times in the train rows (per sample,
#   after the join) get ids 1..K_f by descending count (ties by raw id); rarer or unseen ids and a
#   missing field are 0; vocab size K_f + 1. torch-rechub counts the whole train file and keeps >= 10;
#   here the held-out val rows are not counted, so val ids unseen in train are 0 like test ones;
# - dense D<f> (f in 109_14, 110_14, 127_14, 150_14, 508, 509, 702, 853): the value of field f's entry
#   (0 when the field is missing), min-max scaled to [0, 1] with the min/max of the train rows;
#   val/test values outside that range are clipped. torch-rechub fits its MinMaxScaler on train, val
#   and test together; fitting on train only keeps test data out of the preprocessing;
# - split: train skeleton -> val when a hash of sample_id falls under `val_share` (10%: deterministic,
#   independent of file order), else train; test skeleton -> test. torch-rechub instead halves the
#   test file into val and test.

_T = TypeVar("_T")
DEFAULT_MIN_COUNT = 10
DEFAULT_VAL_SHARE = 0.1
DEFAULT_ROW_GROUP = 100_000
DEFAULT_BLOCK = 8 << 20  # bytes of raw text per chunk
DEFAULT_WORKERS = 2  # threads that parse chunks (Note [Prepare threads])
PREPARABLE = ("ali_ccp",)
_NOISE = "click=0,purchase=1"
_NO_COMMON = "common_feature_index not in the common-features file"


def default_out(name: str = "ali_ccp") -> Path:
    """Where `mtldsl train --data <name>` looks first: <first data root>/<name> ($MTLDSL_DATA or ~/.mtldsl/data)."""
    return data_roots(None)[0] / name


@dataclass(frozen=True)
class PrepareReport:
    out: Path
    rows: dict[str, int]  # rows written per split
    skipped: dict[str, int]  # rows dropped (noise) or joined without common features, by reason
    vocab_sizes: dict[str, int]
    raw_ids: dict[str, int]  # distinct raw feature ids per sparse field in the train rows
    dense_range: dict[str, tuple[float, float]]  # train min/max of each dense column before scaling
    min_count: int
    val_share: float
    row_group_size: int
    max_rows_buffered: int  # the most rows any writer held between chunks (< row_group_size)
    block_size: int  # bytes of raw text per chunk
    max_chunk_rows: int  # the most raw lines held at once (one chunk)
    common_lines: dict[str, int]  # common-feature lines held for the join, per split
    files: dict[str, str] = field(default_factory=dict)  # written file name -> path


# --- parsing --------------------------------------------------------------------------------------


# --- rows -----------------------------------------------------------------------------------------


def _is_val(sample_id: str, share: float) -> bool:
    """Deterministic split by sample id: a stable 64-bit hash, independent of file order and machine."""
    h = int.from_bytes(hashlib.blake2b(sample_id.encode("utf-8"), digest_size=8).digest(), "big")
    return h < share * 2**64


def _val_mask(sample_ids: pa.Array, keep: np.ndarray, share: float) -> np.ndarray:
    """_is_val of every kept row, one blake2b call per row (Note [Prepare passes]: once per train row)."""
    out = np.zeros(len(keep), dtype=bool)
    if share <= 0 or not keep.any():
        return out
    threshold = math.ceil(share * 2**64)  # h < x <=> h < ceil(x) for an integer h: the same test as _is_val
    blake = hashlib.blake2b
    ids = pc.cast(sample_ids.filter(pa.array(keep)), pa.binary()).to_pylist()
    digests = np.frombuffer(b"".join([blake(s, digest_size=8).digest() for s in ids]), dtype=">u8")
    out[keep] = digests.astype(np.uint64) < np.uint64(threshold)
    return out


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Min-max scaling of a dense column to [0, 1] by its train range, as float32 (a constant column is 0)."""
    span = float(high - low)
    if not span > 0:  # a constant column carries no information: 0 everywhere
        return np.zeros(values.shape, dtype=np.float32)
    return np.clip((values.astype(np.float64) - low) / span, 0.0, 1.0).astype(np.float32)


def _find_raw(raw: Path) -> dict[str, Path]:
    """The four raw files, in RAW or in RAW/train and RAW/test."""
    if not raw.is_dir():
        raise DatasetNotFound(f"{raw}: no such folder (expected the unpacked Tianchi Ali-CCP files)")
    found: dict[str, Path] = {}
    missing: list[str] = []
    for split in ("train", "test"):
        for kind in ("sample_skeleton", "common_features"):
            name = f"{kind}_{split}.csv"
            hit = next((p for p in (raw / name, raw / split / name) if p.is_file()), None)
            if hit is None:
                missing.append(name)
            else:
                found[f"{kind}_{split}"] = hit
    if missing:
        info = KNOWN_DATASETS["ali_ccp"]
        raise DatasetNotFound(f"{raw}: missing {', '.join(missing)} (looked in {raw} and {raw}/train, {raw}/test); "
                              f"get the raw files from {info.source}")
    return found


# Note [Prepare passes]
# prepare reads the common-features file of each split into memory (Note [Join memory]), then makes two
# passes over the train skeleton and one over the test skeleton (beside the train's second: Note
# [Prepare threads]), each one chunk at a time:
#   1. count: parse and join the train rows, count raw ids of the train rows (val held out) and take
#      the dense min/max; the val flag of every row (one blake2b per row, the only per-row Python) is
#      written to a temporary file, one byte per row, so pass 2 reads it back instead of hashing again;
#   2. write: parse and join again, map ids through the vocabulary, scale, write train/val/test.
# Parsing twice was chosen over one pass into a temporary raw-id file: that file would be about the
# size of the raw skeleton (tens of GB for the real data) and writing and reading it back costs about
# what the second parse does. Ids of a common line count once per train row joined to it: pass 1 counts
# rows per common line (`hits`) and adds them up per raw id at the end, so the common fields never
# pass through a hash table per chunk; a skeleton field counts only where the common line lacks it.


class _Bars:
    """Progress bars (tqdm on stderr, one at a time) over bytes read, with rows/s; and one-line notes."""

    def __init__(self, progress: bool, log: Callable[[str], None] | None, position: int = 0) -> None:
        self.progress, self.log, self.position = progress, log, position  # position: the terminal line of the bar
        self.bars: list[Any] = []

    def close(self) -> None:
        for b in self.bars:
            b.close()
        self.bars.clear()

    def say(self, message: str) -> None:
        self.close()  # a pass has ended: its bar goes before the note is printed
        if self.log is not None:
            self.log(message)

    def bar(self, path: Path, what: str) -> Callable[[int, int], None] | None:
        """A bar over `path`'s bytes; the returned callable takes (bytes read, rows read) so far."""
        if not self.progress:
            return None
        from tqdm import tqdm

        self.close()
        # disable=None: no bar when stderr is not a terminal (CI logs, pipes)
        b = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=what, leave=False, dynamic_ncols=True,
                 disable=None, position=self.position)
        self.bars.append(b)

        def update(done: int, rows: int) -> None:
            b.update(max(0, min(done, b.total) - b.n))
            elapsed = b.format_dict.get("elapsed") or 0.0
            b.set_postfix_str(f"{rows:,} rows, {rows / elapsed if elapsed > 0 else 0:,.0f} rows/s")

        return update


class _Stopped(Exception):
    """The other half of a prepare failed: this one stops at its next block (Note [Prepare threads])."""


def _stoppable(progress: Callable[[int, int], None] | None, stop: threading.Event) -> Callable[[int, int], None]:
    """`progress`, raising _Stopped once `stop` is set: read_chunks and CommonTable.read call it after every block."""

    def update(done: int, rows: int) -> None:
        if stop.is_set():
            raise _Stopped
        if progress is not None:
            progress(done, rows)

    return update


@dataclass
class _TrainCounts:
    """Pass 1 over the train rows (val held out): raw id counts per sparse field, dense ranges, rows."""

    counts: dict[str, pa.Table]  # raw_id, count
    lo: np.ndarray
    hi: np.ndarray
    n_train: int
    max_chunk_rows: int


# Note [Prepare threads]
# The calling thread reads the chunks of a file in order; parsing, joining, counting and mapping a chunk
# (pyarrow and numpy kernels, which release the GIL) run in `workers` threads, at most workers + 1
# chunks in flight, and the results are taken in file order. So the counts, the row order, the written
# bytes and the error reported (the first bad line in file order, also when reading a later block
# fails) do not depend on the number of workers; memory grows by one chunk per worker.
# The test split runs beside the train split, in a second thread with workers of its own: its common
# features are read while the train ones are read and counted, and its rows are mapped and written
# while the train rows are. Each split has its own Parquet writer, which encodes on the thread that
# feeds it (~4 us a row, three quarters of it the list columns); one writer could not keep two cores
# busy. The two sides share the `workers` (half each, at least one: with the default 2, each side is
# one thread that reads, maps and writes, which beat two workers a side by 11-16 % on 6M + 6M rows).
# The test common table is taken only after pass 1 and the test pass's result only after the train
# pass, so the error reported is still the first in today's order; when the train side fails, the
# test side stops at its next block (`_stoppable`). Memory holds both common tables. With `--workers 1`
# everything runs in the calling thread (`_Serial`): the test side's steps run where they would start,
# and their errors are kept until the threaded side's would be taken, so the order reported is the same.


class _Serial:
    """The test side's executor with one worker: each job runs in the calling thread when submitted, and its
    error waits in its Future until the result is taken (Note [Prepare threads])."""

    def submit(self, fn: Callable[..., _T], *args: Any) -> Future[_T]:
        done: Future[_T] = Future()
        try:
            done.set_result(fn(*args))
        except Exception as e:  # raised by .result(), where the threaded side's would be
            done.set_exception(e)
        return done

    def shutdown(self, wait: bool = True) -> None:
        pass


def _in_order(jobs: Iterator[Callable[[], _T]], workers: int) -> Iterator[_T]:
    """Each job's result, in order; `workers` threads run them (Note [Prepare threads])."""
    if workers <= 1:
        for job in jobs:
            yield job()
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="prepare") as pool:
        pending: deque[Future[_T]] = deque()
        try:
            try:
                for job in jobs:
                    pending.append(pool.submit(job))
                    if len(pending) > workers:
                        yield pending.popleft().result()
            except Exception:  # reading failed: the chunks before it (and their errors) come first
                while pending:
                    yield pending.popleft().result()
                raise
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


@dataclass
class _ChunkCounts:
    """Pass 1 of one chunk: its rows' val flags and what its train rows add to the counts."""

    val: np.ndarray  # uint8 per row
    n_train: int
    hits: np.ndarray | None  # train rows per common line
    ids: list[pa.Array | None]  # per sparse field: value counts of the raw ids of train rows whose common line lacks it
    lo: np.ndarray | None
    hi: np.ndarray | None


def _count_chunk(chunk: Chunk, common: CommonTable, fields: Fields, val_share: float) -> _ChunkCounts:
    rows = parse_rows(chunk, common, fields)
    val = _val_mask(chunk.columns[0], rows.keep, val_share)
    train = rows.keep & ~val
    if not train.any():
        return _ChunkCounts(val.astype(np.uint8), 0, None, [None] * (len(fields.sparse) + len(fields.lists)), None, None)
    joined = rows.lines[train]
    hits = np.bincount(joined[joined >= 0], minlength=common.n_lines)
    ids: list[pa.Array | None] = []
    for j in fields.sparse:
        e = rows.entries.last[:, j]
        own = train & (e >= 0) & ~common.has(j, rows.lines)
        ids.append(pc.value_counts(rows.entries.ids(e[own])) if own.any() else None)
    for j in fields.lists:  # every entry counts (Note [Ali-CCP raw format])
        assert rows.entries.row is not None
        own_list = rows.own_lists[j].entry
        entry = own_list[train[rows.entries.row[own_list]]]
        ids.append(pc.value_counts(rows.entries.ids(entry)) if len(entry) else None)
    dense = rows.dense[:, train]
    return _ChunkCounts(val.astype(np.uint8), int(train.sum()), hits, ids, dense.min(axis=1), dense.max(axis=1))


def _count_train(skeleton: Path, common: CommonTable, fields: Fields, sparse: Sequence[str], val_share: float,
                 block_size: int, workers: int, val_out: BinaryIO,
                 progress: Callable[[int, int], None] | None) -> _TrainCounts:
    """Pass 1 (Note [Prepare passes]): count ids and dense ranges of the train rows, write each row's val flag.
    `sparse`: the id fields counted, the sparse ones then the list ones (fields.sparse, fields.lists)."""
    counts = [IdCounts() for _ in sparse]
    hits = np.zeros(common.n_lines, dtype=np.int64)  # train rows joined to each common line
    lo = np.full(len(fields.dense), np.inf)
    hi = np.full(len(fields.dense), -np.inf)
    n_train = max_rows = 0
    jobs = (partial(_count_chunk, chunk, common, fields, val_share)
            for chunk in read_chunks(skeleton, SKELETON_COLUMNS, block_size, progress))
    for part in _in_order(jobs, workers):
        max_rows = max(max_rows, len(part.val))
        val_out.write(part.val.tobytes())
        if part.hits is None or part.lo is None or part.hi is None:
            continue
        n_train += part.n_train
        hits += part.hits
        for c, ids in zip(counts, part.ids):
            if ids is not None:
                c.add(ids.field("values"), ids.field("counts"))
        lo, hi = np.minimum(lo, part.lo), np.maximum(hi, part.hi)
    if n_train == 0:
        raise DataError(f"{skeleton}: no training rows (empty file, or every sample fell into val or was dropped)")
    for s, j in enumerate(fields.sparse):
        codes = common.codes.get(j)
        if codes is not None:  # every train row joined to a line counts that line's id
            present = codes >= 0
            per_id = np.bincount(codes[present], weights=hits[present], minlength=len(common.dictionary[j]))
            seen = np.flatnonzero(per_id)
            if len(seen):
                counts[s].add(common.dictionary[j].take(pa.array(seen)), pa.array(per_id[seen].astype(np.int64)))
    for s, j in enumerate(fields.lists, len(fields.sparse)):  # each entry of a line, once per train row joined to it
        cl = common.lists[j]
        per_id = np.bincount(cl.codes, weights=np.repeat(hits, np.diff(cl.offsets)), minlength=len(cl.dictionary))
        seen = np.flatnonzero(per_id)
        if len(seen):
            counts[s].add(cl.dictionary.take(pa.array(seen)), pa.array(per_id[seen].astype(np.int64)))
    return _TrainCounts({f: c.merge() for f, c in zip(sparse, counts)}, lo, hi, n_train, max_rows)


@dataclass
class _Mapped:
    """Pass 2 of one chunk: output rows per split, and the rows skipped by reason (in the order met)."""

    n_rows: int
    tables: dict[str, tuple[pa.Table, pa.Table | None]]  # per split: its rows, and their own lists (Note [Own lists])
    skipped: list[tuple[str, int]]


def _map_chunk(chunk: Chunk, val: np.ndarray | None, split: str, common: CommonTable, common_ids: Mapping[int, np.ndarray],
               list_ids: Mapping[int, CommonIds], fields: Fields, vocab: Sequence[Vocab], train: _TrainCounts,
               schema: pa.Schema, list_schema: pa.Schema | None) -> _Mapped:
    """Map ids through the vocabulary and scale dense values: the chunk's rows for train/val (or test), each row's
    list-table row, and the lists of the rows that need a list-table row of their own (Note [Own lists])."""
    n = len(chunk)
    rows = parse_rows(chunk, common, fields)
    skipped = []
    for reason, mask in sorted(((_NOISE, rows.noise), (_NO_COMMON, rows.keep & (rows.lines < 0))),
                               key=lambda rm: int(np.argmax(rm[1])) if rm[1].any() else n):
        if mask.any():  # reasons enter `skipped` in the order the per-line reader met them
            skipped.append((reason, int(mask.sum())))
    ids = np.zeros((len(fields.sparse), n), dtype=np.int32)
    for s, j in enumerate(fields.sparse):
        from_common = common.has(j, rows.lines)
        if from_common.any():
            ids[s, from_common] = common_ids[j][rows.lines[from_common]]
        e = rows.entries.last[:, j]
        own = (e >= 0) & rows.keep & ~from_common
        if own.any():
            ids[s, own] = vocab[s].lookup(rows.entries.ids(e[own]))
    dense = [_scale(rows.dense[d], float(train.lo[d]), float(train.hi[d])) for d in range(len(fields.dense))]
    list_row = np.where(rows.lines >= 0, rows.lines, common.n_lines).astype(np.int32)  # n_lines: the empty row
    own = np.zeros(n, dtype=bool)
    for j in fields.lists:
        own |= rows.own_lists[j].counts > 0
    own_lists = [ListRows.of(rows, j, common, list_ids[j], vocab[s])  # once for both targets (Note [Own lists])
                 for s, j in enumerate(fields.lists, len(fields.sparse))] if own.any() else []
    targets = {split: rows.keep} if val is None else {"train": rows.keep & (val == 0), "val": rows.keep & (val != 0)}
    tables = {}
    for target, mask in targets.items():
        sel = np.flatnonzero(mask)
        if len(sel):
            columns = [pa.array(c) for c in (rows.click[sel], rows.purchase[sel], *(i[sel] for i in ids))]
            mine, lists = own[sel], None
            if mine.any():  # placeholders -1 - k, made rows of the list table when it is written (Note [Own lists])
                lists = pa.Table.from_arrays([a for rows_of in own_lists for a in rows_of.take(sel[mine])],
                                             schema=list_schema)
            if fields.lists:
                columns.append(pa.array(np.where(mine, -np.cumsum(mine), list_row[sel]).astype(np.int32)))
            columns += [pa.array(d[sel]) for d in dense]
            tables[target] = (pa.Table.from_arrays(columns, schema=schema), lists)
    return _Mapped(n, tables, skipped)


def _write_skeleton(skeleton: Path, split: str, common: CommonTable, fields: Fields, vocab: Sequence[Vocab],
                    train: _TrainCounts, writers: Mapping[str, SplitWriter], val_in: BinaryIO | None,
                    skipped: Counter[str], block_size: int, workers: int,
                    progress: Callable[[int, int], None] | None) -> int:
    """Pass 2 over one skeleton file: map ids, scale dense values, append rows to the split writers."""
    common_ids = {}  # wanted field position -> model id of each common line's entry (0 when absent)
    list_ids = {}  # list field position -> model ids of every common entry
    for s, j in enumerate(fields.sparse):
        if j in common.codes:
            per_id = np.concatenate([vocab[s].lookup(common.dictionary[j]), np.zeros(1, dtype=np.int32)])
            common_ids[j] = per_id[common.codes[j]]  # code -1 takes the trailing 0
    for s, j in enumerate(fields.lists, len(fields.sparse)):  # list fields: model id of every common entry
        cl = common.lists[j]
        list_ids[j] = CommonIds(cl, vocab[s].lookup(cl.dictionary)[cl.codes] if len(cl.codes)
                                else np.zeros(0, dtype=np.int32))
    schema = writers["test"].schema
    for target in ("test",) if split == "test" else ("train", "val"):
        if writers[target].lists is not None:
            writers[target].start_lists([list_ids[j] for j in fields.lists], common.n_lines)
    list_schema = None if writers["test"].lists is None else writers["test"].lists.schema

    def jobs() -> Iterator[Callable[[], _Mapped]]:
        for chunk in read_chunks(skeleton, SKELETON_COLUMNS, block_size, progress):
            val = None if val_in is None else np.frombuffer(val_in.read(len(chunk)), dtype=np.uint8)
            yield partial(_map_chunk, chunk, val, split, common, common_ids, list_ids, fields, vocab, train, schema,
                          list_schema)

    max_rows = 0
    for part in _in_order(jobs(), workers):
        max_rows = max(max_rows, part.n_rows)
        for reason, k in part.skipped:
            skipped[reason] += k
        for target, (table, lists) in part.tables.items():
            writers[target].append(table if lists is None else writers[target].add_lists(lists, table))
    return max_rows


def _write_vocab(path: Path, sparse: Sequence[str], vocab: Sequence[Vocab]) -> None:
    """vocab.parquet: field, raw_id, id, count of every kept raw id."""
    sizes = [len(v.raw_ids) for v in vocab]
    vocab_table = pa.table({
        "field": pa.array([f for f, k in zip(sparse, sizes) for _ in range(k)], pa.string()),
        "raw_id": pa.concat_arrays([v.raw_ids.cast(pa.string()) for v in vocab]),
        "id": pa.array(np.concatenate([np.arange(1, k + 1) for k in sizes] or [np.zeros(0)]).astype(np.int32)),
        "count": pa.concat_arrays([v.counts.cast(pa.int64()) for v in vocab]),
    })
    pq.write_table(vocab_table, str(path))


def _read_common(path: Path, fields: Fields, block_size: int, bars: _Bars, stop: threading.Event) -> CommonTable:
    return CommonTable.read(path, fields.array(), fields.dense, block_size,
                            _stoppable(bars.bar(path, f"index {path.name}"), stop), fields.lists)


def _say_skipped(bars: _Bars, skipped: Counter[str]) -> None:
    if skipped[_NOISE]:
        bars.say(f"dropped {skipped[_NOISE]} rows with click=0, purchase=1")
    if skipped[_NO_COMMON]:
        bars.say(f"{skipped[_NO_COMMON]} rows have a common_feature_index missing from the common-features file: "
                 "their user fields are 0")


def _indexed(common: CommonTable) -> str:
    return f"indexed {common.n_lines} common-feature lines of {common.path.name}"


def _write_side_files(work: Path, files: Mapping[str, Path], schema: Any, vocab: Sequence[Vocab], train: _TrainCounts,
                      rows: Mapping[str, int], skipped: Counter[str], min_count: int,
                      val_share: float) -> dict[str, tuple[float, float]]:
    """schema.json, vocab.parquet and prepare.json into `work`; returns the dense ranges."""
    sparse = (*schema.sparse, *schema.lists)
    vocab_sizes = {f: len(v.raw_ids) + 1 for f, v in zip(sparse, vocab)}
    raw_ids = {f: v.n_raw for f, v in zip(sparse, vocab)}
    final_schema = replace(schema, vocab_sizes=vocab_sizes)
    (work / SCHEMA_FILE).write_text(schema_to_json(final_schema, with_vocab=True), encoding="utf-8")
    _write_vocab(work / "vocab.parquet", sparse, vocab)
    dense_range = {d: (float(train.lo[j]), float(train.hi[j])) for j, d in enumerate(schema.dense)}
    manifest = {
        "dataset": "ali_ccp",
        "raw": {k: {"path": str(p), "bytes": p.stat().st_size} for k, p in files.items()},
        "min_count": min_count,
        "val_share": val_share,
        "split": "train skeleton -> val when blake2b-64(sample_id) < val_share * 2^64; test skeleton -> test",
        "rows": rows,
        "skipped": dict(skipped),
        "vocab_sizes": vocab_sizes,
        "raw_ids": raw_ids,
        "dense_range": {k: list(v) for k, v in dense_range.items()},
    }
    if schema.lists:  # (absent with --last-entry: that prepare.json is the one written before lists existed)
        manifest["lists"] = {"fields": list(schema.lists), "weights": dict(schema.list_weights),
                             "mapping": "every entry of the list; its value is its weight",
                             "tables": f"<split>.lists.parquet, row {LIST_ROW}: the common-features lines, "
                                       "an empty row, then samples with lists of their own"}
    (work / "prepare.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return dense_range


def _work_folder(out: Path) -> Path:
    """A fresh temporary folder in OUT (created) for this prepare's files, once killed prepares' are removed."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    return Path(tempfile.mkdtemp(prefix=f".prepare-{os.getpid()}-", dir=out))


def prepare_ali_ccp(
    raw: str | Path,
    out: str | Path | None = None,
    *,
    min_count: int = DEFAULT_MIN_COUNT,
    val_share: float = DEFAULT_VAL_SHARE,
    row_group_size: int = DEFAULT_ROW_GROUP,
    block_size: int = DEFAULT_BLOCK,
    workers: int = DEFAULT_WORKERS,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    last_entry: bool = False,
) -> PrepareReport:
    """Convert the raw Ali-CCP files in `raw` into a dataset folder `out` (default: default_out()).

    See Note [Ali-CCP raw format] for the mapping and Note [Prepare passes] for how it runs. `min_count`:
    raw ids seen fewer times in train map to 0; `val_share`: share of the train skeleton held out as val;
    `row_group_size`: rows per Parquet row group; `block_size`: bytes of raw text per chunk (with the
    common-features tables, what bounds memory); `workers`: threads parsing chunks (the second pass gives half
    to each split); `progress`: progress bars with rows/s (tqdm) on stderr; `log`: receives one-line notes;
    `last_entry`: keep only the last entry of each behaviour list, single-valued (torch-rechub's mapping),
    instead of the whole weighted lists (Note [Ali-CCP lists] in catalog.py).
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if not 0.0 <= val_share < 1.0:
        raise ValueError(f"val_share must lie in [0, 1), got {val_share}")
    if row_group_size < 1 or block_size < 1 or workers < 1:
        raise ValueError(f"row_group_size, block_size and workers must be positive, got {row_group_size}, "
                         f"{block_size}, {workers}")
    keep_freed_memory()  # Note [Page faults]; 6M + 6M rows, two alternating pairs: 9-22 % less wall, same peak RSS
    raw = Path(raw).expanduser()
    out = Path(out).expanduser() if out is not None else default_out()
    files = _find_raw(raw)
    bars = _Bars(progress, log)

    schema = KNOWN_DATASETS["ali_ccp"].schema if last_entry else replace(ALI_CCP_LISTS, list_rows=LIST_ROW)
    sparse = (*schema.sparse, *schema.lists)  # every id field: the vocabulary's
    fields = Fields.of(schema.sparse, schema.dense, schema.lists)

    work = _work_folder(out)
    writers: dict[str, SplitWriter] = {}
    stop = threading.Event()  # set when the train side fails: the test side stops (Note [Prepare threads])
    side_bars = _Bars(progress, None, position=1)
    side = ThreadPoolExecutor(1, thread_name_prefix="prepare-test") if workers > 1 else _Serial()
    try:
        test_common = side.submit(_read_common, files["common_features_test"], fields, block_size, side_bars, stop)
        # pass 1: id counts and dense ranges over the train rows
        common = _read_common(files["common_features_train"], fields, block_size, bars, stop)
        bars.say(_indexed(common))
        skeleton = files["sample_skeleton_train"]
        with open(work / "val.flags", "wb") as val_out:
            train = _count_train(skeleton, common, fields, sparse, val_share, block_size, workers, val_out,
                                 bars.bar(skeleton, f"count {skeleton.name}"))
        vocab = [build_vocab(train.counts[f], min_count) for f in sparse]
        vocab_sizes = {f: len(v.raw_ids) + 1 for f, v in zip(sparse, vocab)}
        raw_ids = {f: v.n_raw for f, v in zip(sparse, vocab)}
        bars.say(f"counted {train.n_train} train rows: {sum(raw_ids.values())} distinct raw ids, "
                 f"{sum(vocab_sizes.values()) - len(sparse)} seen at least {min_count} times")
        common_test = test_common.result()
        bars.say(_indexed(common_test))
        common_lines = {"train": common.n_lines, "test": common_test.n_lines}

        # pass 2: map and write, the test split beside the train one
        table_schema, list_schema = table_schemas(schema)
        writers.update({s: SplitWriter(work / f"{s}.parquet", table_schema, row_group_size, list_schema)
                        for s in ("train", "val", "test")})
        skipped, skipped_test = Counter[str](), Counter[str]()  # by reason, in the order met
        test_skeleton = files["sample_skeleton_test"]
        per_side = max(1, workers // 2)  # the two sides share the workers (Note [Prepare threads])
        test_rows = side.submit(_write_skeleton, test_skeleton, "test", common_test, fields, vocab, train, writers,
                                None, skipped_test, block_size, per_side,
                                _stoppable(side_bars.bar(test_skeleton, f"write {test_skeleton.name}"), stop))
        del common_test
        with open(work / "val.flags", "rb") as val_in:
            max_rows = max(train.max_chunk_rows,
                           _write_skeleton(skeleton, "train", common, fields, vocab, train, writers, val_in, skipped,
                                           block_size, per_side, bars.bar(skeleton, f"write {skeleton.name}")))
        del common
        max_rows = max(max_rows, test_rows.result())
        skipped.update(skipped_test)  # train's reasons first
        for w in writers.values():
            w.close()
        for s, w in writers.items():
            if w.written == 0:
                raise DataError(f"no {s} rows were written (check the raw files and --val-share)")
        rows = {s: w.written for s, w in writers.items()}
        _say_skipped(bars, skipped)

        dense_range = _write_side_files(work, files, schema, vocab, train, rows, skipped, min_count, val_share)
        report = PrepareReport(
            out=out,
            rows=rows,
            skipped=dict(skipped),
            vocab_sizes=vocab_sizes,
            raw_ids=raw_ids,
            dense_range=dense_range,
            min_count=min_count,
            val_share=val_share,
            row_group_size=row_group_size,
            max_rows_buffered=max(w.max_held for w in writers.values()),
            block_size=block_size,
            max_chunk_rows=max_rows,
            common_lines=common_lines,
        )
        # publish: data files first, schema.json last (a reader that sees the schema sees the data)
        written = publish(work, out, [*(p.name for w in writers.values() for p in w.paths), "vocab.parquet",
                                       "prepare.json", SCHEMA_FILE])
        return replace(report, files=written)
    except BaseException:
        stop.set()
        raise
    finally:
        side.shutdown(wait=True)  # the test side has stopped (or finished) before its files are removed
        side_bars.close()
        bars.close()
        for w in writers.values():
            w.abandon()
        shutil.rmtree(work, ignore_errors=True)


def prepare(name: str, raw: str | Path, out: str | Path | None = None, *, min_count: int = DEFAULT_MIN_COUNT,
            val_share: float = DEFAULT_VAL_SHARE, row_group_size: int = DEFAULT_ROW_GROUP,
            block_size: int = DEFAULT_BLOCK, workers: int = DEFAULT_WORKERS, progress: bool = False,
            log: Callable[[str], None] | None = None, last_entry: bool = False) -> PrepareReport:
    """`mtldsl data prepare NAME`: dispatch on the dataset name (only ali_ccp has a raw format to convert)."""
    key = name.strip().lower().replace("-", "_")
    if key == "ali_ccp":
        return prepare_ali_ccp(raw, out if out is not None else default_out(key), min_count=min_count,
                               val_share=val_share, row_group_size=row_group_size, block_size=block_size, workers=workers,
                               progress=progress, log=log, last_entry=last_entry)
    known = ", ".join(PREPARABLE)
    if key in KNOWN_DATASETS:
        raise DataError(f"dataset '{key}' has no raw-file converter (only {known}); put its train/val/test "
                        f"CSV or Parquet files in a folder and pass the folder to --data")
    raise DataError(f"unknown dataset '{name}' (preparable: {known})")
