"""`mtldsl data prepare ali_ccp`: raw Tianchi-format fixtures -> Parquet dataset the data layer loads.

The fixtures are written here in the raw format (Note [Ali-CCP raw format] in runtime/prepare.py):
users with common features (some fields missing, behaviour lists with repeated fields), skeleton rows
with frequent and rare ids, noise rows (click=0, purchase=1), a sample whose common index is absent,
and both separator spellings. Expected values are recomputed naively in memory and compared with the
streamed output.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mtldsl.catalog import KNOWN_DATASETS, DataError, DatasetNotFound
from mtldsl.runtime import prepare as P
from mtldsl.runtime.data import load_dataset

SCHEMA = KNOWN_DATASETS["ali_ccp"].schema
USER_FIELDS = ("101", "121", "122", "124", "125", "126", "127", "128", "129")
BEHAVIOUR = ("109_14", "110_14", "127_14", "150_14")
AD_FIELDS = ("205", "206", "207", "210", "216", "508", "509", "702", "853", "301")


def _feature_list(entries: list[tuple[str, str, str]], swapped: bool) -> str:
    """Tianchi spelling field\\x02id\\x03value joined by \\x01, or the swapped one some write-ups give."""
    if swapped:
        return "\x02".join(f"{f}\x01{fid}\x03{v}" for f, fid, v in entries)
    return "\x01".join(f"{f}\x02{fid}\x03{v}" for f, fid, v in entries)


def write_raw(folder: Path, *, n_train: int = 400, n_test: int = 120, seed: int = 0) -> dict:
    """Raw files + the truth needed to check them: per sample its label and joined features."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    truth: dict = {"samples": {}, "noise": {"train": 0, "test": 0}, "no_common": {"train": 0, "test": 0}}
    users: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for split, swapped in (("train", False), ("test", True)):
        lines = []
        for u in range(25):
            idx = f"{split[:2]}{u:04x}c0ffee"
            entries = []
            for f in USER_FIELDS:
                if f == "129" and u % 5 == 0:
                    continue  # missing field
                fid = str(7000 + u) if f == "101" else str(100 * int(f) + u % 4)
                entries.append((f, fid, "1.0"))
            for f in BEHAVIOUR:
                for k in range(3):  # repeated field: the last entry wins
                    entries.append((f, str(9000 + 10 * u + k), f"{round(rng.uniform(0.0, 5.0), 3)}"))
            entries.append(("999", "1", "1.0"))  # a field the schema does not use
            users[idx] = {}
            for f, fid, v in entries:
                users[idx].setdefault(f, []).append((fid, v))
            lines.append(f"{idx},{len(entries)},{_feature_list(entries, swapped)}\n")
        (folder / f"common_features_{split}.csv").write_text("".join(lines), encoding="utf-8")

        lines = []
        n = n_train if split == "train" else n_test
        user_ids = sorted(i for i in users if i.startswith(split[:2]))
        for s in range(n):
            sid = f"{split}-{s}"
            click = int(rng.random() < 0.3)
            purchase = int(click and rng.random() < 0.3)
            if s % 37 == 5:
                click, purchase = 0, 1  # noise: dropped
            idx = user_ids[s % len(user_ids)]
            if split == "test" and s == 3:
                idx = "deadbeef"  # not in the common-features file
            item = str(500 + rng.randrange(8)) if s % 11 else str(100_000 + s)  # every 11th item is unique (rare)
            entries = [("205", item, "1.0"), ("206", str(60 + int(item) % 3), "1.0"), ("207", str(70 + rng.randrange(5)), "1.0"),
                       ("210", "1", "1.0"), ("210", str(80 + rng.randrange(3)), "1.0"),  # repeated: last wins
                       ("216", str(90 + rng.randrange(4)), "1.0")]
            for f in ("508", "509", "702", "853"):
                if rng.random() < 0.7:  # often missing, like the real crosses
                    entries.append((f, str(int(f) * 10 + rng.randrange(6)), f"{round(rng.uniform(0.0, 2.0), 3)}"))
            entries.append(("301", str(1 + rng.randrange(3)), "1.0"))
            lines.append(f"{sid},{click},{purchase},{idx},{len(entries)},{_feature_list(entries, swapped)}\n")
            if click == 0 and purchase == 1:
                truth["noise"][split] += 1
                continue
            feats = {f: (fid, v) for f, fid, v in entries}
            if idx in users:
                feats.update({f: vals[-1] for f, vals in users[idx].items()})
            else:
                truth["no_common"][split] += 1
            truth["samples"][sid] = (split, click, purchase, feats)
        (folder / f"sample_skeleton_{split}.csv").write_text("".join(lines), encoding="utf-8")
    return truth


