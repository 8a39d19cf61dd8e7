"""`mtldsl compare` (workbench/compare.py, report.py): tiny runs, reuse and resume, the files, the errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from mtldsl.cli import app
from mtldsl.workbench.compare import verdict

SPECS = Path(__file__).resolve().parents[1] / "specs"
runner = CliRunner()
TINY = ["--rows", "1500", "--epochs", "1", "--no-progress"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compare")
    result = runner.invoke(app, ["compare", str(SPECS / "ple.mtl"), str(SPECS / "stem.mtl"), "--seeds", "0,1",
                                 "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    return out


def test_one_run_folder_per_spec_and_seed_and_the_four_files(compared: Path) -> None:
    for spec in ("ple", "stem"):
        for seed in (0, 1):
            run = compared / "runs" / spec / f"seed{seed}"
            assert (run / "metrics.json").is_file() and (run / "test_predictions.parquet").is_file()
            assert json.loads((run / "metrics.json").read_text())["config"]["seed"] == seed
    for name in ("comparison.md", "comparison.csv", "comparison.json", "comparison.png"):
        assert (compared / name).stat().st_size > 0
    md = (compared / "comparison.md").read_text()
    assert "baseline **ple**" in md and "## cvr auc" in md and "DeLong" in md
    frame = pd.read_csv(compared / "comparison.csv")
    assert set(frame["entry"]) == {"ple", "stem"}
    assert set(frame[frame["entry"] == "ple"]["verdict"]) == {"baseline"}


def test_statistics_are_those_of_the_runs(compared: Path) -> None:
    data = json.loads((compared / "comparison.json").read_text())
    per_seed = {s: json.loads((compared / "runs" / "stem" / f"seed{s}" / "metrics.json").read_text())
                for s in (0, 1)}
    base = {s: json.loads((compared / "runs" / "ple" / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)}
    row = next(r for r in data["metrics"] if (r["entry"], r["output"], r["metric"]) == ("stem", "ctr", "logloss"))
    values = [per_seed[s]["tasks"]["ctr"]["logloss"] for s in (0, 1)]
    assert row["seeds"] == pytest.approx(values)
    assert row["mean"] == pytest.approx(sum(values) / 2) and row["spread"] == pytest.approx(abs(values[0] - values[1]))
    diffs = [values[s] - base[s]["tasks"]["ctr"]["logloss"] for s in (0, 1)]
    assert row["diff_mean"] == pytest.approx(sum(diffs) / 2)
    entry = next(e for e in data["entries"] if e["label"] == "stem")
    assert entry["params"] == per_seed[0]["params"]


def test_delong_aucs_are_the_runs_test_aucs(compared: Path) -> None:
    data = json.loads((compared / "comparison.json").read_text())
    rows = [r for r in data["delong"] if r["output"] == "ctr"]
    assert [r["seed"] for r in rows] == [0, 1]
    for r in rows:
        mine = json.loads((compared / "runs" / "stem" / f"seed{r['seed']}" / "metrics.json").read_text())
        theirs = json.loads((compared / "runs" / "ple" / f"seed{r['seed']}" / "metrics.json").read_text())
        assert r["auc"] == pytest.approx(mine["tasks"]["ctr"]["auc"], abs=1e-6)
        assert r["baseline_auc"] == pytest.approx(theirs["tasks"]["ctr"]["auc"], abs=1e-6)
        assert r["se"] > 0 and 0 <= r["p"] <= 1


def test_a_second_compare_reuses_and_an_interrupted_run_resumes(compared: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    shutil.copytree(compared, out)
    finished = out / "runs" / "ple" / "seed0" / "checkpoint.pt"
    stamp = finished.stat().st_mtime_ns
    interrupted = out / "runs" / "stem" / "seed1"
    old = json.loads((interrupted / "metrics.json").read_text())
    (interrupted / "metrics.json").unlink()  # as if killed after its last checkpoint
    (interrupted / "test_predictions.parquet").unlink()
    result = runner.invoke(app, ["compare", str(SPECS / "ple.mtl"), str(SPECS / "stem.mtl"), "--seeds", "0,1",
                                 "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    assert finished.stat().st_mtime_ns == stamp  # reused, not retrained
    new = json.loads((interrupted / "metrics.json").read_text())
    assert new["tasks"]["ctr"]["auc"] == pytest.approx(old["tasks"]["ctr"]["auc"])
    assert (interrupted / "test_predictions.parquet").is_file()


def test_reusing_runs_of_other_settings_is_an_error(compared: Path, tmp_path: Path) -> None:
    out = tmp_path / "other"
    shutil.copytree(compared, out)
    result = runner.invoke(app, ["compare", str(SPECS / "ple.mtl"), "--seeds", "0", "--out", str(out),
                                 "--rows", "1600", "--epochs", "1", "--no-progress"])
    assert result.exit_code == 1 and "rows=1500, not 1600" in result.output


def test_set_variants_are_named_after_their_settings(tmp_path: Path) -> None:
    result = runner.invoke(app, ["compare", str(SPECS / "stem.mtl"), "--set", "g.experts[other]=forward,off",
                                 "--seeds", "0", "--out", str(tmp_path), *TINY])
    assert result.exit_code == 0, result.output
    labels = [e["label"] for e in json.loads((tmp_path / "comparison.json").read_text())["entries"]]
    assert labels == ["stem g.experts[other]=forward", "stem g.experts[other]=off"]
    off = (tmp_path / "specs" / "stem_g.experts_other_=off.mtl").read_text()
    assert "mix experts[other]" not in off and "mix experts[own] forward backward" in off
    assert "n/a (one seed)" in (tmp_path / "comparison.md").read_text()


@pytest.mark.parametrize(("args", "message"), [
    (["--baseline", "mmoe"], "baseline 'mmoe' is not among the specs compared (ple, stem)"),
    (["--set", "specifc.count=1,2"], "declares no embedding, experts or gate 'specifc' (did you mean 'specific'?)"),
    (["--set", "specific.cont=1,2"], "unknown property 'cont' of experts 'specific' (did you mean 'count'?)"),
    (["--set", "g.specific[own]=fwd"], "a route's visibility is forward, forward+backward, off"),
    (["--seeds", "0,x"], "--seeds '0,x': expected distinct integers"),
])
def test_bad_arguments_are_one_line_before_any_training(args: list[str], message: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["compare", str(SPECS / "ple.mtl"), str(SPECS / "stem.mtl"), "--out", str(tmp_path),
                                 *args, *TINY])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_specs_of_different_datasets_are_an_error(tmp_path: Path) -> None:
    other = tmp_path / "census.mtl"
    other.write_text((SPECS / "ple.mtl").read_text().replace("data synthetic", "data census_income"))
    result = runner.invoke(app, ["compare", str(SPECS / "ple.mtl"), str(other), "--out", str(tmp_path), *TINY])
    assert result.exit_code == 1 and "runs of different datasets compared together" in result.output


def test_verdict_needs_the_ranges_apart() -> None:
    assert verdict([0.71, 0.72], [0.69, 0.70], True) == "ahead beyond the seed spread"
    assert verdict([0.71, 0.72], [0.69, 0.715], True) == "within the seed spread"
    assert verdict([0.30, 0.31], [0.35, 0.36], False) == "ahead beyond the seed spread"
    assert verdict([0.60, 0.61], [0.69, 0.70], True) == "behind beyond the seed spread"
    assert verdict([0.7], [0.6], True) == "n/a (one seed)"


def test_an_invalid_variant_is_reported_at_its_line_before_any_training(tmp_path: Path) -> None:
    result = runner.invoke(app, ["compare", str(SPECS / "stem.mtl"), "--set", "emb.dim=16,8", "--out", str(tmp_path),
                                 *TINY])
    assert result.exit_code == 1 and "stem_emb.dim=8.mtl:" in result.output and "error:" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "runs").exists()


def test_specs_with_different_outputs_pair_only_the_common_ones(tmp_path: Path) -> None:
    result = runner.invoke(app, ["compare", str(SPECS / "esmm.mtl"), str(SPECS / "mmoe.mtl"), "--seeds", "0",
                                 "--out", str(tmp_path), *TINY])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "comparison.json").read_text())
    outputs = {(r["entry"], r["output"]) for r in data["metrics"]}
    assert ("esmm", "ctcvr") in outputs and ("mmoe", "ctcvr") not in outputs
    assert {r["output"] for r in data["delong"]} <= {"ctr", "cvr", "cvr@click"}
