"""The Ali-CCP join and vocabulary, vectorised: common features held per field, counts merged per chunk.

`CommonTable.read(path, fields, dense, block_size)` takes one common-features file and gives, per
common line, the dictionary code of each wanted field's last entry and the value of each dense field:
the join side, held in memory (Note [Join memory]). `CommonTable.lookup` maps a chunk's
common_feature_index column to common lines. `IdCounts` merges per-chunk value counts of raw ids into
one table per field; `build_vocab` turns counts into the vocabulary (Note [Ali-CCP raw format] in
runtime/prepare.py), and `Vocab.lookup` maps raw ids to model ids. `parse_rows` takes a skeleton chunk
and gives its `Rows`: labels, noise, feature entries, the join and the dense values, or raises
DataError for its first bad line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..catalog import DataError
from .prepare_read import Chunk, Entries, parse_entries, read_chunks, string_bytes, to_float

__all__ = ["SKELETON_COLUMNS", "CommonIds", "CommonList", "CommonTable", "Fields", "IdCounts", "ListRows", "OwnList", "Rows",
           "StringIndex", "Vocab", "build_vocab", "list_values", "malformed_message", "parse_rows", "positions", "ragged"]

SKELETON_COLUMNS = ("sample_id", "click", "purchase", "common_feature_index", "num_features", "feature_list")

# Note [Join memory]
# The common-features file of each split is held in memory (both at once: Note [Prepare threads] in
# runtime/prepare.py), and only for the wanted fields: per line an int32 dictionary code for each field
# that occurs in the file (the distinct raw ids once, in a dictionary per field), a float64 for each
# dense field that occurs, and the line's key.
# The real files have ~730k lines with 9 profile and 4 behaviour fields: 13 * 4 B + 4 * 8 B + ~20 B of
# key per line, about 75 MB, plus ~10 MB of distinct ids. The skeleton is never held beyond one chunk.
# A chunk is joined without building a hash table of the common keys (which would cost one insert per
# common line per chunk): the chunk's keys are dictionary-encoded, and the common keys are probed into
# that small dictionary, which costs one probe per common line per chunk.


def malformed_message(where: str, parts: int) -> str:
    return (f"{where}: malformed feature list: expected field, feature id, value triples "
            f"separated by \\x01/\\x02/\\x03, got {parts} parts")


def positions(values: pa.Array, keys: pa.Array) -> np.ndarray:
    """For each of `values`, the index of the equal entry of `keys` (distinct strings), -1 when none.

    Hashes the distinct `values` and probes every key (Note [Join memory]): no hash table of `keys` is built.
    """
    encoded = pc.dictionary_encode(values)
    where = pc.index_in(keys, value_set=encoded.dictionary)  # per key: its position among the distinct values
    valid = where.is_valid()
    at = np.full(len(encoded.dictionary), -1, dtype=np.int64)
    at[where.filter(valid).to_numpy(zero_copy_only=False).astype(np.int64)] = \
        np.flatnonzero(valid.to_numpy(zero_copy_only=False))
    return at[encoded.indices.to_numpy(zero_copy_only=False)]


# Note [String index]
# The join and the vocabulary map a chunk's strings to positions among fixed distinct keys (730k common
# keys a split at Ali-CCP's real size, up to ~300k raw ids a field). pyarrow keeps no hash table from
# one call to the next, so `positions` hashes a chunk's distinct values and probes every key into them:
# one probe per key per chunk, 21-32 ms for a 47k-row chunk against 730k keys, ~3,600 joins in a
# full-size prepare. `StringIndex` hashes the keys once instead: each string's bytes, zero-padded to the
# longest key's width rounded up to 8 bytes, are read as 64-bit words into a multiply-xor hash seeded
# with the length; the keys sit in an open-addressing table (linear probing, at most half full, each
# slot's hash beside it) built once (~2 s for 730k keys); a chunk's values are hashed the same way and
# probed in vectorised rounds, and each hit is checked word for word, so the answer is exact (~14 ms for
# that chunk; 7-8 ms against 11-13 for a 300k-id vocabulary). Keys wider than MAX_KEY_BYTES, null
# values, or two keys of equal hash (~1e-8 at 730k keys) take `positions` instead: same result, old cost.

MAX_KEY_BYTES = 64  # wider keys are looked up by `positions` (Note [String index])
_MIX = np.uint64(0x9E3779B97F4A7C15)
_PRIME = np.uint64(0x100000001B3)


def ragged(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """starts[i], starts[i] + 1, ..., starts[i] + lengths[i] - 1 for every i, concatenated."""
    ends = np.cumsum(lengths)
    return np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(starts - (ends - lengths), lengths)


def _words(a: pa.Array, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each string's bytes zero-padded to `width` (a multiple of 8) as (n, width // 8) uint64 words, and the
    byte lengths; a string longer than `width` gets its first `width` bytes (the caller drops it by length)."""
    n = len(a)
    off, text = string_bytes(a)
    lengths = np.diff(off)
    short = np.minimum(lengths, width)
    if n and (lengths == width).all():
        mat = text.reshape(n, width)  # every string fills the width: no copy
    elif n and (lengths == lengths[0]).all():  # one length (fixed-width keys): one strided copy
        mat = np.zeros((n, width), dtype=np.uint8)
        mat[:, :short[0]] = text.reshape(n, -1)[:, :width]
    else:  # each byte to row r, column (its offset in the string), dropping what lies past the width
        mat = np.zeros(n * width, dtype=np.uint8)
        mat[ragged(np.arange(n) * width, short)] = text[ragged(off[:-1], short)]
        mat = mat.reshape(n, width)
    return np.ascontiguousarray(mat).view(np.uint64), lengths


