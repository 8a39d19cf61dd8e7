"""runtime/store.py (the on-disk column store: values, dtypes, rebuilds, atomic builds, where it lives) and
data.py's out-of-core reading (Note [Block shuffle], rows not resident)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mtldsl import catalog
from mtldsl.catalog import DataError, schema_for
from mtldsl.runtime import data as data_mod
from mtldsl.runtime import store
from mtldsl.runtime.data import Split, epoch_chunks, load_dataset
from mtldsl.runtime.distributed import shard_batches
from mtldsl.runtime.store import ColumnFile, open_store

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FOLDERS = {"ali_ccp": "ali-ccp", "census_income": "census-income", "aliexpress": "aliexpress"}
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared samples not at {SHARED}")


def _same_values(st: store.Stored, frame: pd.DataFrame, schema: catalog.Schema) -> None:
    assert st.n == len(frame)
    for col in schema.sparse:
        np.testing.assert_array_equal(np.asarray(st.sparse[col]), frame[col].to_numpy())
        assert st.max_ids[col] == int(frame[col].max())
    for col in schema.dense:
        np.testing.assert_array_equal(np.asarray(st.dense[col]), frame[col].to_numpy(dtype=np.float32))
    for col in schema.labels:
        np.testing.assert_array_equal(np.asarray(st.labels[col]), frame[col].to_numpy(dtype=np.float32))
    if schema.user_id is not None:
        assert st.groups is not None
        np.testing.assert_array_equal(np.asarray(st.groups), frame[schema.user_id].to_numpy())


@needs_shared
@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_store_round_trips_every_value_of_the_samples(name: str, tmp_path: Path) -> None:
    schema = schema_for(name)
    folder = SHARED / FOLDERS[name]
    for path in catalog.find_split_files(folder, name).values():
        st = open_store(path, schema, None, tmp_path)
        _same_values(st, pd.read_csv(path), schema)
        assert all(isinstance(c, ColumnFile) for c in [*st.sparse.values(), *st.dense.values()])


@needs_shared
def test_store_round_trips_a_parquet_folder(tmp_path: Path) -> None:
    schema = schema_for("ali_ccp")
    frame = pd.read_csv(SHARED / "ali-ccp" / "ali_ccp_train_sample.csv")
    frame.to_parquet(tmp_path / "train.parquet")
    monkey_chunk = store.CHUNK_ROWS
    try:
        store.CHUNK_ROWS = 7  # several chunks: offsets, maxima and dtypes carry across them
        st = open_store(tmp_path / "train.parquet", schema, None, tmp_path / "cache")
    finally:
        store.CHUNK_ROWS = monkey_chunk
    _same_values(st, frame, schema)


def _toy(folder: Path, frame: pd.DataFrame, schema: dict[str, object]) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "schema.json").write_text(json.dumps(schema))
    frame.to_csv(folder / "train.csv", index=False)
    frame.to_csv(folder / "test.csv", index=False)
    return folder


WIDE = {"name": "wide", "labels": ["click", "price"], "sparse": ["small", "mid", "big", "huge"],
        "dense": ["x"], "user_id": "session"}


def _wide_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "small": [0, 255, 3], "mid": [0, 256, 32767], "big": [0, 70_000, 2**31 - 1], "huge": [0, 2**31, 5],
        "x": [0.5, 1.5, -2.0], "click": [0, 1, 1], "price": [0.0, 3.5, 1.0], "session": [-4, 300, 7],
    })


def test_ids_take_the_narrowest_type(tmp_path: Path) -> None:
    frame = _wide_frame()
    st = open_store(_toy(tmp_path / "d", frame, WIDE) / "train.csv", catalog.schema_for(str(tmp_path / "d")), None,
                    tmp_path / "cache")
    assert {c: st.sparse[c].dtype for c in WIDE["sparse"]} == {  # type: ignore[union-attr]
        "small": np.uint8, "mid": np.int16, "big": np.int32, "huge": np.int64}
    assert st.dense["x"].dtype == np.float32
    assert st.labels["click"].dtype == np.uint8 and st.labels["price"].dtype == np.float32  # 0/1 vs any number
    assert st.groups is not None and st.groups.dtype == np.int16  # a group id that is no feature may be negative
    for col in ("small", "mid", "big", "huge"):
        np.testing.assert_array_equal(np.asarray(st.sparse[col]), frame[col].to_numpy())
    np.testing.assert_array_equal(np.asarray(st.groups), frame["session"].to_numpy())
    with pytest.raises(DataError, match=r"train\.csv: column 'big', row 3: id 2147483647 would make an embedding "
                                        r"table of 2147483648 rows \(32\.0 GiB per 4 dimensions of float32\), over "
                                        r"the limit of 134217728 rows; .* \"hash_ids\": \{\"big\": 1048576\}"):
        load_dataset(str(tmp_path / "d"))  # Note [Vocabulary bound]
    _toy(tmp_path / "d", frame, {**WIDE, "hash_ids": {"big": 1000, "huge": 2**27}})
    ds = load_dataset(str(tmp_path / "d"))
    assert ds.schema.vocab_sizes == {"small": 256, "mid": 32768, "big": 648, "huge": 6}  # largest hashed id + 1
    assert ds.test.sparse.dtype == torch.int64 and ds.test.sparse[:, 2].tolist() == [0, 70_000 % 1000, (2**31 - 1) % 1000]
    assert ds.test.sparse[:, 3].tolist() == [0, 2**31 % 2**27, 5]


GOOD = "uid,item,price,click\n1,2,0.5,0\n2,3,0.25,1\n3,4,1.0,0\n"
SCHEMA = {"name": "toy", "labels": ["click"], "sparse": ["uid", "item"], "dense": ["price"], "user_id": "uid"}


def _folder(tmp_path: Path, train: str = GOOD) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    (tmp_path / "train.csv").write_text(train)
    (tmp_path / "test.csv").write_text(GOOD)
    return tmp_path


def test_a_changed_source_rebuilds_the_store(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "d")
    assert load_dataset(str(folder)).test.dense[:, 0].tolist() == [0.5, 0.25, 1.0]
    (folder / "test.csv").write_text(GOOD.replace("0.25", "0.75"))  # same size: the mtime tells
    os.utime(folder / "test.csv", ns=(1, 1))
    assert load_dataset(str(folder)).test.dense[:, 0].tolist() == [0.5, 0.75, 1.0]
    (folder / "test.csv").write_text(GOOD + "4,5,2.0,1\n")
    assert load_dataset(str(folder)).test.dense[:, 0].tolist() == [0.5, 0.25, 1.0, 2.0]


def test_an_interrupted_build_publishes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _folder(tmp_path / "d")
    cache = tmp_path / "cache"
    calls = []
    real = store._chunk_arrays

    def flaky(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:  # pass 2, after pass 1 succeeded: the files are half written
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "_chunk_arrays", flaky)
    schema = catalog.schema_for(str(folder))
    with pytest.raises(KeyboardInterrupt):
        open_store(folder / "train.csv", schema, None, cache)
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".lock-")] == []  # no store, no temporary folder
    monkeypatch.setattr(store, "_chunk_arrays", real)
    assert open_store(folder / "train.csv", schema, None, cache).n == 3


def test_the_store_lives_in_the_user_cache_unless_mtldsl_wrote_the_folder(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Note [The user's folder]: a writable folder of the user's gets nothing written into it
    monkeypatch.delenv(store.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = _folder(tmp_path / "d")
    before = sorted(p.name for p in folder.iterdir())
    ds = load_dataset(str(folder))
    assert sorted(p.name for p in folder.iterdir()) == before
    [root] = (tmp_path / "xdg" / "mtldsl").iterdir()
    assert root.name.startswith("d-") and (root / "test.csv.all" / "manifest.json").is_file()
    assert ds.test.sparse.tolist() == [[1, 2], [2, 3], [3, 4]]
    prepared = _folder(tmp_path / "p")
    (prepared / store.PREPARED).write_text("{}")  # as `mtldsl data prepare` leaves it
    load_dataset(str(prepared))
    assert (prepared / store.CACHE_DIR / "train.csv.all" / "manifest.json").is_file()


def test_bad_values_beyond_the_first_chunk_name_their_file_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "CHUNK_ROWS", 2)
    folder = _folder(tmp_path / "d", GOOD + "4,5,n/a,1\n")
    with pytest.raises(catalog.DataError) as e:
        load_dataset(str(folder))
    assert str(e.value) == f"{folder / 'train.csv'}: column 'price', row 4: expected a number, got 'n/a'"


# --- Note [Block shuffle] ----------------------------------------------------------------------------


def _order(n: int, size: int, seed: int) -> list[int]:
    rows: list[int] = []
    for pieces in epoch_chunks(n, size, torch.Generator().manual_seed(seed)):
        for window, pos in pieces:
            flat = np.concatenate([np.arange(a, b) for a, b in window.ranges])
            rows.extend(flat[pos if isinstance(pos, slice) else pos.numpy()].tolist())
    return rows


def test_block_shuffle_visits_every_row_once_and_depends_only_on_seed_and_epoch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_mod, "BLOCK_ROWS", 16)
    monkeypatch.setattr(data_mod, "WINDOW_BLOCKS", 3)
    n = 1000
    first = _order(n, 64, seed=5)
    assert sorted(first) == list(range(n)) and first != list(range(n))
    assert _order(n, 64, seed=5) == first and _order(n, 100, seed=5) == first  # the batch size cuts, not draws
    assert _order(n, 64, seed=6) != first
    at = 0
    for window in data_mod._windows(n, torch.Generator().manual_seed(5)):  # the same draws, window by window
        assert len(window.ranges) <= 3  # a window is 3 blocks, its rows come only from them
        rows = first[at:at + len(window)]
        assert sorted(rows) == sorted(np.concatenate([np.arange(a, b) for a, b in window.ranges]).tolist())
        at += len(window)
    assert at == n


def test_batches_follow_the_block_order_and_skip_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_mod, "BLOCK_ROWS", 16)
    monkeypatch.setattr(data_mod, "WINDOW_BLOCKS", 2)
    idx = torch.arange(300)
    split = Split.from_tensors(torch.stack([idx, idx % 7], 1), idx[:, None].float(), {"y": (idx % 2).float()}, idx)
    rows = [b["sparse"][:, 0] for b in split.batches(32, shuffle=True, generator=torch.Generator().manual_seed(1))]
    assert torch.cat(rows).tolist() == _order(300, 32, 1)
    read = []
    real = Split._load

    def counting(self: Split, window: object) -> object:
        read.append(window)
        return real(self, window)  # type: ignore[arg-type]

    monkeypatch.setattr(Split, "_load", counting)
    resumed = [b["sparse"][:, 0] for b in split.batches(32, shuffle=True, generator=torch.Generator().manual_seed(1),
                                                        skip=5)]
    assert all(torch.equal(a, b) for a, b in zip(rows[5:], resumed, strict=True))
    assert len({id(w) for w in read}) < len(range(0, 300, 32))  # windows of skipped batches were never read
    for rank in (0, 1):  # DDP: rank r's shard is its block of each global batch of the same order
        shards = [b["sparse"][:, 0] for b in shard_batches(split, 16, rank, 2, torch.Generator().manual_seed(1))]
        assert all(torch.equal(s, g[rank * 16:(rank + 1) * 16]) for s, g in zip(shards, rows[:9]))


# --- rows are not resident ------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_reading_a_stored_split_keeps_its_rows_off_the_heap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resident memory while reading every batch is bounded by two windows (Note [Block shuffle]; made small
    here, 16Ki rows, ~2 MB), not by the split (the old int64/float32 tensors of these rows took ~130 MB)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, n_sparse, n_dense = 600_000, 23, 8
    rng = np.random.default_rng(0)
    folder = tmp_path / "big"
    folder.mkdir()
    cols = {f"f{j}": rng.integers(0, 40_000, n, dtype=np.int32) for j in range(n_sparse)}
    cols.update({f"d{j}": rng.random(n, dtype=np.float32) for j in range(n_dense)})
    cols["click"] = rng.integers(0, 2, n, dtype=np.int8)
    (folder / "schema.json").write_text(json.dumps({"name": "big", "labels": ["click"], "sparse": list(cols)[:n_sparse],
                                                    "dense": [f"d{j}" for j in range(n_dense)], "user_id": "f0"}))
    pq.write_table(pa.table(cols), folder / "train.parquet", row_group_size=100_000)
    pq.write_table(pa.table({k: v[:1000] for k, v in cols.items()}), folder / "test.parquet")
    del cols
    load_dataset(str(folder))  # builds the store (its memory is bounded by CHUNK_ROWS, not measured here)
    monkeypatch.setattr(data_mod, "BLOCK_ROWS", 1 << 12)
    monkeypatch.setattr(data_mod, "WINDOW_BLOCKS", 4)
    before = _rss()
    ds = load_dataset(str(folder))
    assert all(isinstance(c, ColumnFile) for c in ds.train.sparse_cols.values())
    peak = 0
    seen = 0
    for batch in ds.train.batches(4096, shuffle=True, generator=torch.Generator().manual_seed(0)):
        seen += len(batch["sparse"])
        peak = max(peak, _rss() - before)
    assert seen == len(ds.train)
    resident = len(ds.train) * (n_sparse * 8 + n_dense * 4 + 4 + 8)  # the old int64/float32 tensors: ~130 MB
    assert peak < resident / 4, (peak, resident)


def test_large_synthetic_data_is_generated_in_chunks_into_a_store(monkeypatch: pytest.MonkeyPatch) -> None:
    from mtldsl.runtime import synthetic

    monkeypatch.setattr(synthetic, "MEMORY_ROWS", 1000)
    monkeypatch.setattr(synthetic, "GENERATE_ROWS", 700)  # chunks straddle the split boundaries
    ds = load_dataset("synthetic", rows=3000, seed=1)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (2400, 300, 300)
    assert all(isinstance(c, ColumnFile) for c in ds.train.sparse_cols.values())
    assert ds.train.sparse_cols["205"].dtype == np.uint8 and ds.train.sparse_cols["101"].dtype == np.int16
    again = load_dataset("synthetic", rows=3000, seed=1)  # from the store, the same rows
    assert torch.equal(again.test.sparse, ds.test.sparse) and torch.equal(again.val.dense, ds.val.dense)
    assert not torch.equal(load_dataset("synthetic", rows=3000, seed=2).test.sparse, ds.test.sparse)
    vocab = torch.tensor([ds.schema.vocab_sizes[f] for f in ds.schema.sparse])  # type: ignore[index]
    for split in (ds.train, ds.val, ds.test):
        assert bool((split.sparse < vocab).all()) and torch.equal(split.groups, split.sparse[:, 0])
    click = ds.train.labels["click"]
    assert 0.02 < float(click.mean()) < 0.12 and bool((ds.train.labels["purchase"] <= click).all())


def test_resume_mid_epoch_on_a_stored_folder_in_small_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Note [Resume] through Note [Block shuffle]: many windows, a held-out val (index), skipped batches unread."""
    from mtldsl.runtime.synthetic import generate

    monkeypatch.setattr(data_mod, "BLOCK_ROWS", 64)
    monkeypatch.setattr(data_mod, "WINDOW_BLOCKS", 3)
    schema = catalog.KNOWN_DATASETS["synthetic"].schema
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "schema.json").write_text(catalog.schema_to_json(schema).replace('"synthetic"', '"stored"', 1))
    cols, _ = generate(2600, 0)
    frame = pd.DataFrame({c: cols[c] for c in schema.columns})
    frame.iloc[:2200].to_parquet(folder / "train.parquet")  # no val file: 10% of train is held out
    frame.iloc[2200:].to_parquet(folder / "test.parquet")
    spec = Path(__file__).resolve().parents[1] / "specs" / "esmm.mtl"
    kw = dict(data=str(folder), epochs=2, seed=5, batch_size=100, checkpoint_every=4, progress=False, device="cpu")
    assert_resume_is_exact(spec, kw, tmp_path, monkeypatch, at=12)  # mid epoch 2, windows in


def assert_resume_is_exact(spec: Path, kw: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *,
                           at: int) -> None:
    """A run killed at its first checkpoint from batch `at` of epoch 2 on and resumed ends as the uninterrupted one."""
    from mtldsl.runtime import trainer

    full = trainer.train(spec, out=tmp_path / "a", **kw)  # type: ignore[arg-type]

    class Killed(Exception):
        pass

    original = trainer.Trainer.save

    def save_then_die(self: trainer.Trainer, *, best: bool) -> None:
        original(self, best=best)
        if self.state.epoch == 1 and self.state.batch_in_epoch >= at:
            raise Killed

    monkeypatch.setattr(trainer.Trainer, "save", save_then_die)
    with pytest.raises(Killed):
        trainer.train(spec, out=tmp_path / "b", **kw)  # type: ignore[arg-type]
    monkeypatch.setattr(trainer.Trainer, "save", original)
    resumed = trainer.train(spec, out=tmp_path / "b", resume=True, progress=False)
    a = torch.load(full.run_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(resumed.run_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.metrics["tasks"] == resumed.metrics["tasks"]
