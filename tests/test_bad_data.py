"""Issue 12: bad data folders never crash and never train silently on the wrong thing.

Every case builds its folder here (an ESMM-shaped sample: user_id, item_id, price, click, purchase) and runs
`mtldsl train` through the CLI: a bad folder is exit 1, one `error:` line naming the file (and column and row
where there is one), and no run folder; data that trains but is suspect is said on stderr and recorded.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mtldsl import catalog, datafiles
from mtldsl.cli import app

ROOT = Path(__file__).resolve().parents[1]
ESMM = ROOT / "specs" / "esmm.mtl"
HEADER = ("user_id", "item_id", "price", "click", "purchase")
runner = CliRunner()


def _rows(n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        click = int(rng.random() < 0.4)
        purchase = int(click and rng.random() < 0.4)
        out.append([str(rng.randrange(20)), str(rng.randrange(30)), f"{rng.random():.3f}", str(click), str(purchase)])
    return out


def _csv(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    return "\n".join(",".join(r) for r in [list(header), *rows]) + "\n"


def make(folder: Path, sizes: dict[str, int] | None = None) -> Path:
    """A good folder: train/val/test.csv of the given sizes (default 200/60/60 rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, (split, n) in enumerate((sizes or {"train": 200, "val": 60, "test": 60}).items()):
        (folder / f"{split}.csv").write_text(_csv(HEADER, _rows(n, k)))
    return folder


def train(tmp_path: Path, folder: Path, *flags: str, spec: Path = ESMM) -> tuple[object, Path]:
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(spec), "--data", str(folder), "--epochs", "1", "--batch-size", "64",
                                 "--out", str(out), "--no-progress", "--precision", "fp32", *flags])
    return result, out


def refused(result: object, out: Path, *parts: str) -> str:
    """The one error line of a refused folder; nothing of a run was written."""
    assert result.exit_code == 1, result.output  # type: ignore[attr-defined]
    stderr = result.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for part in parts:
        assert part in lines[0], lines[0]
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.json").exists()
    return lines[0]


def _edit(path: Path, row: int, column: str, value: str) -> None:
    """Set a cell of a CSV file (1-based data row)."""
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[row].split(",")
    cells[header.index(column)] = value
    lines[row] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


# --- reading the train file: one line, never a traceback ------------------------------------------------


def _non_utf8(d: Path) -> None:
    (d / "train.csv").write_bytes((d / "train.csv").read_bytes().replace(b"\n3,", b"\n\xff3,", 1))


def _non_utf8_beyond_the_sample(d: Path) -> None:  # with schema.json: found by the full conversion
    _non_utf8(d)
    (d / "schema.json").write_text(json.dumps({"labels": ["click", "purchase"], "sparse": ["user_id", "item_id"],
                                               "dense": ["price"], "user_id": "user_id"}))