def _hash(words: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row of words and its length (multiply-xor, then a murmur-style finaliser)."""
    h = lengths.astype(np.uint64) * _MIX
    for j in range(words.shape[1]):
        h ^= words[:, j]
        h *= _PRIME
    h ^= h >> np.uint64(31)
    h *= _MIX
    h ^= h >> np.uint64(29)
    return h


class StringIndex:
    """Position of each value among fixed distinct `keys`, -1 when absent: `positions(values, keys)`, with the
    keys hashed once (Note [String index])."""

    def __init__(self, keys: pa.Array) -> None:
        self.keys = keys
        self.table: np.ndarray | None = None
        lengths = pc.binary_length(keys).to_numpy(zero_copy_only=False) if len(keys) else np.zeros(0, dtype=np.int64)
        if not len(keys) or keys.null_count or int(lengths.max()) > MAX_KEY_BYTES:
            return
        self.width = max(8, -(-int(lengths.max()) // 8) * 8)
        self.words, self.lengths = _words(keys, self.width)
        hashes = _hash(self.words, self.lengths)
        if len(np.unique(hashes)) < len(keys):
            return  # two keys of equal hash: `positions` it is
        size = 1 << max(10, (2 * len(keys) - 1).bit_length())
        self.mask = np.uint64(size - 1)
        table = np.full(size, -1, dtype=np.int32)  # key positions (a split has far fewer than 2^31 keys)
        slot = (hashes & self.mask).astype(np.int64)
        pending = np.arange(len(keys))
        while len(pending):  # vectorised linear probing: per free slot the first key wanting it takes it
            want = slot[pending]
            free = table[want] < 0
            taken, first = np.unique(want[free], return_index=True)
            table[taken] = pending[free][first]
            placed = np.zeros(len(pending), dtype=bool)
            placed[np.flatnonzero(free)[first]] = True
            pending = pending[~placed]
            slot[pending] = (slot[pending] + 1) & int(self.mask)
        self.table = table
        self.slot_hash = np.zeros(size, dtype=np.uint64)  # each slot's key's hash, beside it: no dependent gather
        used = table >= 0
        self.slot_hash[used] = hashes[table[used]]

    def __call__(self, values: pa.Array) -> np.ndarray:
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        if self.table is None or values.null_count:
            return positions(values, self.keys)
        words, lengths = _words(values, self.width)
        out = np.full(len(values), -1, dtype=np.int64)
        active = np.flatnonzero(lengths <= self.width)  # a longer value is no key
        h = _hash(words[active], lengths[active])
        slot = (h & self.mask).astype(np.int64)
        while len(active):
            key = self.table[slot]
            occupied = key >= 0
            same = occupied & (self.slot_hash[slot] == h)  # keys' hashes are distinct: one candidate
            hit = np.flatnonzero(same)
            exact = (self.lengths[key[hit]] == lengths[active[hit]]) & (self.words[key[hit]] == words[active[hit]]).all(axis=1)
            out[active[hit[exact]]] = key[hit[exact]]
            go_on = occupied & ~same  # another key's slot: probe the next one
            active, h, slot = active[go_on], h[go_on], (slot[go_on] + 1) & int(self.mask)
        return out


@dataclass
class CommonList:
    """Every entry of one list field in a common-features file, by line (CSR): dictionary codes and values."""

    offsets: np.ndarray  # int64 (n_lines + 1,)
    codes: np.ndarray  # int32 per entry, into `dictionary`
    values: np.ndarray  # float32 per entry (the weights)
    dictionary: pa.Array  # the distinct raw ids

    def lengths(self, lines: np.ndarray) -> np.ndarray:
        """Entries of each joined line (0 for rows without a line)."""
        if len(self.offsets) == 1:  # an empty file
            return np.zeros(len(lines), dtype=np.int64)
        at = np.maximum(lines, 0)
        return np.where(lines >= 0, self.offsets[at + 1] - self.offsets[at], 0)


def list_values(chunk: Chunk, entries: Entries, entry: np.ndarray, name: str) -> np.ndarray:
    """The values of a list field's entries as float32 weights; the first that is not a finite number is a DataError."""
    text = entries.values(entry)
    values = to_float(text)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        i = int(bad[0])
        assert entries.row is not None
        raise DataError(f"{chunk.where(int(entries.row[entry[i]]))}: field {name}: expected a finite number as the "
                        f"feature value, got {text[i].as_py()[:40]!r}")
    return values.astype(np.float32)


def _read_lists(chunks: list[tuple[np.ndarray, pa.Array, np.ndarray]]) -> CommonList:
    """One list field's per-chunk (counts per line, dictionary-encoded ids, values) as one CommonList."""
    lengths = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(lengths)])
    unified = pa.chunked_array([c[1] for c in chunks], pa.dictionary(pa.int32(), pa.string())).unify_dictionaries()
    has = unified.num_chunks and len(unified.chunks[0].dictionary)
    dictionary = unified.chunks[0].dictionary if has else pa.array([], pa.string())
    codes = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in unified.chunks]).astype(np.int32) \
        if has else np.zeros(0, dtype=np.int32)
    values = np.concatenate([c[2] for c in chunks]) if chunks else np.zeros(0, dtype=np.float32)
    return CommonList(offsets, codes, values, dictionary)


