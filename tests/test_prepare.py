"""`mtldsl data prepare ali_ccp`: raw Tianchi-format fixtures -> Parquet dataset the data layer loads.

The fixtures are written here in the raw format (Note [Ali-CCP raw format] in runtime/prepare.py):
users with common features (some fields missing, behaviour lists with repeated fields), skeleton rows
with frequent and rare ids, noise rows (click=0, purchase=1), a sample whose common index is absent,
and both separator spellings. Expected values are recomputed naively in memory and compared with the
streamed output.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

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
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    truth = write_raw(raw)
    out = tmp_path_factory.mktemp("data") / "ali_ccp"
    notes: list[str] = []
    report = P.prepare_ali_ccp(raw, out, min_count=3, row_group_size=16, block_size=4096, log=notes.append)
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
    again = P.prepare_ali_ccp(raw, tmp_path / "again", min_count=3, row_group_size=50)
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


def test_parse_features_reads_both_separator_spellings() -> None:
    a = P.parse_features("101\x021\x031.0\x01205\x027\x030.5\x01205\x028\x032.0")
    b = P.parse_features("101\x011\x031.0\x02205\x017\x030.5\x02205\x018\x032.0")
    assert a == b == {"101": ("1", "1.0"), "205": ("8", "2.0")}
    assert P.parse_features("101\x021\x031.0\x01999\x022\x031", {"101"}) == {"101": ("1", "1.0")}


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
