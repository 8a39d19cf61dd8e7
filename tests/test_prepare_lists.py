"""`mtldsl data prepare ali_ccp` keeps whole behaviour lists by default (Note [Ali-CCP lists], Note [Ali-CCP raw
format]): checked against a naive per-line reading of the raw files, and against the --last-entry output."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from list_data import inline_lists
from test_prepare import BEHAVIOUR, write_raw
from typer.testing import CliRunner

from mtldsl.catalog import ALI_CCP_LISTS, KNOWN_DATASETS, schema_for
from mtldsl.runtime import prepare as P
from mtldsl.runtime import prepare_join as J
from mtldsl.runtime.data import load_dataset

MIN_COUNT = 3


def _entries(text: str) -> list[tuple[str, str, str]]:
    parts = re.split("[\x01\x02\x03]", text) if text else []
    return [tuple(parts[i:i + 3]) for i in range(0, len(parts), 3)]  # type: ignore[misc]


def _naive_lists(raw: Path) -> dict[str, list[dict[str, list[tuple[str, str]]]]]:
    """Per split, per written row in file order: each behaviour field's (raw id, value) entries."""
    out: dict[str, list[dict[str, list[tuple[str, str]]]]] = {"train": [], "val": [], "test": []}
    for split in ("train", "test"):
        common = {}
        for line in (raw / f"common_features_{split}.csv").read_text().splitlines():
            idx, _, feats = line.split(",", 2)
            common[idx] = _entries(feats)
        for line in (raw / f"sample_skeleton_{split}.csv").read_text().splitlines():
            sid, click, purchase, idx, _, feats = line.split(",", 5)
            if (click, purchase) == ("0", "1"):
                continue
            row = {}
            for f in BEHAVIOUR:
                shared = [(fid, v) for ff, fid, v in common.get(idx, []) if ff == f]
                row[f] = shared or [(fid, v) for ff, fid, v in _entries(feats) if ff == f]
            target = "test" if split == "test" else ("val" if P._is_val(sid, P.DEFAULT_VAL_SHARE) else "train")
            out[target].append(row)
    return out


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    write_raw(raw)
    path = raw / "sample_skeleton_test.csv"  # the test row without common features brings its own 109_14 list
    lines = path.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if ",deadbeef," in line)
    lines[at] = lines[at].rstrip("\n") + "\x01109_14\x0277771\x030.5\x01109_14\x0277772\x032\n"
    path.write_text("".join(lines))
    root = tmp_path_factory.mktemp("data")
    kw = dict(min_count=MIN_COUNT, row_group_size=16, block_size=4096)
    full = P.prepare_ali_ccp(raw, root / "ali_ccp", **kw)
    last = P.prepare_ali_ccp(raw, root / "last", last_entry=True, **kw)
    return raw, full, last


def test_whole_lists_match_the_naive_reading(both) -> None:
    raw, full, _ = both
    naive = _naive_lists(raw)
    counts = {f: Counter(fid for row in naive["train"] for fid, _ in row[f]) for f in BEHAVIOUR}  # every entry counts
    vocab = {f: {fid: i for i, (_, fid) in enumerate(sorted(((-c, fid) for fid, c in counts[f].items() if c >= MIN_COUNT)), 1)}
             for f in BEHAVIOUR}
    assert {f: full.vocab_sizes[f] for f in BEHAVIOUR} == {f: len(vocab[f]) + 1 for f in BEHAVIOUR}
    for split in ("train", "val", "test"):
        got = inline_lists(full.out, split)
        assert len(got) == len(naive[split]) == full.rows[split]
        for g, row in zip(got, naive[split]):
            for f in BEHAVIOUR:
                assert g[f] == [vocab[f].get(fid, 0) for fid, _ in row[f]]
                assert g[f"{f}_w"] == [float(np.float32(float(v))) for _, v in row[f]]
    test = inline_lists(full.out, "test")
    own = [r for r in test if r["101"] == 0]  # no common line: its own entries, ids unseen in train -> 0
    assert len(own) == 1 and own[0]["109_14"] == [0, 0] and own[0]["109_14_w"] == [0.5, 2.0]
    assert own[0]["110_14"] == [] and own[0]["110_14_w"] == []
    assert all(len(r["109_14"]) == 3 for r in test if r["101"] != 0)  # every entry of the common line, not the last


