"""List fields in data folders: Parquet list columns -> the column store's CSR files -> batches (Note [List
columns], Note [Column store], Note [List batches]), bad list data, and a list spec trained end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from list_data import shop_folder, shop_spec, shop_table
from test_store import _rss, assert_resume_is_exact

from mtldsl.catalog import DataError, infer_schema, schema_for
from mtldsl.runtime import data as data_mod
from mtldsl.runtime import store
from mtldsl.runtime.data import load_dataset
from mtldsl.runtime.distributed import shard_batches
from mtldsl.runtime.store import ColumnFile, open_store

ROWS_SCHEMA = {"name": "rows", "labels": ["click"], "sparse": ["row"], "dense": [], "lists": ["xs", "ys"],
               "list_weights": {"xs": "xs_w"}, "user_id": None}


def _rows_table(n: int, seed: int = 0) -> tuple[pa.Table, list[list[int]], list[list[float]], list[list[int]]]:
    """`row` = the row number, so a batch says which rows it holds; xs weighted, ys not; some lists empty."""
    rng = np.random.default_rng(seed)
    xs = [rng.integers(0, 300, rng.integers(0, 6)).tolist() for _ in range(n)]
    ws = [(rng.random(len(x)) + 0.25).astype(np.float32).tolist() for x in xs]
    ys = [rng.integers(0, 9, rng.integers(0, 3)).tolist() for _ in range(n)]
    table = pa.table({"click": (np.arange(n) % 2).astype(np.int8), "row": np.arange(n),
                      "xs": pa.array(xs, pa.list_(pa.int64())), "xs_w": pa.array(ws, pa.list_(pa.float32())),
                      "ys": pa.array(ys, pa.list_(pa.int16()))})
    return table, xs, ws, ys


def _folder(at: Path, train: pa.Table, test: pa.Table | None = None, schema: dict[str, object] | None = None,
            **write: object) -> Path:
    at.mkdir(parents=True, exist_ok=True)
    (at / "schema.json").write_text(json.dumps(schema or ROWS_SCHEMA))
    pq.write_table(train, at / "train.parquet", **write)  # type: ignore[arg-type]
    pq.write_table(train if test is None else test, at / "test.parquet", **write)  # type: ignore[arg-type]
    return at


def test_list_fields_are_stored_as_narrow_csr_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "CHUNK_ROWS", 7)  # several chunks and row groups: offsets carry across them
    table, xs, ws, ys = _rows_table(100)
    folder = _folder(tmp_path / "d", table, row_group_size=30)
    st = open_store(folder / "train.parquet", schema_for(str(folder)), None, tmp_path / "cache")
    xs_col, ys_col = st.lists["xs"], st.lists["ys"]
    assert all(isinstance(p, ColumnFile) for p in (xs_col.ids, xs_col.offsets, xs_col.weights, ys_col.ids))
    assert ys_col.weights is None
    assert np.asarray(xs_col.ids).dtype == np.int16 and np.asarray(ys_col.ids).dtype == np.uint8  # narrowest
    assert np.asarray(xs_col.offsets).tolist() == [0, *np.cumsum([len(x) for x in xs]).tolist()]
    assert np.asarray(xs_col.ids).tolist() == [i for x in xs for i in x]
    assert np.asarray(xs_col.weights).tolist() == [w for x in ws for w in x]
    assert np.asarray(ys_col.offsets).tolist() == [0, *np.cumsum([len(y) for y in ys]).tolist()]
    assert st.max_ids["xs"] == max(i for x in xs for i in x) and st.max_ids["ys"] == max(i for y in ys for i in y)


def _check_batches(batches: list[dict[str, object]], xs: list[list[int]], ws: list[list[float]],
                   ys: list[list[int]]) -> list[int]:
    """Every batch's lists are its rows' lists, in the batch's row order, offsets starting at 0."""
    seen: list[int] = []
    for b in batches:
        rows = b["sparse"][:, 0].tolist()  # type: ignore[index]
        for f, source in (("xs", xs), ("ys", ys)):
            ids, offsets = b[f"{f}.ids"], b[f"{f}.offsets"]  # type: ignore[index]
            assert ids.dtype == torch.int64 and offsets.dtype == torch.int64 and offsets.shape == (len(rows),)
            ends = [*offsets.tolist()[1:], len(ids)]
            assert [ids[a:e].tolist() for a, e in zip(offsets.tolist(), ends)] == [source[r] for r in rows]
        w, off = b["xs.weights"], b["xs.offsets"].tolist()  # type: ignore[index]
        assert w.dtype == torch.float32
        assert [w[a:e].tolist() for a, e in zip(off, [*off[1:], len(w)])] == [ws[r] for r in rows]
        assert "ys.weights" not in b  # type: ignore[operator]
        seen += rows
    return seen