def expected_tables(truth: dict, min_count: int, val_share: float = 0.1) -> dict[str, list[dict]]:
    """The naive, all-in-memory version of the mapping."""
    rows = {"train": [], "val": [], "test": []}
    for sid, (split, click, purchase, feats) in truth["samples"].items():
        target = "test" if split == "test" else ("val" if P._is_val(sid, val_share) else "train")
        rows[target].append((sid, click, purchase, feats))
    counts = {f: Counter() for f in SCHEMA.sparse}
    for _, _, _, feats in rows["train"]:
        for f in SCHEMA.sparse:
            if f in feats:
                counts[f][feats[f][0]] += 1
    vocab = {}
    for f in SCHEMA.sparse:
        kept = sorted(((c, fid) for fid, c in counts[f].items() if c >= min_count), key=lambda x: (-x[0], x[1]))
        vocab[f] = {fid: i for i, (_, fid) in enumerate(kept, 1)}
    raw_dense = lambda feats, d: float(feats[d[1:]][1]) if d[1:] in feats else 0.0  # noqa: E731
    lo = {d: min(raw_dense(r[3], d) for r in rows["train"]) for d in SCHEMA.dense}
    hi = {d: max(raw_dense(r[3], d) for r in rows["train"]) for d in SCHEMA.dense}
    out = {}
    for split, rs in rows.items():
        table = []
        for sid, click, purchase, feats in rs:
            rec = {"sample_id": sid, "click": click, "purchase": purchase}
            for f in SCHEMA.sparse:
                rec[f] = vocab[f].get(feats[f][0], 0) if f in feats else 0
            for d in SCHEMA.dense:
                span = hi[d] - lo[d]
                rec[d] = min(max((raw_dense(feats, d) - lo[d]) / span, 0.0), 1.0) if span > 0 else 0.0
            table.append(rec)
        out[split] = table
    out["vocab"] = vocab
    out["counts"] = counts
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    truth = write_raw(raw)
    out = tmp_path_factory.mktemp("data") / "ali_ccp"
    notes: list[str] = []
    report = P.prepare_ali_ccp(raw, out, min_count=3, row_group_size=16, block_size=4096, log=notes.append,
                               last_entry=True)  # the mapping the per-line reference (expected_tables) implements
    return raw, out, truth, report, notes