@dataclass
class CommonTable:
    """One common-features file: key -> line, and per line the wanted fields (Note [Join memory])."""

    path: Path
    n_lines: int
    keys: pa.Array  # distinct common_feature_index values
    key_line: np.ndarray  # the line each key names (the last line of a repeated key, as INSERT OR REPLACE did)
    codes: dict[int, np.ndarray]  # wanted field position -> per-line dictionary code, -1 when absent
    dictionary: dict[int, pa.Array]  # wanted field position -> the distinct raw ids
    dense: dict[int, np.ndarray]  # dense position -> per-line value (NaN when absent or not a finite number)
    bad: dict[tuple[int, int], str] = field(default_factory=dict)  # (dense position, line) -> raw text, not finite
    lists: dict[int, CommonList] = field(default_factory=dict)  # list field position -> every entry, by line

    def __post_init__(self) -> None:
        self.index = StringIndex(self.keys)  # built once, before any thread reads it (Note [String index])

    @classmethod
    def read(cls, path: Path, fields: pa.Array, dense_fields: Sequence[int], block_size: int,
             progress: Callable[[int, int], None] | None = None, list_fields: Sequence[int] = ()) -> CommonTable:
        """Parse `path` (common_feature_index,num_features,feature_list) keeping `fields` and dense values, and every
        entry of the `list_fields` (a non-finite value of one is a DataError naming its line)."""
        keys: list[pa.Array] = []
        coded: dict[int, list[pa.Array]] = {j: [] for j in range(len(fields))}
        dense: dict[int, list[np.ndarray]] = {d: [] for d in range(len(dense_fields))}
        listed: dict[int, list[tuple[np.ndarray, pa.Array, np.ndarray]]] = {j: [] for j in list_fields}
        bad: dict[tuple[int, int], str] = {}
        n_lines = 0
        for chunk in read_chunks(path, ("common_feature_index", "num_features", "feature_list"), block_size,
                                 progress):
            entries = parse_entries(chunk.columns[2], fields)
            malformed = np.flatnonzero(entries.parts % 3 != 0)
            if len(malformed):
                i = int(malformed[0])
                raise DataError(malformed_message(chunk.where(i), int(entries.parts[i])))
            keys.append(chunk.columns[0])
            for j in range(len(fields)):
                e = entries.last[:, j]
                has = e >= 0
                ids = entries.ids(e[has]) if has.any() else pa.array([], pa.string())
                full = pc.replace_with_mask(pa.nulls(len(e), pa.string()), pa.array(has), ids) if has.any() \
                    else pa.nulls(len(e), pa.string())
                coded[j].append(pc.dictionary_encode(full))
            for d, j in enumerate(dense_fields):
                e = entries.last[:, j]
                has = e >= 0
                values = np.full(len(e), np.nan)
                if has.any():
                    text = entries.values(e[has])
                    parsed = to_float(text)
                    values[has] = parsed
                    for i in np.flatnonzero(~np.isfinite(parsed)):
                        bad[(d, n_lines + int(np.flatnonzero(has)[i]))] = text[int(i)].as_py()
                dense[d].append(values)
            for j in list_fields:
                entry, counts = entries.every(j)
                name = fields[j].as_py()
                listed[j].append((counts, pc.dictionary_encode(entries.ids(entry)),
                                  list_values(chunk, entries, entry, name)))
            n_lines += len(chunk)
        all_keys = pa.chunked_array(keys, pa.string()).combine_chunks()
        codes: dict[int, np.ndarray] = {}
        dictionary: dict[int, pa.Array] = {}
        for j, parts in coded.items():
            unified = pa.chunked_array(parts, pa.dictionary(pa.int32(), pa.string())).unify_dictionaries()
            if not unified.num_chunks or not len(unified.chunks[0].dictionary):
                continue  # the field never occurs in this file
            dictionary[j] = unified.chunks[0].dictionary
            indices = pa.chunked_array([c.indices for c in unified.chunks], pa.int32()).combine_chunks()
            codes[j] = pc.fill_null(indices, -1).to_numpy(zero_copy_only=False).astype(np.int32)
        encoded = pc.dictionary_encode(all_keys)
        if len(encoded.dictionary) == len(all_keys):
            key_line = np.arange(len(all_keys), dtype=np.int64)
            distinct = all_keys
        else:  # a repeated key: its last line wins
            key_line = np.full(len(encoded.dictionary), -1, dtype=np.int64)
            np.maximum.at(key_line, encoded.indices.to_numpy(zero_copy_only=False), np.arange(len(all_keys)))
            distinct = encoded.dictionary
        dense_values = {d: np.concatenate(v) if v else np.zeros(0) for d, v in dense.items()}
        dense_values = {d: v for d, v in dense_values.items() if (dense_fields[d] in codes)}
        lists = {j: _read_lists(parts) for j, parts in listed.items()}
        return cls(path, n_lines, distinct, key_line, codes, dictionary, dense_values, bad, lists)

    def join(self, index: pa.Array) -> np.ndarray:
        """The common line of each value of `index` (a chunk column), -1 when the file has none."""
        at = self.index(index)
        return np.where(at >= 0, self.key_line[at], -1)

    def has(self, j: int, lines: np.ndarray) -> np.ndarray:
        """Whether each joined row's common line has wanted field j (False for rows without a line)."""
        codes = self.codes.get(j)
        if codes is None:
            return np.zeros(len(lines), dtype=bool)
        return (lines >= 0) & (codes[np.maximum(lines, 0)] >= 0)

    def nbytes(self) -> int:
        lists = sum(c.offsets.nbytes + c.codes.nbytes + c.values.nbytes + c.dictionary.nbytes for c in self.lists.values())
        return (self.keys.nbytes + self.key_line.nbytes + sum(c.nbytes for c in self.codes.values())
                + sum(d.nbytes for d in self.dictionary.values()) + sum(v.nbytes for v in self.dense.values()) + lists)