def test_lists_are_kept_once_per_common_line(both) -> None:
    """Note [List tables]: a split's list table is its common lines, an empty row, then rows with lists of their own."""
    raw, full, _ = both
    for split, source in (("train", "train"), ("val", "train"), ("test", "test")):
        lines = len((raw / f"common_features_{source}.csv").read_text().splitlines())
        rows = pq.read_table(full.out / f"{split}.parquet")
        table = pq.read_table(full.out / f"{split}.lists.parquet")
        own = 1 if split == "test" else 0  # the test row without a common line brings its own 109_14 list
        assert table.num_rows == lines + 1 + own and full.common_lines[source] == lines
        assert table.slice(lines, 1).to_pylist() == [{c: [] for c in table.column_names}]
        assert rows.column("list_row").type == pa.int32() and "109_14" not in rows.column_names
        assert set(rows.column("list_row").to_pylist()) <= set(range(lines)) | ({lines + 1} if own else set())
    assert full.files["train.lists.parquet"] == str(full.out / "train.lists.parquet")


def test_every_other_column_is_the_last_entry_output(both) -> None:
    _, full, last = both
    assert full.rows == last.rows
    for split in ("train", "val", "test"):
        a = pq.read_table(full.out / f"{split}.parquet")
        b = pq.read_table(last.out / f"{split}.parquet")
        same = [c for c in b.column_names if c not in BEHAVIOUR]
        assert a.select(same).equals(b.select(same)), split
        assert [pq.read_table(last.out / f"{split}.parquet").schema.field(f).type for f in BEHAVIOUR] == ["int32"] * 4
    assert {f: last.vocab_sizes[f] for f in last.vocab_sizes if f not in BEHAVIOUR} == \
        {f: full.vocab_sizes[f] for f in full.vocab_sizes if f not in BEHAVIOUR}


def test_the_named_dataset_takes_the_schema_its_folder_was_prepared_with(both, monkeypatch, tmp_path) -> None:
    _, full, last = both
    monkeypatch.delenv("MTLDSL_DATA", raising=False)
    assert schema_for("ali_ccp").lists == ()  # no folder: the single-valued schema, no files read
    schema = schema_for("ali_ccp", full.out.parent)
    assert schema == replace(ALI_CCP_LISTS, list_rows="list_row") and "109_14" not in schema.sparse
    assert schema.list_weights["127_14"] == "127_14_w"
    ds = load_dataset("ali_ccp", data_dir=full.out.parent)
    assert ds.schema.lists == BEHAVIOUR and len(ds.test) == full.rows["test"]
    assert ds.schema.vocab_sizes["150_14"] == full.vocab_sizes["150_14"]
    offsets, ids, weights = ds.train.bags("109_14")
    assert len(offsets) == full.rows["train"] + 1 and weights is not None and len(weights) == len(ids)
    old = tmp_path / "old" / "ali_ccp"  # prepared before list tables: the lists inline, no 'list_rows'
    old.mkdir(parents=True)
    for split in ("train", "val", "test"):
        rows = [{k: v for k, v in r.items() if k != "list_row"} for r in inline_lists(full.out, split)]
        pq.write_table(pa.Table.from_pylist(rows), old / f"{split}.parquet")
    declared = json.loads((full.out / "schema.json").read_text())
    (old / "schema.json").write_text(json.dumps({k: v for k, v in declared.items() if k != "list_rows"}))
    assert schema_for("ali_ccp", old.parent) == ALI_CCP_LISTS
    again = load_dataset("ali_ccp", data_dir=old.parent).train.bags("109_14")
    assert all(torch.equal(x, y) for x, y in zip(again, (offsets, ids, weights)))
    folder = tmp_path / "root" / "ali_ccp"  # a folder prepared with --last-entry: the single-valued schema
    folder.mkdir(parents=True)
    for name in ("train.parquet", "val.parquet", "test.parquet", "schema.json"):
        (folder / name).write_bytes((last.out / name).read_bytes())
    assert schema_for("ali_ccp", folder.parent) == KNOWN_DATASETS["ali_ccp"].schema
    assert load_dataset("ali_ccp", data_dir=folder.parent).schema.sparse == KNOWN_DATASETS["ali_ccp"].schema.sparse


def test_a_shipped_spec_on_whole_lists_says_which_lists_it_does_not_read(both, monkeypatch, tmp_path) -> None:
    """Note [Ali-CCP lists]: `fields all` leaves the list fields out, and training says so and how to read them."""
    from mtldsl.runtime.binding import prepare
    import torch

    _, full, _ = both
    monkeypatch.setenv("MTLDSL_CACHE_DIR", str(tmp_path))  # this test's stores only
    spec = Path(__file__).resolve().parents[1] / "specs" / "esmm.mtl"
    prepared = prepare(spec.read_text(), str(spec), data="ali_ccp", data_dir=str(full.out.parent), rows=None,
                       data_seed=0, device=torch.device("cpu"))
    assert not getattr(prepared.cls, "LIST_FIELDS", ())
    note = prepared.dataset.warnings[-1]  # a warning: said under --no-progress too, and kept in metrics.json
    assert note.startswith("data: the model reads none of the list field(s) 109_14, 110_14, 127_14, 150_14")
    assert "fields lists  pool sum" in note and "--last-entry" in note
    # Note [Unread lists]: the lists it does not read are neither loaded nor stored
    assert prepared.dataset.schema.lists == () and not prepared.dataset.split("train").list_cols
    stored = [p.name for p in tmp_path.rglob("*.npy")] + [p.name for p in (full.out / ".mtldsl-cache").rglob("*.npy")]
    assert any(n.startswith("sparse") for n in stored)
    assert not [n for n in stored if n.startswith(("list", "offsets", "weights"))]  # Role's list files


