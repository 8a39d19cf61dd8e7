"""Raw Tianchi Ali-CCP files -> the dataset folder runtime/data.py reads, by streaming in bounded memory.

`prepare_ali_ccp(raw, out)` reads `sample_skeleton_{train,test}.csv` and `common_features_{train,test}.csv`
(in RAW or RAW/train, RAW/test) and writes `train.parquet`, `val.parquet`, `test.parquet`, `schema.json`
(the catalog's `ali_ccp` schema with vocabulary sizes), `vocab.parquet` (raw feature id -> model id per
field) and `prepare.json` (settings, row counts, ranges) into OUT. Note [Ali-CCP raw format] describes
the input and the mapping.

Memory is bounded by design, not by measurement: lines are read one at a time; the common-features
file is indexed once into an on-disk SQLite table holding only the fields the schema uses, read back
through an LRU cache of `cache_size` entries; each split's Parquet writer buffers at most
`row_group_size` rows and writes them as one row group. What grows with the data is the per-field
id counts (one entry per distinct raw id, which the vocabulary needs anyway), never the rows.
Outputs are written under a temporary folder in OUT and moved into place at the end, so an
interrupted run leaves the previous files (or none), never half-written ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sqlite3
import tempfile
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..catalog import KNOWN_DATASETS, SCHEMA_FILE, DataError, DatasetNotFound, data_roots, schema_to_json

__all__ = [
    "DEFAULT_MIN_COUNT",
    "DEFAULT_ROW_GROUP",
    "DEFAULT_VAL_SHARE",
    "PREPARABLE",
    "PrepareReport",
    "default_out",
    "parse_features",
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
# parse_features splits on all three control characters and reads triples: both spellings parse.
# The common features (user profile and behaviour fields) are shared by every sample with the same
# common_feature_index; the skeleton holds the ad-side and cross fields.
# Mapping, as torch-rechub's examples/ranking/data/ali-ccp/preprocess_ali_ccp.py does it:
# - samples with click=0 and purchase=1 (noise: a purchase without a click) are dropped;
# - a field listed several times in one sample (e.g. the 109_14 behaviour list) keeps its last entry;
#   a field present in both files takes the common-features entry;
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

LABELS = ("click", "purchase")
DEFAULT_MIN_COUNT = 10
DEFAULT_VAL_SHARE = 0.1
DEFAULT_ROW_GROUP = 100_000
DEFAULT_CACHE = 100_000
PREPARABLE = ("ali_ccp",)
_SEP = re.compile("[\x01\x02\x03]")
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
    max_rows_buffered: int  # the most rows any writer held at once (<= row_group_size)
    cache_size: int
    max_cached: int  # the most common-feature entries held in memory at once (<= cache_size)
    files: dict[str, str] = field(default_factory=dict)  # written file name -> path


# --- parsing --------------------------------------------------------------------------------------


def parse_features(text: str, wanted: frozenset[str] | set[str] | None = None, *, where: str = "") -> dict[str, tuple[str, str]]:
    """field -> (feature_id, value) from a raw feature list; the last entry of a repeated field wins.

    `wanted` keeps only those fields. A list whose parts do not come in (field, id, value) triples
    raises DataError naming `where`.
    """
    if not text:
        return {}
    parts = _SEP.split(text)
    if len(parts) % 3:
        raise DataError(f"{where}: malformed feature list: expected field, feature id, value triples "
                        f"separated by \\x01/\\x02/\\x03, got {len(parts)} parts")
    out: dict[str, tuple[str, str]] = {}
    for f, fid, value in zip(parts[0::3], parts[1::3], parts[2::3]):
        if wanted is None or f in wanted:
            out[f] = (fid, value)
    return out


def _encode(features: Mapping[str, tuple[str, str]]) -> str:
    return "\x01".join(f"{f}\x02{fid}\x03{v}" for f, (fid, v) in features.items())


def _lines(path: Path, progress: Callable[[int], None] | None) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without the line ending), one line in memory at a time."""
    with open(path, "rb") as f:
        done = 0
        for n, raw in enumerate(f, 1):
            if progress is not None:
                done += len(raw)
                if done >= 1 << 22:
                    progress(done)
                    done = 0
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}: line {n}: not UTF-8 text") from None
            line = line.rstrip("\r\n")
            if line:
                yield n, line
        if progress is not None and done:
            progress(done)