def _truncated_parquet(d: Path) -> None:
    (d / "train.csv").unlink()
    pq.write_table(pa.table({c: [1, 2, 3] for c in HEADER}), d / "train.parquet")
    data = (d / "train.parquet").read_bytes()
    (d / "train.parquet").write_bytes(data[: len(data) // 2])


def _long_cell(d: Path) -> None:
    _edit(d / "train.csv", 5, "price", "x" * 200_000)  # over the csv module's default field limit


def _extra_field(d: Path) -> None:
    _edit(d / "train.csv", 4, "purchase", "0,7")  # a trailing extra field


def _comma_in_value(d: Path) -> None:
    _edit(d / "train.csv", 9, "item_id", "3,5")  # an unquoted comma shifts the row's later cells


def _both_formats(d: Path) -> None:
    pq.write_table(pa.table({c: [1, 0] for c in HEADER}), d / "train.parquet")


def _dupe_header_in(split: str) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        path = d / f"{split}.csv"
        path.write_text(path.read_text().replace("price", "item_id", 1))
    return edit


def _val_symlink_loop(d: Path) -> None:
    (d / "val.csv").unlink()
    os.symlink(d / "val.csv", d / "val.csv")


def _huge_id(text: str) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        _edit(d / "train.csv", 7, "item_id", text)
        (d / "schema.json").write_text(json.dumps({"labels": ["click", "purchase"], "sparse": ["user_id", "item_id"],
                                                   "dense": ["price"], "user_id": "user_id"}))
    return edit


def _padded_header(d: Path) -> None:
    for split in ("train", "val", "test"):
        path = d / f"{split}.csv"
        path.write_text(path.read_text().replace(",click,purchase\n", ", click, purchase\n", 1))


def _semicolons(d: Path) -> None:
    for split in ("train", "val", "test"):
        path = d / f"{split}.csv"
        path.write_text(path.read_text().replace(",", ";"))


def _tabs(d: Path) -> None:
    for split in ("train", "val", "test"):
        path = d / f"{split}.csv"
        path.write_text(path.read_text().replace(",", "\t"))


def _label_and_feature_in_schema(d: Path) -> None:
    (d / "schema.json").write_text(json.dumps({"labels": ["click", "purchase"], "sparse": ["user_id", "item_id"],
                                               "dense": ["price", "click"]}))


def _extra_column_in_train(d: Path) -> None:
    lines = (d / "train.csv").read_text().splitlines()
    (d / "train.csv").write_text("\n".join([lines[0] + ",extra", *(line + ",1" for line in lines[1:])]) + "\n")


def _label_in_schema_features(d: Path) -> None:
    (d / "schema.json").write_text(json.dumps({"labels": ["click"], "sparse": ["user_id", "item_id", "purchase"],
                                               "dense": ["price"], "user_id": "user_id"}))


def _huge_vocabulary(d: Path) -> None:
    _edit(d / "test.csv", 12, "item_id", str(2**40))


CASES = {
    "non-utf8": (_non_utf8, ["train.csv: row ", "not UTF-8 text (byte 0xff)"]),
    "non-utf8-schema-json": (_non_utf8_beyond_the_sample, ["train.csv: row ", "not UTF-8 text (byte 0xff)"]),
    "truncated-parquet": (_truncated_parquet, ["train.parquet: not a readable Parquet file"]),
    "long-cell": (_long_cell, ["train.csv: column 'price', row 5: expected a number, got 'xxx"]),
    "extra-field": (_extra_field, ["train.csv: row 4: 6 fields, the header has 5"]),
    "comma-in-value": (_comma_in_value, ["train.csv: row 9: 6 fields, the header has 5"]),
    "train-csv-and-parquet": (_both_formats, ["several train files (train.csv, train.parquet)"]),
    "duplicate-header-val": (_dupe_header_in("val"), ["val.csv: duplicate column(s) 'item_id'"]),
    "duplicate-header-test": (_dupe_header_in("test"), ["test.csv: duplicate column(s) 'item_id'"]),
    "val-symlink-loop": (_val_symlink_loop, ["val.csv: cannot read: Too many levels of symbolic links"]),
    "id-1e20": (_huge_id("1e20"), ["train.csv: column 'item_id', row 7: id 1e20 does not fit a signed 64-bit"]),
    "id-2^64-1": (_huge_id(str(2**64 - 1)),
                  [f"train.csv: column 'item_id', row 7: id {2**64 - 1} does not fit a signed 64-bit"]),
    "padded-header": (_padded_header, ["train.csv: column ' click' has spaces around its name (did you mean 'click'?"]),
    "semicolons": (_semicolons, ["train.csv: the header is the single column", "semicolon-delimited"]),
    "tabs": (_tabs, ["train.csv: the header is the single column", "tab-delimited"]),
    "label-also-a-feature-in-schema": (_label_and_feature_in_schema,
                                       ["schema.json: 'click' in both 'labels' and 'dense': a label is never a feature"]),
    "extra-column-in-train": (_extra_column_in_train,
                              ["train.csv: column 'extra' is in this file only (val.csv, test.csv lack it)"]),
    "label-in-schema-features": (_label_in_schema_features,
                                 ["schema.json", "'purchase'", "label in the spec but listed in 'sparse'"]),
    "vocabulary-bound": (_huge_vocabulary, ["test.csv: column 'item_id', row 12: id 1099511627776 would make an "
                                            "embedding table of 1099511627777 rows (16.0 TiB per 4 dimensions",
                                            '"hash_ids": {"item_id": 1048576}']),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_folder_is_one_error_line_and_no_run(tmp_path: Path, case: str) -> None:
    mutate, parts = CASES[case]
    folder = make(tmp_path / "data")
    mutate(folder)
    result, out = train(tmp_path, folder)
    refused(result, out, *parts)


def test_an_unreadable_train_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make(tmp_path / "data")

    def denied(path: Path):  # type: ignore[no-untyped-def]  # chmod 000 does not stop root, which tests may run as
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(datafiles, "open_csv", denied)
    result, out = train(tmp_path, folder)
    refused(result, out, "train.csv: cannot read: Permission denied")


def test_a_bom_gz_and_sample_names_train(tmp_path: Path) -> None:
    folder = make(tmp_path / "data")
    (folder / "train.csv").write_bytes(b"\xef\xbb\xbf" + (folder / "train.csv").read_bytes())
    test = (folder / "test.csv").read_bytes()
    (folder / "test.csv").unlink()
    (folder / "test.csv.gz").write_bytes(gzip.compress(test))
    result, out = train(tmp_path, folder)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["rows"] == {"train": 200, "val": 60, "test": 60}


def test_hash_ids_trains_a_huge_id_space_and_evaluate_reuses_it(tmp_path: Path) -> None:
    folder = make(tmp_path / "data")
    _huge_vocabulary(folder)
    _edit(folder / "train.csv", 3, "item_id", str(2**40 + 5))
    result, out = train(tmp_path, folder, "--hash-ids", "1024")
    assert result.exit_code == 0, result.output
    schema = catalog.schema_from_json((out / "schema.json").read_text())
    assert schema.vocab_sizes == {"user_id": 20, "item_id": 30}  # 2^40 + 5 -> 5 and 2^40 -> 0 (mod 1024): < 30
    assert json.loads((out / "metrics.json").read_text())["config"]["hash_ids"] == 1024
    evaluated = runner.invoke(app, ["evaluate", str(out)])
    assert evaluated.exit_code == 0, evaluated.output


# --- the remainder batch (Note [Remainder batch]) ---------------------------------------------------------


def test_a_final_batch_of_one_row_trains_with_batch_norm(tmp_path: Path) -> None:
    folder = make(tmp_path / "data", {"train": 257, "val": 60, "test": 60})
    result, out = train(tmp_path, folder, "--batch-size", "256")  # esmm's towers use BatchNorm
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 1  # the one-row remainder is skipped


def test_batch_size_one_with_batch_norm_is_refused(tmp_path: Path) -> None:
    result, out = train(tmp_path, make(tmp_path / "data"), "--batch-size", "1")
    refused(result, out, "--batch-size 1: the model uses batch_norm")


# --- trains, but says what is suspect ---------------------------------------------------------------------


def test_one_class_val_warns_and_does_not_stop_early(tmp_path: Path) -> None:
    folder = make(tmp_path / "data")
    rows = _rows(60, 1)
    for r in rows:
        r[3] = r[4] = "0"  # no click in val: cvr.auc (the monitor) is undefined
    (folder / "val.csv").write_text(_csv(HEADER, rows))
    (folder / "test.csv").write_text(_csv(HEADER, rows))
    result, out = train(tmp_path, folder, "--epochs", "3", "--patience", "1")
    assert result.exit_code == 0, result.output
    assert "warning: the monitored cvr.auc is undefined (one class in the val split)" in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["epochs"] == 3 and not metrics["train"]["stopped_early"]
    assert metrics["best_epoch"] == 3 and metrics["best_value"] is None
    assert "undefined: one class in the test split (" in result.stdout


def test_the_val_hold_out_is_recorded(tmp_path: Path) -> None:
    folder = make(tmp_path / "data", {"train": 200, "test": 60})
    result, out = train(tmp_path, folder)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "metrics.json").read_text())["data"]
    assert data["val_held_out"] == {"rows": 20, "of_train_rows": 200}
    assert data["rows"] == {"train": 180, "val": 20, "test": 60}


def test_purchase_without_click_is_counted_and_reported(tmp_path: Path) -> None:
    folder = make(tmp_path / "data")
    for row in (3, 8, 11):
        _edit(folder / "train.csv", row, "click", "0")
        _edit(folder / "train.csv", row, "purchase", "1")
    _edit(folder / "test.csv", 2, "click", "0")
    _edit(folder / "test.csv", 2, "purchase", "1")
    result, out = train(tmp_path, folder)
    assert result.exit_code == 0, result.output
    assert "warning: " in result.stderr and "rows with purchase = 1 and click = 0 (3 in train, 1 in test)" \
        in result.stderr
    data = json.loads((out / "metrics.json").read_text())["data"]
    assert data["unlinked_rows"] == [{"label": "purchase", "condition": "click", "rows": {"train": 3, "test": 1}}]


def test_a_copy_of_a_label_among_the_features_is_warned(tmp_path: Path) -> None:
    folder = make(tmp_path / "data")
    for split in ("train", "val", "test"):
        lines = (folder / f"{split}.csv").read_text().splitlines()
        header = lines[0].split(",")
        copied = [line + "," + line.split(",")[header.index("click")] for line in lines[1:]]
        (folder / f"{split}.csv").write_text("\n".join([lines[0] + ",clicked", *copied]) + "\n")
    result, out = train(tmp_path, folder)
    assert result.exit_code == 0, result.output
    assert "column 'clicked' equals the label 'click' on the first 200 rows" in result.stderr


# --- the user's folder is theirs (Note [The user's folder]) -----------------------------------------------


def test_nothing_is_written_into_the_folder_and_edits_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MTLDSL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = make(tmp_path / "data")
    for split in ("train", "val", "test"):  # a column more, to be removed below
        lines = (folder / f"{split}.csv").read_text().splitlines()
        (folder / f"{split}.csv").write_text("\n".join([lines[0] + ",age", *(x + ",3" for x in lines[1:])]) + "\n")
    before = sorted(p.name for p in folder.iterdir())
    result, _ = train(tmp_path, folder)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == before
    for split in ("train", "val", "test"):  # remove the column: the schema follows the data
        lines = (folder / f"{split}.csv").read_text().splitlines()
        (folder / f"{split}.csv").write_text("\n".join(x.rsplit(",", 1)[0] for x in lines) + "\n")
    result, _ = train(tmp_path / "again", folder)
    assert result.exit_code == 0, result.output
    _edit(folder / "train.csv", 2, "price", "n/a")
    result, out = train(tmp_path / "bad", folder)
    refused(result, out, "train.csv: column 'price', row 2: expected a number, got 'n/a'")
    _edit(folder / "train.csv", 2, "price", "0.5")  # fixed: valid again, not "expected an integer id"
    result, _ = train(tmp_path / "fixed", folder)
    assert result.exit_code == 0, result.output


# --- issue 9, part 2: the user's own data ------------------------------------------------------------------

SHORT_VIDEO = """model short_video "finish and like"
data synthetic

task finish binary label finish
task like binary label like where finish

embedding emb shared { dim 8  fields all }

tower per task { input emb  mlp [8] }

loss finish
loss like
"""


def _video_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rng = random.Random(3)
    for split, n in (("train", 120), ("val", 40), ("test", 40)):
        rows = []
        for _ in range(n):
            finish = int(rng.random() < 0.5)
            rows.append([str(rng.randrange(9)), str(rng.randrange(7)), f"{rng.random():.2f}", str(finish),
                         str(int(finish and rng.random() < 0.5))])
        (folder / f"{split}.csv").write_text(_csv(("user_id", "video_id", "watch", "finish", "like"), rows))
    return folder


def test_labels_the_spec_names_are_labels_for_check_compile_graph_and_train(tmp_path: Path) -> None:
    spec = tmp_path / "short_video.mtl"
    spec.write_text(SHORT_VIDEO)
    folder = _video_folder(tmp_path / "videos")
    check = runner.invoke(app, ["check", str(spec), "--data", str(folder)])
    assert check.exit_code == 0, check.output
    assert "ok (short_video: 2 tasks" in check.stdout
    compiled = runner.invoke(app, ["compile", str(spec), "--data", str(folder), "-o", str(tmp_path / "gen")])
    assert compiled.exit_code == 0, compiled.output
    source = (tmp_path / "gen" / "short_video.py").read_text()
    assert "SPARSE_FIELDS = ('user_id', 'video_id')" in source  # the labels are no features
    drawn = runner.invoke(app, ["graph", str(spec), "--data", str(folder), "-o", str(tmp_path / "g.dot")])
    assert drawn.exit_code == 0, drawn.output
    result, out = train(tmp_path, folder, spec=spec)
    assert result.exit_code == 0, result.output
    assert set(json.loads((out / "metrics.json").read_text())["tasks"]) >= {"finish", "like"}
    assert sorted(p.name for p in folder.iterdir()) == ["test.csv", "train.csv", "val.csv"]
    recorded = catalog.schema_from_json((out / "schema.json").read_text())  # the schema the run read, in the run
    assert recorded.labels == ("finish", "like") and recorded.sparse == ("user_id", "video_id")
    assert recorded.vocab_sizes == {"user_id": 9, "video_id": 7}


def test_without_the_spec_the_hint_names_what_exists(tmp_path: Path) -> None:
    folder = _video_folder(tmp_path / "videos")
    with pytest.raises(catalog.DataError, match=r"name the label columns in the spec \(`task <name> binary label "
                                                r"<column>`\) or in .*schema\.json"):
        catalog.schema_for(str(folder))


def test_a_schema_json_that_contradicts_the_spec_is_an_error(tmp_path: Path) -> None:
    spec = tmp_path / "short_video.mtl"
    spec.write_text(SHORT_VIDEO)
    folder = _video_folder(tmp_path / "videos")
    (folder / "schema.json").write_text(json.dumps({"labels": ["finish"], "sparse": ["user_id", "video_id", "like"],
                                                    "dense": ["watch"]}))  # e.g. inferred by an older mtldsl
    check = runner.invoke(app, ["check", str(spec), "--data", str(folder)])
    assert check.exit_code == 1
    assert "schema.json: column 'like' is a label in the spec but listed in 'sparse' here" in check.stderr
    assert "Traceback" not in check.stderr
    result, out = train(tmp_path, folder, spec=spec)
    refused(result, out, "column 'like' is a label in the spec but listed in 'sparse' here")