def test_batches_carry_each_rows_lists_in_the_shuffled_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows of blocks, a held-out val (an index), resume's skip, streaming and DDP shards (Note [List batches])."""
    monkeypatch.setattr(data_mod, "BLOCK_ROWS", 16)
    monkeypatch.setattr(data_mod, "WINDOW_BLOCKS", 3)
    table, xs, ws, ys = _rows_table(300)
    (tmp_path / "d").mkdir()
    pq.write_table(table, tmp_path / "d" / "train.parquet")  # no val file: val is an index into train
    ds = _folder(tmp_path / "d", table)
    dataset = load_dataset(str(ds))
    train, val = dataset.train, dataset.val
    assert train.index is not None and dataset.schema.vocab_sizes["xs"] == max(i for x in xs for i in x) + 1
    order = _check_batches(list(train.batches(32, shuffle=True, generator=torch.Generator().manual_seed(3))), xs, ws, ys)
    assert sorted(order) == sorted(train.index.tolist()) and order != sorted(order)
    assert sorted(_check_batches(list(val.batches(10, shuffle=False)), xs, ws, ys)) == sorted(val.index.tolist())
    full = list(train.batches(32, shuffle=True, generator=torch.Generator().manual_seed(3)))
    resumed = list(train.batches(32, shuffle=True, generator=torch.Generator().manual_seed(3), skip=4))
    streamed = list(data_mod.replace(train, stream_to=torch.device("cpu")).batches(  # pinned + non_blocking on CUDA
        32, shuffle=True, generator=torch.Generator().manual_seed(3)))
    for a, b in zip(full[4:], resumed, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("xs.ids", "xs.offsets", "xs.weights", "ys.ids", "ys.offsets"))
    for a, b in zip(full, streamed, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("xs.ids", "xs.offsets", "xs.weights", "ys.ids"))
    for rank in (0, 1):  # a rank's shard is its half of each global batch, lists included
        shards = list(shard_batches(train, 16, rank, 2, torch.Generator().manual_seed(3)))
        _check_batches(shards, xs, ws, ys)
        whole = len(train) // 32  # global batches of the full size (the last one is cut differently)
        assert [s["sparse"][:, 0].tolist() for s in shards[:whole]] == \
            [g["sparse"][rank * 16:(rank + 1) * 16, 0].tolist() for g in full[:whole]]


def test_lists_moved_whole_give_the_same_batches(tmp_path: Path) -> None:
    """Split.to's list columns (the split's rows, here through the val index, as tensors): same batches."""
    table, xs, ws, ys = _rows_table(120)
    (tmp_path / "d").mkdir()
    dataset = load_dataset(str(_folder(tmp_path / "d", table)))
    val = dataset.val
    moved = data_mod.replace(val, index=None, sparse_cols={k: val.sparse for k in val.sparse_cols},
                             label_cols={k: v for k, v in val.labels.items()}, list_cols=val.moved_lists("cpu"))
    assert all(isinstance(lc.ids, torch.Tensor) for lc in moved.list_cols.values())
    for a, b in zip(val.batches(7, shuffle=False), moved.batches(7, shuffle=False), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("xs.ids", "xs.offsets", "xs.weights", "ys.ids", "ys.offsets"))
    offsets, ids, weights = val.bags("xs")
    rows = val.index.tolist()
    assert offsets.tolist() == [0, *np.cumsum([len(xs[r]) for r in rows]).tolist()]
    assert ids.tolist() == [i for r in rows for i in xs[r]] and weights.tolist() == [w for r in rows for w in ws[r]]
    without = data_mod.replace(val, list_cols={})
    assert val.nbytes > without.nbytes  # lists count in what moving the split to a device would take


def _bad(rows: dict[str, object], types: dict[str, pa.DataType] | None = None) -> pa.Table:
    """Three rows of ROWS_SCHEMA's columns, with `rows` overriding some."""
    cols: dict[str, object] = {"click": [0, 1, 0], "row": [0, 1, 2], "xs": [[1, 2], [], [3]],
                               "xs_w": [[0.5, 1.0], [], [2.0]], "ys": [[1], [2], []]}
    cols.update(rows)
    types = {"xs": pa.list_(pa.int64()), "xs_w": pa.list_(pa.float32()), "ys": pa.list_(pa.int64()), **(types or {})}
    return pa.table({k: pa.array(v, types.get(k)) for k, v in cols.items()})