# --- the common-features index ----------------------------------------------------------------------


class _CommonIndex:
    """common_feature_index -> the wanted fields of that line: an SQLite table on disk behind an LRU cache."""

    def __init__(self, db_path: Path, cache_size: int) -> None:
        self.db = sqlite3.connect(str(db_path))
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("PRAGMA cache_size=-16384")  # 16 MiB page cache
        self.cache: OrderedDict[tuple[str, str], dict[str, tuple[str, str]] | None] = OrderedDict()
        self.cache_size = cache_size
        self.max_cached = 0

    def build(self, table: str, path: Path, wanted: frozenset[str], progress: Callable[[int], None] | None) -> int:
        self.db.execute(f"DROP TABLE IF EXISTS {table}")
        self.db.execute(f"CREATE TABLE {table} (idx TEXT PRIMARY KEY, feats TEXT NOT NULL) WITHOUT ROWID")
        batch: list[tuple[str, str]] = []
        n_rows = 0
        for n, line in _lines(path, progress):
            cols = line.split(",", 2)
            if len(cols) != 3:
                raise DataError(f"{path}: line {n}: expected 3 comma-separated columns "
                                f"(common_feature_index,num_features,feature_list), got {len(cols)}")
            feats = parse_features(cols[2], wanted, where=f"{path}: line {n}")
            batch.append((cols[0], _encode(feats)))
            n_rows += 1
            if len(batch) >= 10_000:
                self.db.executemany(f"INSERT OR REPLACE INTO {table} VALUES (?, ?)", batch)
                batch.clear()
        if batch:
            self.db.executemany(f"INSERT OR REPLACE INTO {table} VALUES (?, ?)", batch)
        self.db.commit()
        return n_rows

    def get(self, table: str, idx: str) -> dict[str, tuple[str, str]] | None:
        key = (table, idx)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        row = self.db.execute(f"SELECT feats FROM {table} WHERE idx = ?", (idx,)).fetchone()
        value = None if row is None else parse_features(row[0])
        self.cache[key] = value
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        self.max_cached = max(self.max_cached, len(self.cache))
        return value

    def close(self) -> None:
        self.db.close()


# --- rows -----------------------------------------------------------------------------------------


@dataclass
class _Row:
    sample_id: str
    click: int
    purchase: int
    features: dict[str, tuple[str, str]]
    dense: list[float]  # raw values of the dense source fields (0.0 when absent)


def _is_val(sample_id: str, share: float) -> bool:
    """Deterministic split by sample id: a stable 64-bit hash, independent of file order and machine."""
    h = int.from_bytes(hashlib.blake2b(sample_id.encode("utf-8"), digest_size=8).digest(), "big")
    return h < share * 2**64


def _label(value: str, path: Path, n: int, name: str) -> int:
    if value == "0":
        return 0
    if value == "1":
        return 1
    raise DataError(f"{path}: line {n}: column '{name}': expected 0 or 1, got {value[:40]!r}")


def _rows(skeleton: Path, table: str, index: _CommonIndex, wanted: frozenset[str], dense_sources: Sequence[str],
          skipped: Counter[str], progress: Callable[[int], None] | None) -> Iterator[_Row]:
    """Joined sample rows of one skeleton file, noise rows dropped (counted in `skipped`)."""
    for n, line in _lines(skeleton, progress):
        cols = line.split(",", 5)
        if len(cols) != 6:
            raise DataError(f"{skeleton}: line {n}: expected 6 comma-separated columns "
                            "(sample_id,click,purchase,common_feature_index,num_features,feature_list), "
                            f"got {len(cols)}")
        if n == 1 and cols[1] == "click":  # a header line someone added
            continue
        click = _label(cols[1], skeleton, n, "click")
        purchase = _label(cols[2], skeleton, n, "purchase")
        if click == 0 and purchase == 1:
            skipped[_NOISE] += 1
            continue
        features = parse_features(cols[5], wanted, where=f"{skeleton}: line {n}")
        common = index.get(table, cols[3])
        if common is None:
            skipped[_NO_COMMON] += 1
        else:
            features.update(common)
        dense = []
        for src in dense_sources:
            entry = features.get(src)
            if entry is None:
                dense.append(0.0)
                continue
            try:
                value = float(entry[1])
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise DataError(f"{skeleton}: line {n}: field {src}: expected a finite number as the feature value, "
                                f"got {entry[1][:40]!r}")
            dense.append(value)
        yield _Row(cols[0], click, purchase, features, dense)


