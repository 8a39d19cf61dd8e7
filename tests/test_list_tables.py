"""List tables (Note [List tables] in runtime/store.py): a folder keeps list fields once per entity in
`<split>.lists.parquet`, each split row names its row there, and the batches equal inline lists'."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import torch
from test_list_data import ROWS_SCHEMA, _check_batches

from mtldsl.catalog import DataError, infer_schema, list_table_path, schema_for, schema_from_json, schema_to_json
from mtldsl.runtime import data as data_mod
from mtldsl.runtime.data import load_dataset
from mtldsl.runtime.store import open_store

TABLE_SCHEMA = {**ROWS_SCHEMA, "list_rows": "entity"}
LIST_KEYS = ("xs.ids", "xs.offsets", "xs.weights", "ys.ids", "ys.offsets")


def _entities(k: int, seed: int) -> pa.Table:
    """k rows of lists: xs (weighted) and ys, some empty."""
    rng = np.random.default_rng(seed)
    xs = [rng.integers(0, 300, rng.integers(0, 6)).tolist() for _ in range(k)]
    ws = [(rng.random(len(x)) + 0.25).astype(np.float32).tolist() for x in xs]
    ys = [rng.integers(0, 9, rng.integers(0, 3)).tolist() for _ in range(k)]
    return pa.table({"xs": pa.array(xs, pa.list_(pa.int64())), "xs_w": pa.array(ws, pa.list_(pa.float32())),
                     "ys": pa.array(ys, pa.list_(pa.int16()))})


def _both(at: Path, n: int = 300, k: int = 40, seed: int = 0) -> tuple[Path, Path, pa.Table, np.ndarray]:
    """The same data twice: inline list columns, and a list table of k entities that the n rows share."""
    rng = np.random.default_rng(seed + 1)
    lists = _entities(k, seed)
    entity = rng.integers(0, k - 1, n)  # the table's last row is never used
    rows = pa.table({"click": (np.arange(n) % 2).astype(np.int8), "row": np.arange(n), "entity": entity})
    inline, tabled = at / "inline", at / "tabled"
    for folder, schema in ((inline, ROWS_SCHEMA), (tabled, TABLE_SCHEMA)):
        folder.mkdir(parents=True)
        (folder / "schema.json").write_text(json.dumps(schema))
    for split in ("train", "test"):
        pq.write_table(pa.Table.from_arrays([*rows.columns[:2], *lists.take(entity).columns],
                                            names=[*rows.column_names[:2], *lists.column_names]),
                       inline / f"{split}.parquet", row_group_size=70)
        pq.write_table(rows, tabled / f"{split}.parquet", row_group_size=70)
        pq.write_table(lists, tabled / f"{split}.lists.parquet", row_group_size=15)
    return inline, tabled, lists, entity


def test_a_list_table_gives_the_batches_of_inline_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_mod, "BLOCK_ROWS", 16)
    monkeypatch.setattr(data_mod, "WINDOW_BLOCKS", 3)
    inline, tabled, lists, entity = _both(tmp_path)
    a, b = load_dataset(str(inline)), load_dataset(str(tabled))
    assert b.schema.list_rows == "entity" and a.schema.vocab_sizes == b.schema.vocab_sizes
    xs, ws, ys = ([lists.column(c)[int(e)].as_py() for e in entity] for c in ("xs", "xs_w", "ys"))
    for split in ("train", "val", "test"):  # val: an index into train (a take of the list rows)
        for shuffle in (False, True):
            got = list(getattr(b, split).batches(32, shuffle=shuffle, generator=torch.Generator().manual_seed(5)))
            want = list(getattr(a, split).batches(32, shuffle=shuffle, generator=torch.Generator().manual_seed(5)))
            _check_batches(got, xs, ws, ys)
            for x, y in zip(got, want, strict=True):
                assert all(torch.equal(x[k], y[k]) for k in ("sparse", *LIST_KEYS)), split
        for f in ("xs", "ys"):
            assert all(torch.equal(x, y) for x, y in zip(getattr(a, split).bags(f)[:2], getattr(b, split).bags(f)[:2]))
    moved = b.val.to("meta").list_cols["xs"]  # moved whole: the split's own rows of the list, no table left
    assert moved.rows is None and moved.offsets.shape == (len(b.val) + 1,)
    assert b.test.nbytes == a.test.nbytes  # what moving it would take: its rows' lists, not the table


def test_a_folder_without_schema_json_finds_its_list_table(tmp_path: Path) -> None:
    inline, tabled, _, _ = _both(tmp_path)
    (tabled / "schema.json").unlink()
    for split in ("train", "test"):
        rows = pq.read_table(tabled / f"{split}.parquet")
        pq.write_table(rows.rename_columns(["click", "row", "list_row"]), tabled / f"{split}.parquet")
    schema = infer_schema(tabled)
    assert (schema.lists, dict(schema.list_weights), schema.list_rows) == (("xs", "ys"), {"xs": "xs_w"}, "list_row")
    assert schema.sparse == ("row",)
    got, want = next(load_dataset(str(tabled)).test.batches(50, shuffle=False)), \
        next(load_dataset(str(inline)).test.batches(50, shuffle=False))
    assert all(torch.equal(got[k], want[k]) for k in LIST_KEYS)
    rows = pq.read_table(tabled / "train.parquet")
    pq.write_table(rows.rename_columns(["click", "row", "entity"]), tabled / "train.parquet")
    with pytest.raises(DataError, match=r"train\.lists\.parquet is a list table, but .*train\.parquet has no 'list_row' "
                                        r"column: name the list fields .* in .*schema\.json"):
        infer_schema(tabled)


def test_the_list_table_is_stored_once_and_mapped(tmp_path: Path) -> None:
    _, tabled, lists, _ = _both(tmp_path, n=500, k=20)
    schema = schema_for(str(tabled))
    st = open_store(tabled / "train.parquet", schema, None, tmp_path / "cache")
    xs = st.lists["xs"]
    assert isinstance(xs.offsets, np.memmap) and len(xs.offsets) == 21  # the table's 20 rows, not the split's 500
    assert np.asarray(xs.ids).tolist() == [i for x in lists.column("xs").to_pylist() for i in x]
    assert st.max_ids["xs"] == max(i for x in lists.column("xs").to_pylist() for i in x)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")) == \
        ["train.lists.parquet.all", "train.parquet.all"]


def test_a_model_reading_no_list_leaves_the_list_table_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Note [Unread lists]: reading no list field converts and opens no list table; reading one keeps the split
    files' stores as they were (they hold the list-table column either way)."""
    _, tabled, _, _ = _both(tmp_path)
    monkeypatch.setenv("MTLDSL_CACHE_DIR", str(tmp_path / "cache"))
    ds = load_dataset(str(tabled), lists=())
    assert not ds.train.list_cols and len(ds.test) == 300
    assert not list((tmp_path / "cache").rglob("*.lists.parquet.*"))
    stores = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("manifest.json")}
    assert len(stores) == 2  # train and test
    load_dataset(str(tabled), lists=("ys",))
    assert sorted(p.parent.name for p in (tmp_path / "cache").rglob("*.lists.parquet.*/manifest.json")) == \
        ["test.lists.parquet.all", "train.lists.parquet.all"]
    assert all(p.stat().st_mtime_ns == t for p, t in stores.items())  # the split files' stores were kept


