"""`mtldsl train / evaluate / predict` through Typer's CliRunner, on tiny synthetic data and bad inputs."""

from __future__ import annotations

import os

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from mtldsl.cli import app

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    result = runner.invoke(app, ["train", str(ROOT / "specs" / "esmm.mtl"), "--rows", "1500", "--epochs", "1",
                                 "--batch-size", "256", "--seed", "1", "--out", str(out), "--no-progress",
                                 "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    return out


def test_train_prints_table_and_run_folder(run_dir: Path) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"] == "esmm" and metrics["config"]["seed"] == 1 and metrics["config"]["rows"] == 1500
    assert metrics["config"]["precision"] == "fp32" and metrics["train"]["precision"] == "fp32"
    for name in ("spec.mtl", "model.py", "checkpoint.pt", "history.csv", "curve.png"):
        assert (run_dir / name).is_file()


def test_train_stdout_is_the_table(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(ROOT / "specs" / "shared_bottom.mtl"), "--rows", "600", "--epochs", "1",
                                 "--batch-size", "128", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["output", "auc", "logloss", "gauc", "n"]
    assert [line.split()[0] for line in lines[1:4]] == ["ctr", "cvr", "cvr@click"]
    assert lines[-1] == f"run folder: {out}"
    assert result.stderr == ""  # --no-progress: no bar, no epoch lines


def test_train_bad_precision_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(ROOT / "specs" / "shared_bottom.mtl"), "--rows", "300",
                                 "--precision", "fp16", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "unknown precision 'fp16'" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_train_default_run_folder_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", str(ROOT / "specs" / "single_task.mtl"), "--rows", "500",
                                 "--epochs", "1", "--batch-size", "128"])
    assert result.exit_code == 0, result.output
    folders = list((tmp_path / "runs").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("single_task-synthetic-")
    assert "epoch 1/1" in result.stderr  # per-epoch line with progress on


def test_evaluate_reproduces_the_test_table(run_dir: Path) -> None:
    result = runner.invoke(app, ["evaluate", str(run_dir)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    table = result.stdout.splitlines()
    assert table[0].split()[0] == "output"
    rows = {line.split()[0]: line.split() for line in table[1:] if not line.startswith("undefined: ")}
    assert set(rows) == set(metrics["tasks"])
    assert all(line.startswith("undefined: ") for line in table[1 + len(rows):])  # why a metric is undefined
    assert float(rows["ctr"][1]) == pytest.approx(metrics["tasks"]["ctr"]["auc"], abs=1e-4)
    val = runner.invoke(app, ["evaluate", str(run_dir), "--split", "val"])
    assert val.exit_code == 0 and val.stdout != result.stdout


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_predict_writes_one_column_per_output_and_labels(run_dir: Path, tmp_path: Path, suffix: str) -> None:
    target = tmp_path / f"preds{suffix}"
    result = runner.invoke(app, ["predict", str(run_dir), "-o", str(target)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(target) if suffix == ".csv" else pd.read_parquet(target)
    assert len(frame) == 150  # the test split of 1500 synthetic rows
    for col in ("ctr", "cvr", "ctcvr", "label_click", "label_purchase"):
        assert col in frame.columns
    assert ((frame["ctr"] > 0) & (frame["ctr"] < 1)).all()
    assert (frame["ctcvr"] - frame["ctr"] * frame["cvr"]).abs().max() < 1e-6


def test_predict_rejects_unknown_format(run_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["predict", str(run_dir), "-o", str(tmp_path / "p.xlsx")])
    assert result.exit_code == 1 and "use .parquet or .csv" in result.stderr


def test_predict_on_a_shared_sample(run_dir: Path, tmp_path: Path) -> None:
    data = SHARED / "ali-ccp"
    if not data.is_dir():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{data} is absent")  # CI has ../shared
    # The synthetic run's vocabularies differ from the sample's: ids beyond them are refused by column and row.
    result = runner.invoke(app, ["predict", str(run_dir), "--data", str(data), "-o", str(tmp_path / "p.csv")])
    assert result.exit_code in (0, 1)
    if result.exit_code == 1:
        assert result.stderr.startswith("error: ") and "column '" in result.stderr and "row " in result.stderr


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_bad_data_folder_is_one_error_line(tmp_path: Path) -> None:
    data = SHARED / "ali-ccp"
    if not data.is_dir():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{data} is absent")  # CI has ../shared
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    train_file = bad / "ali_ccp_train_sample.csv"
    lines = train_file.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[7].split(",")
    cells[header.index("D509")] = "n/a"
    lines[7] = ",".join(cells)
    train_file.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(ROOT / "specs" / "mmoe.mtl"), "--data", str(bad), "--out", str(out),
                                 "--no-progress"])
    assert result.exit_code == 1
    line = _one_error_line(result.stderr)
    assert line == f"error: {train_file}: column 'D509', row 7: expected a number, got 'n/a'"
    assert not out.exists()  # nothing half-written


def test_binary_label_outside_0_1_is_refused(tmp_path: Path) -> None:
    data = SHARED / "ali-ccp"
    if not data.is_dir():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{data} is absent")  # CI has ../shared
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    val = bad / "ali_ccp_val_sample.csv"
    lines = val.read_text().splitlines()
    cells = lines[3].split(",")
    cells[0] = "2"  # click
    lines[3] = ",".join(cells)
    val.write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["train", str(ROOT / "specs" / "esmm.mtl"), "--data", str(bad), "--no-progress",
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    line = _one_error_line(result.stderr)
    assert "column 'click', row 3" in line and "0 or 1" in line


def test_missing_named_dataset_prints_the_data_layer_message(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(ROOT / "specs" / "mmoe.mtl"), "--data", "ali_ccp",
                                 "--data-dir", str(tmp_path / "nowhere"), "--no-progress"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: dataset 'ali_ccp'")
    assert "not found" in result.stderr and "mtldsl data prepare ali_ccp" in result.stderr
    assert "Traceback" not in result.output


def test_bad_spec_prints_diagnostics(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mtl"
    bad.write_text((ROOT / "specs" / "mmoe.mtl").read_text().replace("mix experts", "mix exprts"))
    result = runner.invoke(app, ["train", str(bad), "--no-progress"])
    assert result.exit_code == 1
    assert f"{bad}:" in result.stderr and "did you mean 'experts'?" in result.stderr and "^^^^^^" in result.stderr


def test_spec_fields_missing_from_the_data_are_positioned(tmp_path: Path) -> None:
    data = SHARED / "census-income"
    if not data.is_dir():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{data} is absent")  # CI has ../shared
    spec = tmp_path / "x.mtl"
    spec.write_text('model x\ntask income binary label income\nembedding emb shared { dim 4 fields ["101"] }\n'
                    "tower income { input emb mlp [4] }\nloss income\n")
    result = runner.invoke(app, ["train", str(spec), "--data", str(data), "--no-progress"])
    assert result.exit_code == 1
    assert f"{spec}:3:38: error: dataset 'census_income' has no sparse field '101'" in result.stderr


@pytest.mark.parametrize(("flags", "message"), [
    (["--optimizer", "adamm"], "error: unknown optimizer 'adamm' (did you mean 'adam'?)"),
    (["--weighting", "uwll"], "error: unknown weighting 'uwll' (did you mean 'uwl'?)"),
    (["--monitor", "ctr.mse"], "error: monitor 'ctr.mse': mse needs a regression output, and 'ctr' is binary "
                               "(monitor 'ctr.auc' or 'ctr.logloss')"),
    (["--epochs", "0"], "error: --epochs must be positive, got 0"),
    (["--lr", "nan"], "error: --lr must be a positive finite number, got nan"),
    (["--lr", "inf"], "error: --lr must be a positive finite number, got inf"),
    (["--lr", "-0.5"], "error: --lr must be a positive finite number, got -0.5"),
    (["--device", "tpu"], "error: unknown device 'tpu'"),
    (["--resume"], "error: --resume needs --out RUN_DIR"),
    (["--sparse-embeddings", "yes"], "error: unknown --sparse-embeddings setting 'yes'; one of auto, on, off"),
])
def test_bad_settings_are_one_error_line(flags: list[str], message: str) -> None:
    result = runner.invoke(app, ["train", str(ROOT / "specs" / "mmoe.mtl"), "--rows", "500", "--no-progress", *flags])
    assert result.exit_code == 1
    assert _one_error_line(result.stderr).startswith(message)


def test_diverging_run_is_one_error_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(ROOT / "specs" / "shared_bottom.mtl"), "--rows", "3000",
                                 "--batch-size", "256", "--lr", "1e30", "--optimizer", "sgd", "--no-progress",
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert _one_error_line(result.stderr).startswith("error: training diverged: loss '")


def test_evaluate_not_a_run_folder(tmp_path: Path) -> None:
    result = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert result.exit_code == 1 and "not a finished run folder" in result.stderr


def test_front_end_stays_torch_free() -> None:
    code = "import mtldsl.cli, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_train_flags_are_the_declared_options() -> None:
    """`mtldsl train`'s flags are runtime/config.py's OPTIONS, each listed in --help with its help text."""
    from mtldsl.runtime.config import OPTIONS

    result = CliRunner().invoke(app, ["train", "--help"], terminal_width=400)
    assert result.exit_code == 0
    flags = [o for o in OPTIONS if o.cli]
    assert {o.name for o in flags} >= {"epochs", "batch_size", "lr", "monitor", "precision", "sparse_embeddings"}
    for o in flags:
        assert o.flag in result.output, o.flag
        if o.help:
            assert " ".join(o.help.split()) in " ".join(result.output.split()), o.name


def test_train_a_packaged_spec_by_name_from_another_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`mtldsl train shared_bottom`: a bare name is the packaged spec (Note [Packaged resources]); its run
    folder keeps the spec's text."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "shared_bottom", "--rows", "300", "--epochs", "1", "--batch-size", "128",
                                 "--out", "run", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "spec.mtl").read_text() == (ROOT / "specs" / "shared_bottom.mtl").read_text()


def test_train_a_directory_or_bad_bytes_is_one_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(tmp_path), "--rows", "300"])
    assert result.exit_code == 1 and "is a directory, not a spec file" in result.stderr
    spec = tmp_path / "bad.mtl"
    spec.write_bytes((ROOT / "specs" / "shared_bottom.mtl").read_bytes() + b"\xff")
    result = runner.invoke(app, ["train", str(spec), "--rows", "300", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "the file is not valid UTF-8: byte 0xFF" in result.stderr
    assert "Traceback" not in result.output