# --- writing --------------------------------------------------------------------------------------


class _SplitWriter:
    """One split's Parquet file, written one row group of at most `row_group_size` rows at a time."""

    def __init__(self, path: Path, columns: Sequence[tuple[str, Any]], row_group_size: int,
                 post: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa = pa
        self.names = [c for c, _ in columns]
        self.types = [t for _, t in columns]
        self.schema = pa.schema([(c, t) for c, t in columns])
        self.writer = pq.ParquetWriter(str(path), self.schema, compression="zstd")
        self.row_group_size = row_group_size
        self.post = [None if post is None else post.get(c) for c in self.names]  # per-column vectorised transform
        self.rows: list[tuple[Any, ...]] = []
        self.written = 0
        self.max_held = 0

    def append(self, row: tuple[Any, ...]) -> None:
        self.rows.append(row)
        self.max_held = max(self.max_held, len(self.rows))
        if len(self.rows) >= self.row_group_size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        arrays = []
        for col, t, fn in zip(zip(*self.rows), self.types, self.post):
            a = np.asarray(col, dtype=t.to_pandas_dtype()) if fn is None else fn(np.asarray(col)).astype(t.to_pandas_dtype())
            arrays.append(self.pa.array(a, type=t))
        self.writer.write_table(self.pa.Table.from_arrays(arrays, schema=self.schema), row_group_size=self.row_group_size)
        self.written += len(self.rows)
        self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


# --- the pipeline ---------------------------------------------------------------------------------


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


class _Bars:
    """Byte-progress bars (tqdm on stderr, one at a time) and one-line notes; a note closes the bar of its pass."""

    def __init__(self, progress: bool, log: Callable[[str], None] | None) -> None:
        self.progress, self.log = progress, log
        self.bars: list[Any] = []

    def close(self) -> None:
        for b in self.bars:
            b.close()
        self.bars.clear()

    def say(self, message: str) -> None:
        self.close()  # a pass has ended: its bar goes before the note is printed
        if self.log is not None:
            self.log(message)

    def bar(self, path: Path, what: str) -> Callable[[int], None] | None:
        if not self.progress:
            return None
        from tqdm import tqdm

        self.close()
        # disable=None: no bar when stderr is not a terminal (CI logs, pipes)
        b = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=what, leave=False, dynamic_ncols=True,
                 disable=None)
        self.bars.append(b)
        return b.update


@dataclass
class _TrainCounts:
    """Pass 1 over the train rows (val held out): raw id counts per sparse field, dense ranges, rows."""

    counts: dict[str, Counter[str]]
    lo: np.ndarray
    hi: np.ndarray
    n_train: int


def _count_train(skeleton: Path, index: _CommonIndex, sparse: Sequence[str], wanted: frozenset[str],
                 dense_sources: tuple[str, ...], val_share: float, row_group_size: int,
                 progress: Callable[[int], None] | None) -> _TrainCounts:
    counts: dict[str, Counter[str]] = {f: Counter() for f in sparse}
    lo = np.full(len(dense_sources), np.inf)
    hi = np.full(len(dense_sources), -np.inf)
    chunk: list[list[float]] = []  # dense values, reduced to min/max every row_group_size rows

    def reduce_chunk() -> None:
        nonlocal lo, hi
        if chunk:
            a = np.asarray(chunk, dtype=np.float64)
            lo, hi = np.minimum(lo, a.min(axis=0)), np.maximum(hi, a.max(axis=0))
            chunk.clear()

    ignore: Counter[str] = Counter()
    n_train = 0
    for row in _rows(skeleton, "train", index, wanted, dense_sources, ignore, progress):
        if _is_val(row.sample_id, val_share):
            continue
        n_train += 1
        feats = row.features
        for f in sparse:
            entry = feats.get(f)
            if entry is not None:
                counts[f][entry[0]] += 1
        chunk.append(row.dense)
        if len(chunk) >= row_group_size:
            reduce_chunk()
    reduce_chunk()
    if n_train == 0:
        raise DataError(f"{skeleton}: no training rows (empty file, or every sample fell into val or was dropped)")
    return _TrainCounts(counts, lo, hi, n_train)