def _read(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_rows_labels_and_split(prepared) -> None:
    raw, out, truth, report, _ = prepared
    exp = expected_tables(truth, min_count=3)
    for split in ("train", "val", "test"):
        got = _read(out / f"{split}.parquet")
        assert len(got) == len(exp[split]) == report.rows[split]
        assert [(r["click"], r["purchase"]) for r in got] == [(r["click"], r["purchase"]) for r in exp[split]]
    assert report.skipped["click=0,purchase=1"] == truth["noise"]["train"] + truth["noise"]["test"] > 0
    n_train_val = report.rows["train"] + report.rows["val"]
    assert 0.04 < report.rows["val"] / n_train_val < 0.2
    assert list(pq.read_schema(out / "train.parquet").names) == ["click", "purchase", *SCHEMA.sparse, *SCHEMA.dense]


def test_join_min_count_mapping_and_dense_match_the_naive_version(prepared) -> None:
    _, out, truth, report, _ = prepared
    exp = expected_tables(truth, min_count=3)
    for split in ("train", "val", "test"):
        got = _read(out / f"{split}.parquet")
        for g, e in zip(got, exp[split]):
            for f in SCHEMA.sparse:
                assert g[f] == e[f], (split, e["sample_id"], f)
            for d in SCHEMA.dense:
                assert g[d] == pytest.approx(e[d], abs=1e-6), (split, e["sample_id"], d)
    assert report.vocab_sizes == {f: len(exp["vocab"][f]) + 1 for f in SCHEMA.sparse}


def test_output_is_the_per_line_reference_exactly(prepared) -> None:
    """Rows in file order, every id, dense values to the float32 bit, and vocab.parquet with its counts."""
    _, out, truth, _, _ = prepared
    exp = expected_tables(truth, min_count=3)
    for split in ("train", "val", "test"):
        want = [{"click": e["click"], "purchase": e["purchase"], **{f: e[f] for f in SCHEMA.sparse},
                 **{d: float(np.float32(e[d])) for d in SCHEMA.dense}} for e in exp[split]]
        assert _read(out / f"{split}.parquet") == want, split
    vocab = [(r["field"], r["raw_id"], r["id"], r["count"]) for r in _read(out / "vocab.parquet")]
    assert vocab == [(f, fid, i, exp["counts"][f][fid]) for f in SCHEMA.sparse for fid, i in exp["vocab"][f].items()]


def test_specific_mapping_rules(prepared) -> None:
    _, out, truth, report, _ = prepared
    train = _read(out / "train.parquet")
    test = _read(out / "test.parquet")
    vocab = pq.read_table(out / "vocab.parquet").to_pylist()
    ids = {(r["field"], r["raw_id"]): r["id"] for r in vocab}
    # rare items (seen once) map to 0, frequent ones to 1..K by descending count
    assert report.raw_ids["205"] > report.vocab_sizes["205"] - 1 >= 8
    assert any(r["205"] == 0 for r in train) and all(r["205"] >= 0 for r in train)
    counts = {r["raw_id"]: r["count"] for r in vocab if r["field"] == "205"}
    by_id = sorted(counts, key=lambda fid: ids[("205", fid)])
    assert [counts[f] for f in by_id] == sorted(counts.values(), reverse=True)
    assert all(c >= 3 for c in counts.values())
    # the join: user fields come from the common features (user id 7000 + u), missing field 129 -> 0
    assert all(r["101"] > 0 for r in train)
    assert any(r["129"] == 0 for r in train) and any(r["129"] > 0 for r in train)
    # repeated field 210: the last entry (80..82) wins, never the first ("1")
    assert ("210", "1") not in ids and all(r["210"] > 0 for r in train)
    # the test sample whose common index is missing keeps its ad fields and has 0 user fields
    no_common = [r for r in test if r["101"] == 0]
    assert len(no_common) == truth["no_common"]["test"] == report.skipped[P._NO_COMMON] == 1
    assert no_common[0]["205"] >= 0 and no_common[0]["301"] > 0
    # dense values are scaled into [0, 1]
    for split in ("train", "val", "test"):
        rows = _read(out / f"{split}.parquet")
        assert all(0.0 <= r[d] <= 1.0 for r in rows for d in SCHEMA.dense)
    assert max(r["D109_14"] for r in train) == pytest.approx(1.0)


def test_the_data_layer_loads_the_folder(prepared, monkeypatch) -> None:
    _, out, _, report, _ = prepared
    schema = json.loads((out / "schema.json").read_text())
    assert schema["vocab_sizes"] == report.vocab_sizes
    ds = load_dataset(str(out), binary_labels=("click", "purchase"))
    assert len(ds.train) == report.rows["train"] and len(ds.val) == report.rows["val"] and len(ds.test) == report.rows["test"]
    assert ds.schema.sparse == SCHEMA.sparse and ds.schema.dense == SCHEMA.dense
    assert dict(ds.schema.vocab_sizes) == report.vocab_sizes
    assert ds.train.sparse.shape == (report.rows["train"], len(SCHEMA.sparse))
    # and by name, as `mtldsl train --data ali_ccp --data-dir <parent>` resolves it
    monkeypatch.delenv("MTLDSL_DATA", raising=False)
    named = load_dataset("ali_ccp", data_dir=out.parent)
    assert len(named.test) == report.rows["test"]


def test_memory_is_bounded_by_row_groups_and_chunks(prepared) -> None:
    _, out, truth, report, _ = prepared
    assert report.row_group_size == 16 and report.max_rows_buffered < 16
    # a 4 KiB block holds a few dozen skeleton lines: the 400 + 120 lines were never all in memory
    assert report.block_size == 4096 and 0 < report.max_chunk_rows < 100
    assert report.common_lines == {"train": 25, "test": 25}  # the join holds the common lines, not the skeleton
    for split in ("train", "val", "test"):
        meta = pq.ParquetFile(out / f"{split}.parquet").metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        assert max(sizes) <= 16 and sum(sizes) == report.rows[split]
        assert meta.num_row_groups == math.ceil(report.rows[split] / 16)
    assert not list(out.glob(".prepare-*"))  # the temporary folder is gone


def test_output_is_deterministic(prepared, tmp_path) -> None:
    raw, out, _, _, _ = prepared
    again = P.prepare_ali_ccp(raw, tmp_path / "again", min_count=3, row_group_size=50, last_entry=True)
    for name in ("train.parquet", "val.parquet", "test.parquet", "vocab.parquet"):
        assert pq.read_table(again.out / name).equals(pq.read_table(out / name)), name
    assert (again.out / "schema.json").read_text() == (out / "schema.json").read_text()


def test_raw_files_in_split_subfolders_and_missing_files(tmp_path) -> None:
    raw = tmp_path / "raw"
    write_raw(raw, n_train=80, n_test=40)
    for split in ("train", "test"):
        (raw / split).mkdir()
        for kind in ("sample_skeleton", "common_features"):
            (raw / f"{kind}_{split}.csv").rename(raw / split / f"{kind}_{split}.csv")
    report = P.prepare_ali_ccp(raw, tmp_path / "out", min_count=1)
    assert report.rows["test"] > 0
    (raw / "test" / "common_features_test.csv").unlink()
    with pytest.raises(DatasetNotFound, match="common_features_test.csv"):
        P.prepare_ali_ccp(raw, tmp_path / "out2")


def test_bad_lines_name_file_and_line_and_publish_nothing(tmp_path) -> None:
    raw = tmp_path / "raw"
    write_raw(raw, n_train=60, n_test=30)
    path = raw / "sample_skeleton_test.csv"
    lines = path.read_text().splitlines(keepends=True)
    lines[4] = lines[4].replace(",", ";", 2)
    path.write_text("".join(lines))
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"sample_skeleton_test\.csv: line 5: expected 6 comma-separated columns"):
        P.prepare_ali_ccp(raw, out, min_count=1)
    assert not (out / "train.parquet").exists() and not list(out.glob(".prepare-*"))
    lines[4] = "test-x,2,0,te0000c0ffee,1,205\x02501\x031.0\n"
    path.write_text("".join(lines))
    with pytest.raises(DataError, match=r"line 5: column 'click': expected 0 or 1, got '2'"):
        P.prepare_ali_ccp(raw, out, min_count=1)
    lines[4] = "test-x,0,0,te0000c0ffee,1,205\x02501\n"
    path.write_text("".join(lines))
    with pytest.raises(DataError, match=r"line 5: malformed feature list"):
        P.prepare_ali_ccp(raw, out, min_count=1)