class IdCounts:
    """Raw id -> count for one field, merged from per-chunk value counts (memory: about 3x the distinct ids)."""

    def __init__(self) -> None:
        self.merged: pa.Table | None = None
        self.pending: list[pa.Table] = []
        self.pending_rows = 0

    def add(self, ids: pa.Array, counts: pa.Array) -> None:
        """Add `counts` for the distinct raw `ids`."""
        self.pending.append(pa.table({"raw_id": ids.cast(pa.string()), "count": counts.cast(pa.int64())}))
        self.pending_rows += len(ids)
        if self.pending_rows > max(1 << 18, 2 * (0 if self.merged is None else self.merged.num_rows)):
            self.merge()

    def merge(self) -> pa.Table:
        tables = ([] if self.merged is None else [self.merged]) + self.pending
        if not tables:
            return pa.table({"raw_id": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
        both = pa.concat_tables(tables)
        summed = both.group_by("raw_id").aggregate([("count", "sum")])
        self.merged = pa.table({"raw_id": summed.column("raw_id"), "count": summed.column("count_sum")})
        self.pending, self.pending_rows = [], 0
        return self.merged


@dataclass
class Vocab:
    """One sparse field's kept raw ids in model-id order (ids 1..K), with their train counts."""

    raw_ids: pa.Array
    counts: pa.Array
    n_raw: int  # distinct raw ids seen in the train rows

    def __post_init__(self) -> None:
        self.index = StringIndex(self.raw_ids)  # built once, before any thread reads it (Note [String index])

    def lookup(self, ids: pa.Array) -> np.ndarray:
        """Model id of each raw id: 1..K, 0 when rare or unseen."""
        if not len(self.raw_ids) or not len(ids):
            return np.zeros(len(ids), dtype=np.int32)
        return (self.index(ids) + 1).astype(np.int32)


def build_vocab(counts: pa.Table, min_count: int) -> Vocab:
    """Ids seen at least `min_count` times, by descending count, ties by raw id (Note [Ali-CCP raw format])."""
    counts = counts.filter(pc.greater(counts.column("count"), 0))
    kept = counts.filter(pc.greater_equal(counts.column("count"), min_count))
    order = pc.sort_indices(kept, sort_keys=[("count", "descending"), ("raw_id", "ascending")])
    kept = kept.take(order)
    return Vocab(kept.column("raw_id").combine_chunks(), kept.column("count").combine_chunks(), counts.num_rows)


# --- skeleton rows ----------------------------------------------------------------------------------


@dataclass
class Fields:
    """The wanted fields as positions: every sparse field, list field and dense source, in one order."""

    names: tuple[str, ...]  # sparse fields, list fields, then dense sources that are neither
    sparse: tuple[int, ...]  # position of each schema.sparse field
    dense: tuple[int, ...]  # position of each dense source (D109_14 -> 109_14)
    dense_sources: tuple[str, ...]
    lists: tuple[int, ...] = ()  # position of each list field (every entry kept; none with --last-entry)

    @classmethod
    def of(cls, sparse: Sequence[str], dense_columns: Sequence[str], lists: Sequence[str] = ()) -> Fields:
        sources = tuple(d[1:] for d in dense_columns)  # D109_14 -> 109_14
        ids = (*sparse, *lists)
        names = ids + tuple(s for s in dict.fromkeys(sources) if s not in ids)
        return cls(names, tuple(range(len(sparse))), tuple(names.index(s) for s in sources), sources,
                   tuple(range(len(sparse), len(ids))))

    def array(self) -> pa.Array:
        return pa.array(list(self.names), pa.string())


@dataclass
class Rows:
    """One skeleton chunk, parsed and joined; `keep` marks its samples (labels 0/1, not noise, not a header)."""

    chunk: Chunk
    keep: np.ndarray
    noise: np.ndarray
    click: np.ndarray  # int8
    purchase: np.ndarray  # int8
    entries: Entries
    lines: np.ndarray  # the common line of each row, -1 when the common-features file has none
    dense: np.ndarray  # (D, rows) raw dense values after the join, 0 when the field is missing
    own_lists: dict[int, OwnList] = field(default_factory=dict)  # list field position -> the rows' own entries


@dataclass
class OwnList:
    """A list field's entries in skeleton rows kept whose common line lacks the field (Note [Ali-CCP raw format])."""

    entry: np.ndarray  # entry indices (into Entries), in file order
    counts: np.ndarray  # int64 per row
    values: np.ndarray  # float64 per entry (checked finite by parse_rows)


def _flags(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(== "0", == "1") of a label column."""
    return (pc.equal(column, "0").to_numpy(zero_copy_only=False), pc.equal(column, "1").to_numpy(zero_copy_only=False))


def parse_rows(chunk: Chunk, common: CommonTable, fields: Fields) -> Rows:
    """Labels, noise, feature entries, the join and the dense values of a skeleton chunk; raises for its first bad line.

    The checks of a line come in today's order (column count, labels, noise skipped, feature list, dense
    values), and the first bad line of the chunk is the one reported.
    """
    n = len(chunk)
    sample_id, click, purchase, index, _, feature_list = chunk.columns
    c0, c1 = _flags(click)
    p0, p1 = _flags(purchase)
    header = np.zeros(n, dtype=bool)
    if chunk.first == 0 and n and click[0].as_py() == "click" and chunk.line(0) == 1:
        header[0] = True  # a header line someone added
    bad_click = ~(c0 | c1) & ~header
    bad_purchase = ~(p0 | p1) & ~header & ~bad_click
    noise = c0 & p1
    entries = parse_entries(feature_list, fields.array())
    live = ~header & ~bad_click & ~bad_purchase & ~noise
    malformed = live & (entries.parts % 3 != 0)
    keep = live & ~malformed
    lines = common.join(index)
    dense = np.zeros((len(fields.dense), n), dtype=np.float64)
    for d, j in enumerate(fields.dense):
        from_common = common.has(j, lines) & keep  # a field in both files takes the common entry
        if from_common.any():
            dense[d, from_common] = common.dense[d][lines[from_common]]
        e = entries.last[:, j]
        own = (e >= 0) & keep & ~from_common
        if own.any():
            dense[d, own] = to_float(entries.values(e[own]))
    bad_dense = ~np.isfinite(dense)
    own_lists: dict[int, OwnList] = {}
    bad_list = np.zeros(n, dtype=bool)
    for j in fields.lists:  # every entry of a list field, where the common line does not give the list
        entry, counts = entries.every(j, keep & (common.lists[j].lengths(lines) == 0))
        values = to_float(entries.values(entry))
        assert entries.row is not None
        bad_list[entries.row[entry[~np.isfinite(values)]]] = True
        own_lists[j] = OwnList(entry, counts, values)
    bad = bad_click | bad_purchase | malformed | bad_dense.any(axis=0) | bad_list
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        where = chunk.where(i)
        if bad_click[i] or bad_purchase[i]:
            name, value = ("click", click) if bad_click[i] else ("purchase", purchase)
            raise DataError(f"{where}: column '{name}': expected 0 or 1, got {value[i].as_py()[:40]!r}")
        if malformed[i]:
            raise DataError(malformed_message(where, int(entries.parts[i])))
        if bad_dense[:, i].any():
            d = int(np.flatnonzero(bad_dense[:, i])[0])
            j, name = fields.dense[d], fields.dense_sources[d]
            if common.has(j, lines[i:i + 1])[0]:
                text = common.bad[(d, int(lines[i]))]
            else:
                text = entries.values(entries.last[i:i + 1, j]).to_pylist()[0]
        else:
            j = next(j for j in fields.lists if _bad_entry(entries, own_lists[j], i) is not None)
            name, text = fields.names[j], _bad_entry(entries, own_lists[j], i)  # type: ignore[assignment]
        raise DataError(f"{where}: field {name}: expected a finite number as the feature value, got {text[:40]!r}")
    return Rows(chunk, keep, noise & ~header, c1.astype(np.int8), p1.astype(np.int8), entries, lines, dense, own_lists)


def _bad_entry(entries: Entries, own: OwnList, i: int) -> str | None:
    """The text of row i's first entry of a list field whose value is not a finite number, None when none is."""
    assert entries.row is not None
    hit = np.flatnonzero((entries.row[own.entry] == i) & ~np.isfinite(own.values))
    return None if not len(hit) else entries.values(own.entry[hit[:1]]).to_pylist()[0]


# Note [Own lists]
# A list field's rows nearly always take their list from their common line (the behaviour fields are
# user-side), and then they only name that line: the common lines are rows of the split's list table
# (Note [List tables] in runtime/store.py), written once per split. A row whose common line lacks a list
# field that the row itself carries (or that has no common line but lists of its own) gets a list-table
# row of its own, appended after the common lines and the empty row: ListRows builds those rows' lists,
# each field from the common line where it holds the field, else from the row's own entries.


@dataclass
class CommonIds:
    """One list field of a common-features file with its entries mapped to model ids (Note [Own lists])."""

    common: CommonList
    ids: np.ndarray  # int32 model id of each entry

    def lines(self, a: int, b: int) -> tuple[pa.ListArray, pa.ListArray]:
        """Lines [a, b) as Arrow lists, ids and weights; line n_lines (one past the last) is an empty list."""
        offsets = self.common.offsets
        off = np.minimum(np.arange(a, b + 1), len(offsets) - 1)
        at = offsets[off]
        if at[-1] - at[0] >= 2**31:
            raise DataError(f"{b - a} common-feature lines hold {at[-1] - at[0]} entries of one list field: "
                            "over 2^31; pass a smaller --row-group-size")
        starts = pa.array((at - at[0]).astype(np.int32))
        return (pa.ListArray.from_arrays(starts, pa.array(self.ids[at[0]:at[-1]], pa.int32())),
                pa.ListArray.from_arrays(starts, pa.array(self.common.values[at[0]:at[-1]], pa.float32())))


@dataclass
class ListRows:
    """One list field of a chunk's rows: each row's entries, from its common line or else its own (model ids, weights)."""

    common: CommonIds
    lines: np.ndarray
    from_common: np.ndarray  # per row: the common line holds the list
    own_ids: np.ndarray  # model ids of the rows' own entries, in row order
    own_values: np.ndarray  # float32
    own_counts: np.ndarray  # int64 per row

    @classmethod
    def of(cls, rows: Rows, j: int, common: CommonTable, common_ids: CommonIds, vocab: Vocab) -> ListRows:
        own = rows.own_lists[j]
        cl = common.lists[j]
        return cls(common_ids, rows.lines, cl.lengths(rows.lines) > 0, vocab.lookup(rows.entries.ids(own.entry)),
                   own.values.astype(np.float32), own.counts)

    def take(self, sel: np.ndarray) -> tuple[pa.Array, pa.Array]:
        """The rows `sel`: list<int32> ids and list<float32> weights."""
        c = self.from_common[sel]
        cl = self.common.common
        lengths = np.where(c, cl.lengths(self.lines[sel]), self.own_counts[sel])
        out = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(lengths)])
        ids_out = np.empty(int(out[-1]), dtype=np.int32)
        weights_out = np.empty(int(out[-1]), dtype=np.float32)
        own_start = (np.cumsum(self.own_counts) - self.own_counts)[sel]
        for rows, starts, src_ids, src_values in (
                (np.flatnonzero(c), cl.offsets[np.maximum(self.lines[sel], 0)], self.common.ids, cl.values),
                (np.flatnonzero(~c), own_start, self.own_ids, self.own_values)):
            src, dst = ragged(starts[rows], lengths[rows]), ragged(out[rows], lengths[rows])
            ids_out[dst], weights_out[dst] = src_ids[src], src_values[src]
        offsets = pa.array(out.astype(np.int32))
        return (pa.ListArray.from_arrays(offsets, pa.array(ids_out)),
                pa.ListArray.from_arrays(offsets, pa.array(weights_out)))