BAD_LISTS = [
    ({"xs_w": [[0.5, 1.0], [], [2.0, 1.0]]}, None, "column 'xs_w', row 3: 2 weight(s) for 1 id(s) in 'xs': "
                                                   "a weights list has one weight per id"),
    ({"xs": [[1, 2], [], [-3]]}, None, "column 'xs', row 3: expected non-negative integer ids, got -3"),
    ({"row": [[], [1], [2]]}, {"row": pa.list_(pa.int64())},
     "column 'row', row 1: an empty list where a value is required (a single-valued column; a list field is "
     "named under 'lists' in schema.json)"),
    ({"row": [[0], [1, 5], [2]]}, {"row": pa.list_(pa.int64())},
     "column 'row', row 1: expected one value, got a list of 1 (a list field is named under 'lists' in schema.json)"),
    ({"xs_w": [["a", "b"], [], ["c"]]}, {"xs_w": pa.list_(pa.string())},
     "column 'xs_w', row 1: expected a list of numbers (Parquet list<float>), got a Parquet column of type "
     "list<string>"),
    ({"xs_w": [0.5, 1.0, 2.0]}, {"xs_w": pa.float64()},
     "column 'xs_w', row 1: expected a list of numbers (Parquet list<float>), got a Parquet column of type double"),
    ({"xs": [["1", "2"], [], ["3"]]}, {"xs": pa.list_(pa.string())},
     "column 'xs', row 1: expected a list of integer ids (Parquet list<int>), got a Parquet column of type "
     "list<string>"),
    ({"ys": [[1], None, []]}, None, "column 'ys', row 2: missing list (write an empty list for a row without ids)"),
    ({"ys": [[1], [2, None], []]}, None, "column 'ys', row 2: missing value inside the list"),
    ({"xs_w": [[0.5, float("nan")], [], [2.0]]}, None, "column 'xs_w', row 1: expected finite weights, got nan"),
]


@pytest.mark.parametrize(("rows", "types", "message"), BAD_LISTS, ids=[m.split(": ")[1][:40] for *_, m in BAD_LISTS])
def test_bad_list_data_names_file_column_and_row(tmp_path: Path, rows: dict[str, object],
                                                 types: dict[str, pa.DataType] | None, message: str) -> None:
    folder = _folder(tmp_path / "d", _rows_table(4)[0], _bad(rows, types))
    with pytest.raises(DataError) as e:
        load_dataset(str(folder))
    assert str(e.value) == f"{folder / 'test.parquet'}: {message}"
    assert "\n" not in str(e.value)


def test_list_ids_beyond_the_declared_vocabulary_name_their_row(tmp_path: Path) -> None:
    vocab = {"row": 10, "xs": 10, "ys": 10}
    folder = _folder(tmp_path / "d", _bad({"xs": [[1, 2], [], [4, 12]], "xs_w": [[1.0, 1.0], [], [1.0, 1.0]]}),
                     schema={**ROWS_SCHEMA, "vocab_sizes": vocab})
    with pytest.raises(DataError) as e:
        load_dataset(str(folder))
    assert str(e.value) == f"{folder / 'train.parquet'}: column 'xs', row 3: id 12 is outside the declared " \
                           "vocabulary size 10"


def test_csv_with_list_fields_is_refused_with_the_way_out(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "schema.json").write_text(json.dumps(ROWS_SCHEMA))
    for split in ("train", "test"):
        (folder / f"{split}.csv").write_text("click,row,xs,xs_w,ys\n0,0,1|2,1|1,3\n")
    with pytest.raises(DataError) as e:
        load_dataset(str(folder))
    assert str(e.value) == (f"{folder / 'train.csv'}: list field(s) 'xs', 'ys' need a Parquet file: CSV has no list "
                            "type (write list<int> ids and list<float> weights to Parquet; Note [List columns])")


def test_inference_finds_list_fields_and_their_weights(tmp_path: Path) -> None:
    folder = shop_folder(tmp_path / "d", schema=False)
    schema = infer_schema(folder)
    assert schema.lists == ("clicked_items", "tags", "109_14")
    assert schema.list_weights == {"clicked_items": "clicked_items_w"}
    assert schema.sparse == ("user_id", "item_id", "city") and schema.dense == ("price",)
    pq.write_table(shop_table(5, 0).append_column("odd", pa.array([[0.5]] * 5)), folder / "train.parquet")
    with pytest.raises(DataError, match=r"column 'odd' holds lists of double: a list column is a list field"):
        infer_schema(folder)


# --- a spec that pools lists, end to end -------------------------------------------------------------------