def test_the_train_error_wins_over_the_test_side_running_beside_it(tmp_path) -> None:
    """The test split is read and written beside the train one (Note [Prepare threads]); errors keep today's order."""
    raw = tmp_path / "raw"
    write_raw(raw, n_train=60, n_test=30)
    train = raw / "sample_skeleton_train.csv"
    good_train = train.read_bytes()
    lines = good_train.splitlines(keepends=True)
    lines[6] = lines[6].replace(b",", b";", 4)
    train.write_bytes(b"".join(lines))
    common = raw / "common_features_test.csv"
    bad_common = common.read_text().splitlines(keepends=True)
    bad_common[2] = bad_common[2].rstrip("\n") + "\x01109_14\x02123\x03inf\n"  # read first, reported after pass 1
    common.write_text("".join(bad_common))
    for workers in (1, 2):
        with pytest.raises(DataError, match=r"sample_skeleton_train\.csv: line 7: expected 6 comma-separated"):
            P.prepare_ali_ccp(raw, tmp_path / "out", min_count=1, workers=workers)
    train.write_bytes(good_train)  # the train files are good now: the test common file's error is reported
    for workers in (1, 2):
        with pytest.raises(DataError, match=r"common_features_test\.csv: line 3: field 109_14: .*got 'inf'"):
            P.prepare_ali_ccp(raw, tmp_path / "out", min_count=1, workers=workers)
    assert not list((tmp_path / "out").glob(".prepare-*"))