def test_a_csv_split_file_may_point_into_a_list_table(tmp_path: Path) -> None:
    inline, tabled, _, _ = _both(tmp_path)
    for split in ("train", "test"):
        pcsv.write_csv(pq.read_table(tabled / f"{split}.parquet"), tabled / f"{split}.csv")
        (tabled / f"{split}.parquet").unlink()
    assert list_table_path(tabled / "train.csv") == tabled / "train.lists.parquet"
    a, b = load_dataset(str(inline)), load_dataset(str(tabled))
    got, want = next(b.test.batches(64, shuffle=False)), next(a.test.batches(64, shuffle=False))
    assert all(torch.equal(got[k], want[k]) for k in LIST_KEYS)


def test_a_row_past_the_list_table_is_named(tmp_path: Path) -> None:
    _, tabled, _, entity = _both(tmp_path)
    bad = entity.copy()
    bad[123] = 40  # the table has rows 0..39
    rows = pq.read_table(tabled / "train.parquet")
    pq.write_table(rows.set_column(2, "entity", pa.array(bad)), tabled / "train.parquet")
    with pytest.raises(DataError, match=r"train\.parquet: column 'entity', row 124: list row 40 is beyond the 40 rows "
                                        r"of its list table .*train\.lists\.parquet"):
        load_dataset(str(tabled))


def test_a_missing_list_table_and_bad_lists_in_it_are_named(tmp_path: Path) -> None:
    _, tabled, lists, _ = _both(tmp_path)
    (tabled / "test.lists.parquet").unlink()
    with pytest.raises(DataError, match=r"test\.parquet: its list fields \(xs, ys\) live in a list table "
                                        r"\(schema.json's 'list_rows' is 'entity'\), but .*test\.lists\.parquet is missing"):
        load_dataset(str(tabled))
    ws = lists.column("xs_w").to_pylist()
    ws[7] = ws[7] + [1.0]
    pq.write_table(lists.set_column(1, "xs_w", pa.array(ws, pa.list_(pa.float32()))), tabled / "test.lists.parquet")
    with pytest.raises(DataError, match=r"test\.lists\.parquet: column 'xs_w', row 8: \d weight\(s\) for \d id\(s\)"):
        load_dataset(str(tabled))


def test_schema_json_list_rows_round_trips_and_is_checked() -> None:
    schema = schema_from_json(json.dumps(TABLE_SCHEMA))
    assert schema.list_rows == "entity" and schema.columns == ("click", "row", "entity")
    assert schema.list_columns == ("xs", "ys", "xs_w")
    assert schema_from_json(schema_to_json(schema)) == schema
    for value, message in ((3, "must be a column name"), ("row", "'row', which is a field"),
                           ("xs_w", "'xs_w', which is a field, label or weights column")):
        with pytest.raises(DataError, match=message):
            schema_from_json(json.dumps({**TABLE_SCHEMA, "list_rows": value}))
    with pytest.raises(DataError, match="'lists' is empty"):
        schema_from_json(json.dumps({**TABLE_SCHEMA, "lists": [], "list_weights": {}}))