def test_cli_prepare_last_entry_flag(tmp_path) -> None:
    from mtldsl.cli import app

    raw = tmp_path / "raw"
    write_raw(raw, n_train=60, n_test=30)
    for flag, kind in (([], "list<element: int32>"), (["--last-entry"], "int32")):
        out = tmp_path / f"out{len(flag)}"
        r = CliRunner().invoke(app, ["data", "prepare", "ali_ccp", "--raw", str(raw), "--out", str(out),
                                     "--min-count", "1", "--no-progress", *flag])
        assert r.exit_code == 0, r.output
        lists = out / "train.lists.parquet"
        assert str(pq.read_schema(lists if lists.exists() else out / "train.parquet").field("109_14").type) == kind
        assert lists.exists() == (not flag)


def test_workers_and_blocks_do_not_change_the_lists(both, tmp_path) -> None:
    raw, full, _ = both
    for workers, block in ((1, 1 << 20), (3, 300)):
        again = P.prepare_ali_ccp(raw, tmp_path / f"w{workers}", min_count=MIN_COUNT, row_group_size=16,
                                  block_size=block, workers=workers)
        for name in ("train.parquet", "val.parquet", "test.parquet", "vocab.parquet", "schema.json",
                     "train.lists.parquet", "val.lists.parquet", "test.lists.parquet"):
            assert (again.out / name).read_bytes() == (full.out / name).read_bytes(), (workers, name)


def test_common_lines_and_own_lists_as_arrow_lists() -> None:
    """Note [Own lists]: CommonIds.lines gives lines as Arrow lists (one past the last: empty); ListRows gives each
    row its common line's list where that line holds the field, else the row's own entries."""
    rng = np.random.default_rng(0)
    n_lines = 200
    lengths = rng.integers(0, 6, n_lines)
    lengths[:3] = 0  # lines without the field
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = rng.random(int(offsets[-1])).astype(np.float32)
    common = J.CommonList(offsets, np.zeros(len(values), dtype=np.int32), values, pa.array([], pa.string()))
    ids = rng.integers(1, 1000, len(values)).astype(np.int32)
    c = J.CommonIds(common, ids)
    for a, b in ((0, n_lines + 1), (5, 9), (150, n_lines + 1), (n_lines, n_lines + 1)):
        got_ids, got_w = c.lines(a, b)
        for got, want in ((got_ids, ids), (got_w, values)):
            assert got.to_pylist() == [want[offsets[k]:offsets[k + 1]].tolist() if k < n_lines else [] for k in range(a, b)]
        assert str(got_ids.type) == "list<item: int32>" and str(got_w.type) == "list<item: float>"
    n = 500
    lines = rng.integers(-1, n_lines, n)  # -1: no common line
    own_counts = np.zeros(n, dtype=np.int64)
    own_counts[7], own_counts[9] = 2, 1  # rows 7 and 9 bring their own entries (their line lacks the list)
    lines[7], lines[9] = 0, -1
    own_ids, own_values = np.array([11, 12, 13], dtype=np.int32), np.array([0.5, 0.25, 4.0], dtype=np.float32)
    from_common = np.where(lines >= 0, lengths[np.maximum(lines, 0)], 0) > 0
    mine = {7: ([11, 12], [0.5, 0.25]), 9: ([13], [4.0])}
    for sel in (np.arange(n), rng.permutation(n)[:50], np.array([9, 7, 3]), np.zeros(0, dtype=np.int64)):
        got = J.ListRows(c, lines, from_common, own_ids, own_values, own_counts).take(sel)
        want = [mine[i][0] if i in mine else ids[offsets[k]:offsets[k + 1]].tolist() if k >= 0 else []
                for i, k in zip(sel, lines[sel])]
        assert got[0].to_pylist() == want
        assert got[1].to_pylist()[:3] == [mine[i][1] if i in mine else values[offsets[k]:offsets[k + 1]].tolist()
                                          if k >= 0 else [] for i, k in zip(sel[:3], lines[sel[:3]])]