def test_one_worker_is_one_thread(tmp_path, monkeypatch) -> None:
    """--workers 1: both splits read, mapped and written in the calling thread (Note [Prepare threads])."""
    raw = tmp_path / "raw"
    write_raw(raw, n_train=60, n_test=30)
    threads = set()
    for stage in ("_read_common", "_count_chunk", "_map_chunk"):
        real = getattr(P, stage)

        def spy(*args, real=real, **kwargs):
            threads.add(threading.current_thread().name)
            return real(*args, **kwargs)

        monkeypatch.setattr(P, stage, spy)
    report = P.prepare_ali_ccp(raw, tmp_path / "one", min_count=1, workers=1)
    assert threads == {threading.current_thread().name} and report.rows["test"] > 0
    P.prepare_ali_ccp(raw, tmp_path / "two", min_count=1, workers=2)
    assert len(threads) > 1 and _bytes(tmp_path / "one") == _bytes(tmp_path / "two")


def test_a_failing_train_side_stops_the_test_side(tmp_path, monkeypatch) -> None:
    raw = _raw_with(tmp_path, lambda ls: ls.__setitem__(3, ls[3].replace(b",", b";", 4)))
    seen: list[str] = []
    real_read = J.CommonTable.read

    def read(path, *args, **kwargs):
        if path.name != "common_features_test.csv":
            return real_read(path, *args, **kwargs)
        progress = args[3]  # the test side polls its progress until the train side fails
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                progress(0, 0)
            except P._Stopped:
                seen.append("stopped")
                raise
            time.sleep(0.01)
        seen.append("not stopped")
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(J.CommonTable, "read", staticmethod(read))
    with pytest.raises(DataError, match=r"sample_skeleton_train\.csv: line 4: expected 6 comma-separated"):
        P.prepare_ali_ccp(raw, tmp_path / "out", min_count=1)
    assert seen == ["stopped"]
    assert not list((tmp_path / "out").glob(".prepare-*"))


def _features(text: str, wanted: set[str]) -> dict[str, tuple[str, str]]:
    """field -> (id, value) of one raw feature list, as prepare reads it (prepare_read.parse_entries)."""
    from mtldsl.runtime.prepare_read import parse_entries

    fields = sorted(wanted)
    entries = parse_entries(pa.array([text]), pa.array(fields))
    found = {}
    for j, f in enumerate(fields):
        i = entries.last[0, j]
        if i >= 0:
            found[f] = (entries.ids(np.array([i]))[0].as_py(), entries.values(np.array([i]))[0].as_py())
    return found


def test_feature_lists_read_both_separator_spellings() -> None:
    a = _features("101\x021\x031.0\x01205\x027\x030.5\x01205\x028\x032.0", {"101", "205"})
    b = _features("101\x011\x031.0\x02205\x017\x030.5\x02205\x018\x032.0", {"101", "205"})
    assert a == b == {"101": ("1", "1.0"), "205": ("8", "2.0")}
    assert _features("101\x021\x031.0\x01999\x022\x031", {"101"}) == {"101": ("1", "1.0")}


