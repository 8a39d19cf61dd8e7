"""Dataset source (a name or a folder of CSV/Parquet files) -> Dataset of pre-built tensors per split.

`load_dataset("synthetic")` generates the built-in data (Note [Synthetic data]); a named dataset
(`ali_ccp`, `census_income`, `aliexpress`) is read from its folder (catalog.resolve_folder); any other
source is a folder path whose schema comes from `schema.json` or is inferred (and then saved there when
the folder is writable). Every value is checked once while loading: bad data raises DataError naming
the file, column and 1-based data row, never a pandas traceback. Training batches are slices of the
pre-built tensors (`Split.batches`), never assembled sample by sample.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pandas.api import types as ptypes
from torch import Tensor

from mtldsl.catalog import (
    KNOWN_DATASETS,
    SCHEMA_FILE,
    SYNTHETIC_VOCAB,
    DataError,
    DatasetNotFound,
    Schema,
    find_split_files,
    locate,
    named,
    resolve_folder,
    schema_for,
    schema_to_json,
)

__all__ = [
    "DataError",
    "Dataset",
    "DatasetNotFound",
    "SYNTHETIC_ROWS",
    "Split",
    "VAL_SHARE",
    "load_dataset",
    "synthetic_truth",
]

log = logging.getLogger(__name__)

SYNTHETIC_ROWS = 100_000  # default total rows of the synthetic dataset (80/10/10 train/val/test)
VAL_SHARE = 0.1  # share of train held out as val when a dataset has no val file
_VAL_SEED = 0  # the held-out val rows do not depend on the training seed


# --- splits ---------------------------------------------------------------------------------------


@dataclass
class Split:
    sparse: Tensor  # int64 (N, len(schema.sparse))
    dense: Tensor  # float32 (N, len(schema.dense))
    labels: dict[str, Tensor]  # float32 (N,) per label column
    groups: Tensor | None  # int64 (N,) user/search id for gAUC
    truth: dict[str, Tensor] | None = field(default=None, repr=False)  # synthetic only: see synthetic_truth
    stream_to: torch.device | None = None  # rows stay here, batches go there (Note [Streamed batches])

    def __len__(self) -> int:
        return int(self.sparse.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the rows' tensors (what moving the split to a device would take there)."""
        parts = [self.sparse, self.dense, *self.labels.values()] + ([self.groups] if self.groups is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def _deliver(self, t: Tensor) -> Tensor:
        # Note [Streamed batches]: a split too large for its accelerator stays in host memory; each batch
        # is gathered there, copied into pinned (page-locked) memory and sent with a non-blocking copy, so
        # the host gathers batch k+1 while the device still computes batch k. Torch's caching host
        # allocator keeps a pinned block alive until the copy reading it has finished.
        if self.stream_to is None:
            return t
        if self.stream_to.type == "cuda":
            t = t.pin_memory()
        return t.to(self.stream_to, non_blocking=True)

    def rows(self, index: Tensor | slice) -> dict[str, Tensor | dict[str, Tensor] | None]:
        """One batch: {"sparse", "dense", "labels": {name: ...}, "groups"} of the rows at `index`
        (an int64 tensor on the rows' device: gathered; a slice: views), on the batch device."""

        def take(t: Tensor) -> Tensor:
            return self._deliver(t[index] if isinstance(index, slice) else t.index_select(0, index))

        return {
            "sparse": take(self.sparse),
            "dense": take(self.dense),
            "labels": {k: take(v) for k, v in self.labels.items()},
            "groups": None if self.groups is None else take(self.groups),
        }

    def to(self, device: torch.device | str) -> Split:
        """The same split on `device` (move once, before training, not per batch); batches go there too."""

        def mv(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=True)

        return Split(
            sparse=mv(self.sparse),
            dense=mv(self.dense),
            labels={k: mv(v) for k, v in self.labels.items()},
            groups=None if self.groups is None else mv(self.groups),
            truth=None if self.truth is None else {k: mv(v) for k, v in self.truth.items()},
        )

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[dict[str, Tensor]]:
        """Yield {"sparse", "dense", "labels": {name: ...}, "groups"} batches covering every row once.

        With shuffle, one permutation per call (drawn from `generator`) and `index_select` per batch;
        without, plain slices (views, no copy). `groups` is None when the dataset has no group id.
        Batches land on `stream_to` when it is set (Note [Streamed batches]).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n = len(self)
        stop = n - n % batch_size if drop_last else n
        if not shuffle:
            for start in range(0, stop, batch_size):
                yield self.rows(slice(start, min(start + batch_size, n)))
            return
        perm = torch.randperm(n, generator=generator).to(self.sparse.device)
        for start in range(0, stop, batch_size):
            yield self.rows(perm[start : start + batch_size])

    def take(self, index: Tensor) -> Split:
        """The rows at `index` (int64), as a new split."""
        return Split(
            sparse=self.sparse.index_select(0, index),
            dense=self.dense.index_select(0, index),
            labels={k: v.index_select(0, index) for k, v in self.labels.items()},
            groups=None if self.groups is None else self.groups.index_select(0, index),
            truth=None if self.truth is None else {k: v.index_select(0, index) for k, v in self.truth.items()},
        )


@dataclass
class Dataset:
    schema: Schema  # with vocab_sizes filled (max id + 1 over all splits; fixed for synthetic)
    train: Split
    val: Split
    test: Split
    source: str  # "synthetic" or the folder path
    val_from_train: bool = False  # no val file: VAL_SHARE of train was held out as val
    notes: tuple[str, ...] = ()  # human-readable remarks worth printing (e.g. the held-out val)

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
) -> Dataset:
    """Load a named dataset or a folder into tensors.

    rows: for synthetic, the total row count (default SYNTHETIC_ROWS, split 80/10/10); for real data,
    a cap on the rows read from each file. seed: the synthetic data's seed (real data ignores it).
    labels: label columns of a folder without schema.json. binary_labels: label columns that must be
    0 or 1 (the binary tasks'; the loader does not know task kinds).
    """
    if rows is not None and rows < 1:
        raise ValueError(f"rows must be positive, got {rows}")
    key = named(source)
    if key == "synthetic":
        return _load_synthetic(SYNTHETIC_ROWS if rows is None else rows, seed)
    if key is not None:
        info = KNOWN_DATASETS[key]
        schema = schema_for(key, labels=labels)  # fixed; rejects a labels override
        folder = resolve_folder(key, data_dir)
        prefix: str | None = info.file_prefix
    else:
        folder = locate(source, data_dir)
        schema = schema_for(str(folder), labels=labels)
        prefix = None
        if not (folder / SCHEMA_FILE).is_file() and not any(schema is i.schema for i in KNOWN_DATASETS.values()):
            _save_schema(folder, schema)
    unknown_binary = [c for c in binary_labels if c not in schema.labels]
    if unknown_binary:
        raise DataError(f"{folder}: binary label(s) {', '.join(map(repr, unknown_binary))} are not label columns")
    return _load_folder(folder, schema, prefix=prefix, rows=rows, binary_labels=tuple(binary_labels))


def _save_schema(folder: Path, schema: Schema) -> None:
    """Write an inferred schema beside the data, atomically; a read-only folder is not an error."""
    target = folder / SCHEMA_FILE
    if not os.access(folder, os.W_OK):
        log.info("not saving the inferred schema: %s is read-only", folder)
        return
    try:
        fd, tmp = tempfile.mkstemp(prefix=".schema.", suffix=".json", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(schema_to_json(schema))
        os.replace(tmp, target)
        log.info("inferred schema saved to %s", target)
    except OSError as e:
        log.info("not saving the inferred schema to %s: %s", target, e)


def _load_folder(
    folder: Path, schema: Schema, *, prefix: str | None, rows: int | None, binary_labels: tuple[str, ...]
) -> Dataset:
    files = find_split_files(folder, prefix)
    for split in ("train", "test"):
        if split not in files:
            raise DatasetNotFound(f"{folder}: no {split} file ({split}.csv, {split}.parquet or *_{split}_sample.csv)")
    frames = {split: _read_table(path, schema, rows) for split, path in files.items()}
    arrays = {split: _to_arrays(frames[split], files[split], schema, binary_labels) for split in frames}
    del frames
    vocab = _vocab_sizes(schema, arrays, files)  # before the val hold-out, so rows still match the files
    notes: list[str] = []
    val_from_train = "val" not in arrays
    if val_from_train:
        train = arrays["train"]
        n = len(train["sparse"])
        if n < 2:
            raise DataError(f"{files['train']}: {n} data row(s): too few to hold out a validation split")
        n_val = max(1, round(VAL_SHARE * n))
        perm = np.random.default_rng(_VAL_SEED).permutation(n)
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        arrays["val"] = {k: _take(v, val_idx) for k, v in train.items()}
        arrays["train"] = {k: _take(v, train_idx) for k, v in train.items()}
        notes.append(f"no val file in {folder}: held out {n_val} of {n} train rows ({VAL_SHARE:.0%}) as val")
        log.info(notes[-1])
    return Dataset(
        schema=replace(schema, vocab_sizes=vocab),
        train=_to_split(arrays["train"]),
        val=_to_split(arrays["val"]),
        test=_to_split(arrays["test"]),
        source=str(folder),
        val_from_train=val_from_train,
        notes=tuple(notes),
    )


def _take(v: object, idx: np.ndarray) -> object:
    if v is None:
        return None
    if isinstance(v, dict):
        return {k: a[idx] for k, a in v.items()}
    return v[idx]  # type: ignore[index]


def _read_table(path: Path, schema: Schema, rows: int | None) -> pd.DataFrame:
    """The schema's columns of one file as a DataFrame (CSV text cells kept verbatim for the checks)."""
    needed = list(schema.columns)
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                header = list(pq.read_schema(path).names)
            except Exception as e:  # pyarrow raises several types for a damaged or empty file
                raise DataError(f"{path}: not a readable Parquet file ({e})") from None
            _check_columns(path, header, needed, schema)
            table = pq.read_table(path, columns=needed)
            if rows is not None:
                table = table.slice(0, rows)
            df = table.to_pandas()
        else:
            if path.stat().st_size == 0:
                raise DataError(f"{path}: empty file")
            try:
                header = list(pd.read_csv(path, nrows=0).columns)
            except pd.errors.EmptyDataError:
                raise DataError(f"{path}: empty file") from None
            _check_columns(path, header, needed, schema)
            df = pd.read_csv(
                path,
                usecols=needed,
                nrows=rows,
                keep_default_na=False,  # keep 'n/a', '' … as text so the error can quote them
                na_values=[],
                low_memory=False,
            )
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot parse: {e}") from None
    if len(df) == 0:
        raise DataError(f"{path}: no data rows")
    return df


def _check_columns(path: Path, header: list[str], needed: list[str], schema: Schema) -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        cols = ", ".join(f"'{c}'" for c in missing)
        s = "s" if len(missing) > 1 else ""
        raise DataError(f"{path}: missing column{s} {cols} (needed by the '{schema.name}' schema)")


def _show(value: object) -> str:
    text = str(value)
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _fail(path: Path, col: str, i: int, what: str) -> DataError:
    return DataError(f"{path}: column '{col}', row {i + 1}: {what}")


def _numeric(path: Path, df: pd.DataFrame, col: str, expected: str) -> np.ndarray:
    """The column as a float64/int64 array; text cells that are not numbers raise DataError."""
    s = df[col]
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
                raise _fail(path, col, i, "missing value")
            try:
                float(cell)
            except ValueError:
                raise _fail(path, col, i, f"expected {expected}, got {_show(text[i])}") from None
    return num.to_numpy(dtype=np.float64, na_value=np.nan)


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def _ids(path: Path, df: pd.DataFrame, col: str, *, non_negative: bool = True) -> np.ndarray:
    a = _numeric(path, df, col, "an integer id")
    if a.dtype != np.int64:
        bad = ~np.isfinite(a) | (a != np.round(a))
        if bad.any():
            i = _first(bad)
            raise _fail(path, col, i, f"expected an integer id, got {_fmt(a[i])}")
        a = a.astype(np.int64)
    if non_negative and (a < 0).any():
        i = _first(a < 0)
        raise _fail(path, col, i, f"expected a non-negative integer id, got {a[i]}")
    return a


def _fmt(x: float) -> str:
    x = float(x)
    if not math.isfinite(x):
        return str(x)  # nan, inf, -inf
    return str(int(x)) if x.is_integer() else repr(x)


def _finite(path: Path, df: pd.DataFrame, col: str) -> np.ndarray:
    a = _numeric(path, df, col, "a number").astype(np.float64, copy=False)
    bad = ~np.isfinite(a)
    if bad.any():
        i = _first(bad)
        raise _fail(path, col, i, f"expected a finite number, got {_fmt(a[i])}")
    return a


def _to_arrays(df: pd.DataFrame, path: Path, schema: Schema, binary: tuple[str, ...]) -> dict[str, object]:
    """Check every cell of one file and convert it to numpy arrays (file order of checks: labels, sparse, dense)."""
    labels: dict[str, np.ndarray] = {}
    for col in schema.labels:
        y = _finite(path, df, col)
        if col in binary:
            bad = (y != 0) & (y != 1)
            if bad.any():
                i = _first(bad)
                raise _fail(path, col, i, f"expected a binary label 0 or 1, got {_fmt(y[i])}")
        labels[col] = y.astype(np.float32)
    n = len(df)
    sparse = np.empty((n, len(schema.sparse)), dtype=np.int64)
    for j, col in enumerate(schema.sparse):
        sparse[:, j] = _ids(path, df, col)
    dense = np.empty((n, len(schema.dense)), dtype=np.float32)
    for j, col in enumerate(schema.dense):
        dense[:, j] = _finite(path, df, col)
    groups = None
    if schema.user_id is not None:
        if schema.user_id in schema.sparse:
            groups = sparse[:, schema.sparse.index(schema.user_id)].copy()
        else:
            groups = _ids(path, df, schema.user_id, non_negative=False)
    return {"sparse": sparse, "dense": dense, "labels": labels, "groups": groups}


def _vocab_sizes(
    schema: Schema, arrays: Mapping[str, Mapping[str, object]], files: Mapping[str, Path]
) -> dict[str, int]:
    """max id + 1 over all splits; with declared sizes (schema.json), an id beyond them is a DataError."""
    maxima = np.zeros(len(schema.sparse), dtype=np.int64)
    for a in arrays.values():
        sp = a["sparse"]
        assert isinstance(sp, np.ndarray)
        if len(sp):
            maxima = np.maximum(maxima, sp.max(axis=0))
    computed = {col: int(maxima[j]) + 1 for j, col in enumerate(schema.sparse)}
    if schema.vocab_sizes is None:
        return computed
    for j, col in enumerate(schema.sparse):
        size = schema.vocab_sizes[col]
        if computed[col] > size:
            for split, a in arrays.items():
                sp = a["sparse"]
                assert isinstance(sp, np.ndarray)
                over = sp[:, j] >= size
                if over.any():
                    i = _first(over)
                    raise _fail(files[split], col, i, f"id {sp[i, j]} is outside the declared vocabulary size {size}")
    return dict(schema.vocab_sizes)


def _to_split(a: Mapping[str, object], truth: Mapping[str, np.ndarray] | None = None) -> Split:
    labels = a["labels"]
    groups = a["groups"]
    assert isinstance(labels, dict)
    return Split(
        sparse=torch.from_numpy(np.ascontiguousarray(a["sparse"], dtype=np.int64)),
        dense=torch.from_numpy(np.ascontiguousarray(a["dense"], dtype=np.float32)),
        labels={k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in labels.items()},
        groups=None if groups is None else torch.from_numpy(np.ascontiguousarray(groups, dtype=np.int64)),
        truth=None
        if truth is None
        else {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in truth.items()},
    )


# --- synthetic data -------------------------------------------------------------------------------

# Note [Synthetic data]
# The default dataset has Ali-CCP's fields and labels but planted, learnable structure:
# - 500 users (field 101) and 250 items (205) with lognormal popularity, so 100k rows give ~200 rows
#   per user and ~400 per item. Every user/item has a rank-4 latent vector: mostly its cluster's vector
#   (one of 8 user segments / 20 item categories: 0.95) plus a small individual part (0.31).
# - click logit = b_click + 1.1 aff(u, i) + user activity + item bias + position (field 301) + city,
#   aff = <p_u, q_i> scaled to unit variance over impressions. A purchase happens only after a click:
#   P(purchase | click) = sigmoid(b_buy + 1.2 aff'(u, i) + item quality), with p'_u = 0.9 p_u + noise for
#   most users but p'_u = -0.9 p_u + noise for the ~35% *conflicting* users (what they click is what
#   they would not buy: STEM's task conflict). Field 128 shows the conflict flag for 85% of users.
# - b_click and b_buy are solved per seed so that P(click) = 6% and P(purchase | click) = 15% (purchase 0.9%).
# - profile fields (121..129, 109_14..150_14) are functions of the user, item fields (206..216) of the
#   item, so they carry the cluster signal; 508/509/853 are user x item crosses, 702 is noise, and the
#   dense D* columns are noisy summaries in [0, 1].
# Bayes AUCs (AUC of the true probabilities), seeds 0-7: click 0.80-0.82, purchase 0.88-0.93,
# purchase given click 0.80-0.87.

_RANK = 4
_SEGMENTS = 8
_CLUSTER = 0.95  # weight of the segment/category vector in a user/item latent vector
_OWN = 0.31  # weight of the individual part (0.95**2 + 0.31**2 ~ 1)
_CONFLICT_SHARE = 0.35
_CLICK_RATE = 0.06
_BUY_GIVEN_CLICK = 0.15
_CLICK_SCALE = 1.1
_BUY_SCALE = 1.2
_POSITION_EFFECT = np.array([0.3, 0.0, -0.3])
_CITY_EFFECT = np.array([0.15, 0.05, -0.05, -0.15])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _standardise(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x scaled to unit w-weighted standard deviation (so the Bayes AUC hardly varies with the seed)."""
    mean = float((w * x).sum() / w.sum())
    std = math.sqrt(float((w * (x - mean) ** 2).sum() / w.sum()))
    return x / std


def _solve_bias(logits: np.ndarray, weights: np.ndarray, target: float, scale: np.ndarray | None = None) -> float:
    """b with sum(w * scale * sigmoid(logits + b)) = target * sum(w * scale), by Newton's method."""
    w = weights if scale is None else weights * scale
    w = w / w.sum()
    b = math.log(target / (1 - target))
    for _ in range(50):
        s = _sigmoid(logits + b)
        f = float((w * s).sum()) - target
        step = f / max(float((w * s * (1 - s)).sum()), 1e-12)
        b -= step
        if abs(step) < 1e-10:
            break
    return b


def _generate(rows: int, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Columns (schema order, plus labels) and the truth of `rows` synthetic rows; see Note [Synthetic data]."""
    v = SYNTHETIC_VOCAB
    rng = np.random.default_rng(seed)
    n_users, n_items, n_cats = v["101"], v["205"], v["206"]
    # world: users and items
    seg_f = rng.normal(size=(_SEGMENTS, _RANK))
    cat_f = rng.normal(size=(n_cats, _RANK))
    seg = rng.integers(0, _SEGMENTS, n_users)
    cat = rng.integers(0, n_cats, n_items)
    p = _CLUSTER * seg_f[seg] + _OWN * rng.normal(size=(n_users, _RANK))
    q = _CLUSTER * cat_f[cat] + _OWN * rng.normal(size=(n_items, _RANK))
    conflict = rng.random(n_users) < _CONFLICT_SHARE
    sign = np.where(conflict, -1.0, 1.0)
    p_buy = 0.9 * sign[:, None] * p + 0.45 * rng.normal(size=(n_users, _RANK))
    q_buy = 0.9 * q + 0.45 * rng.normal(size=(n_items, _RANK))
    activity = rng.normal(0.0, 0.4, n_users)
    item_bias = rng.normal(0.0, 0.4, n_items)
    shop = rng.integers(0, v["207"], n_items)
    quality = rng.normal(0.0, 0.25, v["207"])[shop] + rng.normal(0.0, 0.2, n_items)
    user_w = rng.lognormal(0.0, 0.5, n_users)
    item_w = rng.lognormal(0.0, 0.7, n_items)
    user_w /= user_w.sum()
    item_w /= item_w.sum()
    city = rng.integers(0, v["129"], n_users)

    # biases for the target rates, exact over the user x item x position grid
    grid_w = user_w[:, None] * item_w[None, :]
    aff = _standardise(p @ q.T, grid_w)  # (U, I) user-item click preference, unit variance over impressions
    aff_buy = _standardise(p_buy @ q_buy.T, grid_w)
    base = _CLICK_SCALE * aff + activity[:, None] + item_bias[None, :] + _CITY_EFFECT[city][:, None]
    pos = _POSITION_EFFECT[None, None, :]
    b_click = _solve_bias((base[..., None] + pos).ravel(), np.repeat(grid_w.ravel(), 3), _CLICK_RATE)
    p_click_grid = _sigmoid(base[..., None] + pos + b_click).mean(axis=2)  # positions are uniform
    buy_logit = _BUY_SCALE * aff_buy + quality[None, :]
    b_buy = _solve_bias(buy_logit.ravel(), grid_w.ravel(), _BUY_GIVEN_CLICK, scale=p_click_grid.ravel())

    # user profile and behaviour fields: functions of the user
    seg_obs = np.where(rng.random(n_users) < 0.9, seg, rng.integers(0, _SEGMENTS, n_users))
    gender = np.where(rng.random(n_users) < 0.9, seg % 2, 1 - seg % 2)
    age = (seg // 2 + rng.integers(0, 4, n_users)) % v["125"]
    level = np.digitize(activity, np.quantile(activity, [1 / 3, 2 / 3]))
    depth = rng.integers(0, v["127"], n_users)
    occupation = np.where(rng.random(n_users) < 0.85, conflict.astype(np.int64), 1 - conflict.astype(np.int64))
    fav_click = np.argmax(p @ cat_f.T, axis=1)
    fav_buy = np.argmax(p_buy @ cat_f.T, axis=1)
    user_cols = {
        "121": seg_obs,
        "122": gender * v["125"] + age,
        "124": gender,
        "125": age,
        "126": level,
        "127": depth,
        "128": occupation,
        "129": city,
        "109_14": fav_click,
        "110_14": fav_buy,
        "127_14": fav_click * 4 + rng.integers(0, 4, n_users),
        "150_14": fav_buy * 2 + rng.integers(0, 2, n_users),
    }
    user_dense = {
        "D109_14": np.clip(_sigmoid(0.5 * (p * cat_f[fav_click]).sum(1)) + rng.normal(0, 0.1, n_users), 0, 1),
        "D110_14": _sigmoid(2.0 * activity + rng.normal(0.0, 0.5, n_users)),
        "D127_14": 0.3 * rng.random(n_users),
        "D150_14": _sigmoid(sign + rng.normal(0.0, 1.0, n_users)),
    }
    # item fields: functions of the item
    brand = cat * 4 + rng.integers(0, 4, n_items)
    item_cols = {
        "206": cat,
        "207": shop,
        "210": cat * 2 + rng.integers(0, 2, n_items),
        "216": brand,
    }
    popularity = np.argsort(np.argsort(item_w)) / (n_items - 1)

    # rows
    u = rng.choice(n_users, size=rows, p=user_w)
    i = rng.choice(n_items, size=rows, p=item_w)
    position = rng.integers(0, 3, rows)
    click_logit = b_click + base[u, i] + _POSITION_EFFECT[position]
    buy_logit_rows = b_buy + buy_logit[u, i]
    p_click = _sigmoid(click_logit)
    p_buy_click = _sigmoid(buy_logit_rows)
    click = rng.random(rows) < p_click
    purchase = click & (rng.random(rows) < p_buy_click)

    cols: dict[str, np.ndarray] = {"click": click.astype(np.float32), "purchase": purchase.astype(np.float32)}
    cols["101"] = u
    for name in ("121", "122", "124", "125", "126", "127", "128", "129"):
        cols[name] = user_cols[name][u]
    cols["205"] = i
    for name in ("206", "207", "210", "216"):
        cols[name] = item_cols[name][i]
    cols["508"] = seg_obs[u] * n_cats + cat[i]
    cols["509"] = age[u] * 10 + brand[i] % 10
    cols["702"] = (u * 31 + i * 17) % v["702"]
    cols["853"] = city[u] * n_cats + cat[i]
    cols["301"] = position
    for name in ("109_14", "110_14", "127_14", "150_14"):
        cols[name] = user_cols[name][u]
    for name, values in user_dense.items():
        cols[name] = values[u]
    cross = np.einsum("rk,rk->r", seg_f[seg[u]], cat_f[cat[i]]) / math.sqrt(_RANK)
    cols["D508"] = _sigmoid(0.5 * cross + rng.normal(0.0, 1.0, rows))  # noisy segment x category affinity
    cols["D509"] = popularity[i]
    cols["D702"] = rng.random(rows)
    cols["D853"] = np.where(rng.random(rows) < 0.6, 0.0, _sigmoid(3.0 * quality[i] + rng.normal(0.0, 0.5, rows)))
    truth = {
        "p_click": p_click,
        "p_purchase_given_click": p_buy_click,
        "p_purchase": p_click * p_buy_click,
        "click_affinity": aff[u, i],
        "purchase_affinity": aff_buy[u, i],
        "conflict": conflict[u].astype(np.float32),
    }
    return cols, truth


def synthetic_truth(rows: int = SYNTHETIC_ROWS, seed: int = 0) -> dict[str, np.ndarray]:
    """The planted truth of each synthetic row, in generation order (train, then val, then test rows).

    p_click, p_purchase_given_click, p_purchase = p_click * p_purchase_given_click: the true probabilities
    (their AUC is the Bayes AUC); click_affinity / purchase_affinity: the user-item preference terms;
    conflict: 1 where the row's user has conflicting click and purchase preferences.
    """
    return _generate(rows, seed)[1]


def _split_sizes(rows: int) -> tuple[int, int, int]:
    n_train = int(rows * 0.8)
    n_val = int(rows * 0.1)
    return n_train, n_val, rows - n_train - n_val


def _load_synthetic(rows: int, seed: int) -> Dataset:
    if rows < 10:
        raise ValueError(f"the synthetic dataset needs at least 10 rows, got {rows}")
    schema = KNOWN_DATASETS["synthetic"].schema
    cols, truth = _generate(rows, seed)
    arrays = {
        "sparse": np.stack([cols[c] for c in schema.sparse], axis=1).astype(np.int64),
        "dense": np.stack([cols[c] for c in schema.dense], axis=1).astype(np.float32),
    }
    labels = {c: cols[c] for c in schema.labels}
    groups = cols["101"].astype(np.int64)
    n_train, n_val, _ = _split_sizes(rows)
    bounds = {"train": slice(0, n_train), "val": slice(n_train, n_train + n_val), "test": slice(n_train + n_val, rows)}
    splits = {
        name: _to_split(
            {
                "sparse": arrays["sparse"][s],
                "dense": arrays["dense"][s],
                "labels": {c: y[s] for c, y in labels.items()},
                "groups": groups[s],
            },
            {k: x[s] for k, x in truth.items()},
        )
        for name, s in bounds.items()
    }
    return Dataset(
        schema=schema,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        source="synthetic",
        notes=(f"synthetic: {rows} rows (80/10/10), seed {seed}",),
    )