def _scaler(low: float, high: float) -> Callable[[np.ndarray], np.ndarray]:
    """Min-max scaling of a dense column to [0, 1] by its train range."""
    span = float(high - low)
    if not span > 0:  # a constant column carries no information: 0 everywhere
        return lambda a: np.zeros(a.shape, dtype=np.float64)
    return lambda a: np.clip((a.astype(np.float64) - low) / span, 0.0, 1.0)


def _write_splits(files: Mapping[str, Path], work: Path, index: _CommonIndex, schema: Any, wanted: frozenset[str],
                  dense_sources: tuple[str, ...], vocab: Mapping[str, Mapping[str, int]], train: _TrainCounts,
                  val_share: float, row_group_size: int, bars: _Bars) -> tuple[dict[str, _SplitWriter], Counter[str]]:
    """Pass 2: map every row's ids and scale its dense values, into train/val/test Parquet files in `work`."""
    import pyarrow as pa

    sparse = schema.sparse
    columns = [(c, pa.int8()) for c in LABELS] + [(f, pa.int32()) for f in sparse] + [(d, pa.float32()) for d in schema.dense]
    post = {d: _scaler(float(train.lo[j]), float(train.hi[j])) for j, d in enumerate(schema.dense)}
    writers = {s: _SplitWriter(work / f"{s}.parquet", columns, row_group_size, post) for s in ("train", "val", "test")}
    maps = [vocab[f] for f in sparse]
    skipped: Counter[str] = Counter()
    for split, table in (("train", "train"), ("test", "test")):
        skeleton = files[f"sample_skeleton_{split}"]
        for row in _rows(skeleton, table, index, wanted, dense_sources, skipped,
                         bars.bar(skeleton, f"write {skeleton.name}")):
            target = split if split == "test" else ("val" if _is_val(row.sample_id, val_share) else "train")
            feats = row.features
            ids = [m.get(feats[f][0], 0) if f in feats else 0 for f, m in zip(sparse, maps)]
            writers[target].append((row.click, row.purchase, *ids, *row.dense))
    for w in writers.values():
        w.close()
    for s, w in writers.items():
        if w.written == 0:
            raise DataError(f"no {s} rows were written (check the raw files and --val-share)")
    return writers, skipped