def test_cli_data_prepare(tmp_path) -> None:
    from mtldsl.cli import app

    raw = tmp_path / "raw"
    write_raw(raw, n_train=80, n_test=40)
    out = tmp_path / "ali_ccp"
    result = CliRunner().invoke(app, ["data", "prepare", "ali_ccp", "--raw", str(raw), "--out", str(out),
                                      "--min-count", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (out / "train.parquet").is_file() and (out / "schema.json").is_file()
    assert "train" in result.output and "vocabulary" in result.output
    bad = CliRunner().invoke(app, ["data", "prepare", "ali_ccp", "--raw", str(tmp_path / "nowhere"), "--out", str(out)])
    assert bad.exit_code == 1 and "no such folder" in bad.output and "Traceback" not in bad.output
    other = CliRunner().invoke(app, ["data", "prepare", "census_income", "--raw", str(raw), "--out", str(out)])
    assert other.exit_code == 1 and "no raw-file converter" in other.output


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("stage", ["_count_chunk", "_map_chunk"])
def test_an_interrupted_prepare_keeps_the_previous_output_and_a_rerun_is_identical(tmp_path, monkeypatch, stage) -> None:
    raw = tmp_path / "raw"
    write_raw(raw, n_train=300, n_test=100)
    out = tmp_path / "out"
    P.prepare_ali_ccp(raw, out, min_count=2, row_group_size=16, block_size=2048)
    before = _bytes(out)
    assert set(before) == {"train.parquet", "val.parquet", "test.parquet", "vocab.parquet", "prepare.json",
                           "schema.json", "train.lists.parquet", "val.lists.parquet", "test.lists.parquet"}
    calls = []
    real = getattr(P, stage)

    def fail_on_third(*args, **kwargs):  # mid-way: some chunks are done, some rows written
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(P, stage, fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        P.prepare_ali_ccp(raw, out, min_count=2, row_group_size=16, block_size=2048)
    assert _bytes(out) == before and not list(out.glob(".prepare-*"))
    monkeypatch.setattr(P, stage, real)
    (out / ".prepare-999999999-killed").mkdir()  # left by a prepare that was killed: removed by the next one
    P.prepare_ali_ccp(raw, out, min_count=2, row_group_size=16, block_size=2048)
    assert _bytes(out) == before and not list(out.glob(".prepare-*"))


def test_a_republish_never_shows_the_old_schema_over_new_data(tmp_path, monkeypatch) -> None:
    """While a second prepare moves its files into OUT, the first one's schema.json is already gone."""
    raw = tmp_path / "raw"
    write_raw(raw, n_train=120, n_test=40)
    out = tmp_path / "out"
    P.prepare_ali_ccp(raw, out, min_count=2)
    seen = []
    real = os.replace

    def replace(src, dst):
        if Path(dst).parent == out:
            seen.append((Path(dst).name, (out / "schema.json").exists()))
        return real(src, dst)

    monkeypatch.setattr(P.os, "replace", replace)
    P.prepare_ali_ccp(raw, out, min_count=2)
    assert seen[-1] == ("schema.json", False) and len(seen) == 9
    assert not any(has_schema for _, has_schema in seen)


def test_workers_and_block_sizes_do_not_change_a_byte(prepared, tmp_path) -> None:
    raw, out, _, _, _ = prepared
    for workers, block in ((1, 1 << 20), (2, 100), (3, 777)):
        again = tmp_path / f"w{workers}"
        P.prepare_ali_ccp(raw, again, min_count=3, row_group_size=16, block_size=block, workers=workers, last_entry=True)
        assert _bytes(again) == _bytes(out), (workers, block)


def test_lines_pyarrow_rejects_are_read_as_the_per_line_reader_did(prepared, tmp_path) -> None:
    """A comma inside the feature list, blank lines, CRLF endings: accepted as before, same output."""
    raw, out, _, _, _ = prepared
    odd = tmp_path / "raw"
    odd.mkdir()
    for p in raw.iterdir():
        (odd / p.name).write_bytes(p.read_bytes())
    path = odd / "sample_skeleton_train.csv"
    lines = path.read_text().splitlines(keepends=True)
    lines[7] = lines[7].rstrip("\n") + "\x01999\x021\x031,5\n"  # a field the schema does not use, with a comma
    lines[20] = lines[20].replace("\n", "\r\n")
    path.write_text("\n" + "".join(lines[:30]) + "\n\n" + "".join(lines[30:]))
    P.prepare_ali_ccp(odd, tmp_path / "out", min_count=3, row_group_size=16, block_size=4096, last_entry=True)
    for name in ("train.parquet", "val.parquet", "test.parquet", "vocab.parquet", "schema.json"):
        assert (tmp_path / "out" / name).read_bytes() == (out / name).read_bytes(), name


def _raw_with(tmp_path: Path, edit) -> Path:
    raw = tmp_path / "raw"
    write_raw(raw, n_train=60, n_test=30)
    path = raw / "sample_skeleton_train.csv"
    lines = path.read_bytes().splitlines(keepends=True)
    edit(lines)
    path.write_bytes(b"".join(lines))
    return raw


@pytest.mark.parametrize(("edit", "message"), [
    (lambda ls: ls.__setitem__(9, ls[9].replace(b"tr", b"\xff")), r"sample_skeleton_train\.csv: line 10: not UTF-8 text"),
    (lambda ls: ls.__setitem__(9, ls[9].replace(b",", b";", 4)), r"line 10: expected 6 comma-separated columns .*, got 2"),
    (lambda ls: ls.insert(3, b"\n"), None),  # a blank line: the errors below still name the right lines
    (lambda ls: (ls.insert(3, b"\n"), ls.__setitem__(12, b"x,1,1,tr0000c0ffee,1,508\x021\x03nan\n")),
     r"line 13: field 508: expected a finite number as the feature value, got 'nan'"),
    (lambda ls: (ls.insert(0, b"\r\n"), ls.__setitem__(40, b"x,1,0,tr0000c0ffee,1,508\x021\x031.0\x01205\n")),
     r"line 41: malformed feature list: .* got 4 parts"),
    (lambda ls: ls.__setitem__(2, b"x,0,1,tr0000c0ffee,1,508\x021\n"), None),  # a noise line is dropped unread
    (lambda ls: (ls.__setitem__(2, b"x,3,0,tr0000c0ffee,1,508\n"), ls.__setitem__(1, b"x,1,0,a,1\n")),
     r"line 2: expected 6 comma-separated columns .*, got 5"),  # the first bad line in file order wins
    (lambda ls: (ls.__setitem__(1, b"x,3,0,tr0000c0ffee,1,508\n"), ls.__setitem__(2, b"x,1,0,a,1\n")),
     r"line 2: column 'click': expected 0 or 1, got '3'"),
])
def test_bad_lines_are_named_like_the_per_line_reader_did(tmp_path, edit, message) -> None:
    raw = _raw_with(tmp_path, edit)
    for workers in (1, 2):
        if message is None:
            P.prepare_ali_ccp(raw, tmp_path / "out", min_count=1, block_size=512, workers=workers)
        else:
            with pytest.raises(DataError, match=message):
                P.prepare_ali_ccp(raw, tmp_path / "out", min_count=1, block_size=512, workers=workers)


def test_a_bad_dense_value_in_the_common_file_names_the_sample_that_joins_it(tmp_path) -> None:
    raw = tmp_path / "raw"
    write_raw(raw, n_train=60, n_test=30)
    path = raw / "common_features_train.csv"
    lines = path.read_text().splitlines(keepends=True)
    idx = lines[3].split(",")[0]
    lines[3] = lines[3].rstrip("\n") + "\x01109_14\x02123\x03inf\n"  # the last 109_14 entry wins: not finite
    path.write_text("".join(lines))
    first = next(n for n, line in enumerate((raw / "sample_skeleton_train.csv").read_text().splitlines(), 1)
                 if line.split(",")[3] == idx and line.split(",")[1:3] != ["0", "1"])
    with pytest.raises(DataError, match=rf"sample_skeleton_train\.csv: line {first}: field 109_14: .* got 'inf'"):
        P.prepare_ali_ccp(raw, tmp_path / "out", min_count=1, last_entry=True)
    # whole lists: the entry is a list weight of that common line, named there (used or not)
    with pytest.raises(DataError) as e:
        P.prepare_ali_ccp(raw, tmp_path / "out", min_count=1)
    assert str(e.value) == f"{path}: line 4: field 109_14: expected a finite number as the feature value, got 'inf'"


def test_split_parts_is_re_split_on_the_three_separators() -> None:
    rng = random.Random(0)
    alphabet = ["a", "7", "\x01", "\x02", "\x03", "é", ","]
    texts = ["", "a", "\x01", "a\x01", "\x01a", "a\x02b\x03c", "\x03\x03"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(12))) for _ in range(400)]
    from mtldsl.runtime.prepare_read import split_parts

    array = pa.array(texts, pa.string()).slice(3)  # an offset into the buffers, as a chunk column may have
    tokens, parts, first = split_parts(array)
    for i, text in enumerate(texts[3:]):
        want = re.split("[\x01\x02\x03]", text) if text else []
        assert parts[i] == len(want)
        assert tokens.slice(first[i], parts[i]).to_pylist() == want, repr(text)


def test_progress_bar_shows_rows_per_second(tmp_path, monkeypatch) -> None:
    import tqdm

    shown = io.StringIO()

    class Visible(tqdm.tqdm):
        def __init__(self, *args, **kwargs) -> None:
            kwargs.update(disable=False, file=shown, mininterval=0)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", Visible)
    raw = tmp_path / "raw"
    write_raw(raw, n_train=200, n_test=50)
    P.prepare_ali_ccp(raw, tmp_path / "out", min_count=1, block_size=1024, progress=True)
    text = shown.getvalue()
    assert "count sample_skeleton_train.csv" in text and "write sample_skeleton_test.csv" in text
    assert re.search(r"[\d,]+ rows, [\d,]+ rows/s", text)


# --- StringIndex (Note [String index]) ------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mtldsl.runtime import prepare_join as J  # noqa: E402

_texts = st.text(alphabet=st.sampled_from(["a", "b", "0", "1", "é", "\x00", "-", "7"]), max_size=20)


def _brute(values: list[str], keys: list[str]) -> list[int]:
    at = {k: i for i, k in enumerate(keys)}
    return [at.get(v, -1) for v in values]


@settings(max_examples=150, deadline=None)
@given(keys=st.lists(_texts, unique=True, max_size=40), values=st.lists(_texts, max_size=60), cut=st.integers(0, 5))
def test_string_index_finds_what_a_dict_finds(keys: list[str], values: list[str], cut: int) -> None:
    """Exact on any strings: empty ones, NULs inside and at the end, multi-byte text, prefixes of keys;
    and on sliced arrays (a non-zero offset), as chunks of a column are."""
    index = J.StringIndex(pa.array(keys, pa.string()))
    sliced = pa.array(["pad"] * cut + values, pa.string()).slice(cut)
    assert index(sliced).tolist() == _brute(values, keys)


def test_string_index_fixed_width_keys_wide_keys_and_collisions(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    keys = [f"{x:016x}" for x in rng.choice(1 << 40, 5000, replace=False)]  # 16 bytes each: the no-copy path
    values = [keys[i] if i % 3 else f"{i:016x}" for i in rng.integers(0, 5000, 3000)] + ["", keys[0][:8], keys[1] + "0"]
    index = J.StringIndex(pa.array(keys))
    assert index.table is not None
    assert index(pa.array(values)).tolist() == _brute(values, keys)
    assert index(pa.chunked_array([pa.array(values[:10]), pa.array(values[10:])])).tolist() == _brute(values, keys)
    wide = ["x" * (J.MAX_KEY_BYTES + 1), "short"]
    assert J.StringIndex(pa.array(wide)).table is None  # too wide: `positions` does it
    assert J.StringIndex(pa.array(wide))(pa.array(["short", "x", wide[0]])).tolist() == [1, -1, 0]
    monkeypatch.setattr(J, "_hash", lambda words, lengths: np.zeros(len(lengths), dtype=np.uint64))
    same = J.StringIndex(pa.array(keys[:50]))
    assert same.table is None  # keys of equal hash: `positions` does it, with the same answers
    assert same(pa.array(values)).tolist() == _brute(values, keys[:50])