def test_a_list_spec_trains_evaluates_predicts_and_exports(tmp_path: Path) -> None:
    """tests/golden/shop_lists.mtl (weighted mean and sum, mean with copies, max) on a Parquet folder with lists."""
    from mtldsl.runtime import export, trainer

    folder = shop_folder(tmp_path / "data")
    spec = shop_spec(folder, tmp_path)
    result = trainer.train(spec, out=tmp_path / "run", epochs=3, batch_size=64, seed=1, progress=False, device="cpu")
    ctr = result.metrics["tasks"]["ctr"]  # test metrics
    assert ctr["auc"] > 0.6  # clicks follow the clicked items' ids: the pooled lists carry the signal
    saved = torch.load(result.run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["vocab_sizes"]
    tables = [pq.read_table(folder / f"{s}.parquet") for s in ("train", "val", "test")]
    for f in ("clicked_items", "tags", "109_14"):  # list fields' vocabularies are saved with the run
        assert saved[f] == max(max(i for ids in t.column(f).to_pylist() for i in ids) for t in tables) + 1
    again = trainer.evaluate(result.run_dir)
    assert again.metrics["ctr"]["auc"] == pytest.approx(ctr["auc"])
    preds = pd.read_parquet(trainer.predict(result.run_dir, tmp_path / "p.parquet"))
    assert len(preds) == 200 and preds["ctcvr"].between(0, 1).all()
    assert preds["ctcvr"].to_numpy() == pytest.approx(preds["ctr"].to_numpy() * preds["cvr"].to_numpy(), rel=1e-5)
    exported = export.export_run(result.run_dir, "torchscript")
    assert exported.max_abs_diff <= exported.tolerance


def test_evaluating_other_data_refuses_list_ids_beyond_the_trained_vocabulary(tmp_path: Path) -> None:
    from mtldsl.runtime import trainer

    folder = shop_folder(tmp_path / "data")
    result = trainer.train(shop_spec(folder, tmp_path), out=tmp_path / "run", epochs=1, batch_size=64,
                           progress=False, device="cpu")
    other = shop_folder(tmp_path / "other", {"train": 50, "test": 50})
    table = pq.read_table(other / "test.parquet")
    tags = table.column("tags").to_pylist()
    tags[6] = [1, 99]
    pq.write_table(table.set_column(table.schema.get_field_index("tags"), "tags", pa.array(tags, pa.list_(pa.int32()))),
                   other / "test.parquet")
    with pytest.raises(DataError) as e:
        trainer.evaluate(result.run_dir, data=str(other))
    assert "column 'tags', row 7: id 99 is outside the model's vocabulary" in str(e.value)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_reading_list_fields_keeps_their_ids_off_the_heap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading every batch of a stored split with lists holds a window of ids (Note [List batches]), not the split's."""
    n, per_row = 400_000, 12
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 2 * per_row + 1, n)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    total = int(lengths.sum())
    table = pa.table({"click": rng.integers(0, 2, n, dtype=np.int8), "row": np.arange(n, dtype=np.int32),
                      "xs": pa.ListArray.from_arrays(offsets, pa.array(rng.integers(0, 50_000, total, dtype=np.int32))),
                      "xs_w": pa.ListArray.from_arrays(offsets, pa.array(rng.random(total, dtype=np.float32))),
                      "ys": pa.ListArray.from_arrays(offsets, pa.array(rng.integers(0, 100, total, dtype=np.int32)))})
    folder = _folder(tmp_path / "big", table, table.slice(0, 1000), row_group_size=100_000)
    del table, offsets
    load_dataset(str(folder))  # builds the store (bounded by CHUNK_ROWS; not measured here)
    monkeypatch.setattr(data_mod, "BLOCK_ROWS", 1 << 12)
    monkeypatch.setattr(data_mod, "WINDOW_BLOCKS", 4)
    before = _rss()
    ds = load_dataset(str(folder))
    peak = seen = ids = 0
    for batch in ds.train.batches(4096, shuffle=True, generator=torch.Generator().manual_seed(0)):
        seen += len(batch["sparse"])
        ids += len(batch["xs.ids"])
        peak = max(peak, _rss() - before)
    assert seen == len(ds.train) and ids == int(ds.train.bags("xs")[0][-1])
    resident = ids * (8 + 4 + 8) + seen * 16  # the split's ids and weights as batch tensors: ~100 MB
    assert peak < resident / 4, (peak, resident)


def test_resume_mid_epoch_with_lists_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Note [Resume] through Note [List batches]: small windows, a held-out val, killed mid epoch, resumed."""
    monkeypatch.setattr(data_mod, "BLOCK_ROWS", 64)
    monkeypatch.setattr(data_mod, "WINDOW_BLOCKS", 3)
    folder = shop_folder(tmp_path / "data", {"train": 900, "test": 100})  # no val file: val is an index
    spec = shop_spec(folder, tmp_path)
    kw = dict(epochs=2, seed=5, batch_size=50, checkpoint_every=4, progress=False, device="cpu")
    assert_resume_is_exact(spec, kw, tmp_path, monkeypatch, at=6)  # mid epoch 2 (17 batches), windows in