def _write_vocab(path: Path, sparse: Sequence[str], vocab: Mapping[str, Mapping[str, int]],
                 counts: Mapping[str, Counter[str]]) -> None:
    """vocab.parquet: field, raw_id, id, count of every kept raw id."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    vocab_table = pa.table({
        "field": pa.array([f for f in sparse for _ in vocab[f]], pa.string()),
        "raw_id": pa.array([fid for f in sparse for fid in vocab[f]], pa.string()),
        "id": pa.array([i for f in sparse for i in vocab[f].values()], pa.int32()),
        "count": pa.array([counts[f][fid] for f in sparse for fid in vocab[f]], pa.int64()),
    })
    pq.write_table(vocab_table, str(path))


def prepare_ali_ccp(
    raw: str | Path,
    out: str | Path | None = None,
    *,
    min_count: int = DEFAULT_MIN_COUNT,
    val_share: float = DEFAULT_VAL_SHARE,
    row_group_size: int = DEFAULT_ROW_GROUP,
    cache_size: int = DEFAULT_CACHE,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> PrepareReport:
    """Convert the raw Ali-CCP files in `raw` into a dataset folder `out` (default: default_out()).

    See Note [Ali-CCP raw format] for the mapping. `min_count`: raw ids seen fewer times in train map
    to 0; `val_share`: share of the train skeleton held out as val; `row_group_size`: rows per
    Parquet row group (= the most rows buffered per split); `cache_size`: common-feature lines kept in
    memory; `progress`: show byte-progress bars (tqdm) on stderr; `log`: receives one-line notes.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if not 0.0 <= val_share < 1.0:
        raise ValueError(f"val_share must lie in [0, 1), got {val_share}")
    if row_group_size < 1 or cache_size < 1:
        raise ValueError(f"row_group_size and cache_size must be positive, got {row_group_size}, {cache_size}")
    raw = Path(raw).expanduser()
    out = Path(out).expanduser() if out is not None else default_out()
    files = _find_raw(raw)
    bars = _Bars(progress, log)

    schema = KNOWN_DATASETS["ali_ccp"].schema
    sparse = schema.sparse
    dense_sources = tuple(d[1:] for d in schema.dense)  # D109_14 -> 109_14
    wanted = frozenset(sparse) | frozenset(dense_sources)

    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out))
    index = _CommonIndex(work / "common.sqlite", cache_size)
    try:
        for split in ("train", "test"):
            path = files[f"common_features_{split}"]
            n = index.build(split, path, wanted, bars.bar(path, f"index {path.name}"))
            bars.say(f"indexed {n} common-feature lines of {path.name}")

        # pass 1: id counts and dense ranges over the train rows
        skeleton = files["sample_skeleton_train"]
        train = _count_train(skeleton, index, sparse, wanted, dense_sources, val_share, row_group_size,
                             bars.bar(skeleton, f"count {skeleton.name}"))
        counts, lo, hi = train.counts, train.lo, train.hi
        vocab: dict[str, dict[str, int]] = {}
        for f in sparse:
            kept = sorted(((c, fid) for fid, c in counts[f].items() if c >= min_count), key=lambda x: (-x[0], x[1]))
            vocab[f] = {fid: i for i, (_, fid) in enumerate(kept, 1)}
        vocab_sizes = {f: len(vocab[f]) + 1 for f in sparse}
        raw_ids = {f: len(counts[f]) for f in sparse}
        bars.say(f"counted {train.n_train} train rows: {sum(raw_ids.values())} distinct raw ids, "
                 f"{sum(vocab_sizes.values()) - len(sparse)} seen at least {min_count} times")

        # pass 2: map and write
        writers, skipped = _write_splits(files, work, index, schema, wanted, dense_sources, vocab, train, val_share,
                                         row_group_size, bars)
        rows = {s: w.written for s, w in writers.items()}
        if skipped[_NOISE]:
            bars.say(f"dropped {skipped[_NOISE]} rows with click=0, purchase=1")
        if skipped[_NO_COMMON]:
            bars.say(f"{skipped[_NO_COMMON]} rows have a common_feature_index missing from the common-features file: "
                     "their user fields are 0")

        # side files
        final_schema = replace(schema, vocab_sizes=vocab_sizes)
        (work / SCHEMA_FILE).write_text(schema_to_json(final_schema, with_vocab=True), encoding="utf-8")
        _write_vocab(work / "vocab.parquet", sparse, vocab, counts)
        dense_range = {d: (float(lo[j]), float(hi[j])) for j, d in enumerate(schema.dense)}
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
            cache_size=cache_size,
            max_cached=index.max_cached,
        )
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
        (work / "prepare.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

        # publish: data files first, schema.json last (a reader that sees the schema sees the data)
        index.close()
        written = {}
        for name in ("train.parquet", "val.parquet", "test.parquet", "vocab.parquet", "prepare.json", SCHEMA_FILE):
            os.replace(work / name, out / name)
            written[name] = str(out / name)
        return replace(report, files=written)
    finally:
        bars.close()
        with contextlib.suppress(sqlite3.Error):
            index.close()
        shutil.rmtree(work, ignore_errors=True)


def prepare(name: str, raw: str | Path, out: str | Path | None = None, *, min_count: int = DEFAULT_MIN_COUNT,
            val_share: float = DEFAULT_VAL_SHARE, row_group_size: int = DEFAULT_ROW_GROUP,
            cache_size: int = DEFAULT_CACHE, progress: bool = False,
            log: Callable[[str], None] | None = None) -> PrepareReport:
    """`mtldsl data prepare NAME`: dispatch on the dataset name (only ali_ccp has a raw format to convert)."""
    key = name.strip().lower().replace("-", "_")
    if key == "ali_ccp":
        return prepare_ali_ccp(raw, out if out is not None else default_out(key), min_count=min_count,
                               val_share=val_share, row_group_size=row_group_size, cache_size=cache_size,
                               progress=progress, log=log)
    known = ", ".join(PREPARABLE)
    if key in KNOWN_DATASETS:
        raise DataError(f"dataset '{key}' has no raw-file converter (only {known}); put its train/val/test "
                        f"CSV or Parquet files in a folder and pass the folder to --data")
    raise DataError(f"unknown dataset '{name}' (preparable: {known})")
