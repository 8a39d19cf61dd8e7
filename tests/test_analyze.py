"""`mtldsl analyze` (workbench/analyze.py, singles.py, embeddings.py, analyze_report.py) on tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mtldsl.cli import app
from mtldsl.parser import parse_file
from mtldsl.pipeline import check_text
from mtldsl.printer import print_spec
from mtldsl.runtime.trainer import train
from mtldsl.workbench.analyze import buckets, gate_columns, score_run, subsets
from mtldsl.workbench.singles import single_spec

SPECS = Path(__file__).resolve().parents[1] / "specs"
runner = CliRunner()
TINY = {"rows": 1500, "epochs": 1, "progress": False}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("analyze")
    runs = {}
    for name in ("stem", "mmoe"):
        train(SPECS / f"{name}.mtl", out=root / name, **TINY)
        runs[name] = root / name
    return runs


@pytest.fixture(scope="module")
def analysed(trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("analysis")
    result = runner.invoke(app, ["analyze", str(trained["stem"]), str(trained["mmoe"]), "--out", str(out),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


def test_buckets_are_equal_frequency_and_subsets_follow_d() -> None:
    scores = np.random.default_rng(0).random(1000)
    assert np.bincount(buckets(scores)).tolist() == [100] * 10
    a = np.arange(100.0)
    b = np.arange(100.0)[::-1].copy()  # opposite preferences
    masks = subsets(a, b, "ctr", "cvr", 3)
    d = buckets(a) - buckets(b)
    assert (masks["ctr-overwhelming"] == (d >= 3)).all() and (masks["comparable"] == (np.abs(d) < 3)).all()
    assert sum(int(m.sum()) for m in masks.values()) == 100
    same = subsets(a, a, "ctr", "cvr", 3)
    assert same["comparable"].all()


def test_single_task_spec_is_valid_and_keeps_the_task_and_loss() -> None:
    spec = parse_file(SPECS / "stem.mtl")[1]
    text = print_spec(single_spec(spec, "cvr"))
    checked = check_text(text)
    assert checked.ok, text
    assert [t.name for t in checked.model.tasks] == ["cvr"] and checked.model.tasks[0].where == ("click",)
    assert "monitor" not in text and "lr 0.001" in text


def test_gate_hooks_read_the_softmax_in_route_order(trained: dict[str, Path]) -> None:
    scored = score_run(trained["stem"])
    assert scored.gate_columns["g_ctr"] == [("experts_shared", 0), ("experts_ctr", 0), ("experts_cvr", 0)]
    w = scored.gates["g_ctr"]
    assert w.shape == (len(scored.outputs["ctr"]), 3)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-2)  # bf16 autocast may round the softmax
    checked = check_text((trained["stem"] / "spec.mtl").read_text())
    assert gate_columns(checked.model)["g_cvr"] == [("experts_shared", 0), ("experts_cvr", 0), ("experts_ctr", 0)]


def test_files_subsets_and_single_task_runs(analysed: Path, trained: dict[str, Path]) -> None:
    for name in ("analysis.md", "analysis.json", "subsets.png", "gate_mass.png"):
        assert (analysed / name).stat().st_size > 0
    for task in ("ctr", "cvr"):  # trained with the run's settings
        config = json.loads((analysed / "single" / task / "metrics.json").read_text())["config"]
        assert config["rows"] == 1500 and config["epochs"] == 1 and config["monitor"] == f"{task}.auc"
    data = json.loads((analysed / "analysis.json").read_text())
    sizes = {r["subset"]: r["n"] for r in data["subsets"] if r["run"] == "stem" and r["output"] == "ctr"}
    assert set(sizes) == {"ctr-overwhelming", "comparable", "cvr-overwhelming"}
    test_rows = json.loads((trained["stem"] / "metrics.json").read_text())["tasks"]["ctr"]["n"]
    assert sum(sizes.values()) == test_rows
    assert {r["run"] for r in data["subsets"]} == {"stem", "mmoe", "single-task"}
    md = (analysed / "analysis.md").read_text()
    assert "## STEM subsets of ctr/cvr (k = 3" in md and "| single-task |" in md


def test_gate_mass_sums_to_one_per_gate(analysed: Path) -> None:
    data = json.loads((analysed / "analysis.json").read_text())
    overall = [r for r in data["gate_mass"] if r["subset"] == "all"]
    assert {(r["run"], r["gate"]) for r in overall} == {("stem", "g_ctr"), ("stem", "g_cvr"),
                                                        ("mmoe", "g_ctr"), ("mmoe", "g_cvr")}
    for r in data["gate_mass"]:
        assert sum(r["groups"].values()) == pytest.approx(1.0, abs=1e-2)
        assert sum(r["experts"].values()) == pytest.approx(sum(r["groups"].values()))
    mmoe = next(r for r in overall if r["run"] == "mmoe")
    assert list(mmoe["groups"]) == ["experts"] and len(mmoe["experts"]) == 8


def test_embedding_distances_only_for_per_task_tables(analysed: Path, trained: dict[str, Path]) -> None:
    data = json.loads((analysed / "analysis.json").read_text())
    rows = data["embeddings"]
    assert {r["run"] for r in rows} == {"stem"}  # mmoe has one shared table
    assert {r["table"] for r in rows} == {"emb_shared", "emb_ctr", "emb_cvr"}
    every = [r for r in rows if r["rows_with"] == "all"]
    assert all(0.0 <= r["distance"] <= 2.0 for r in every)
    parts = [r for r in rows if r["table"] == "emb_ctr" and r["rows_with"] != "all"]
    assert sum(r["rows"] for r in parts) == every[0]["rows"]


def test_embedding_rows_are_the_tables_lookups(trained: dict[str, Path]) -> None:
    """The row offsets[f] + v that embeddings.py reads is what the table's forward returns for field f."""
    from mtldsl.runtime.checkpoint import load_run

    loaded = load_run(trained["stem"])
    batch = next(loaded.prepared.splits["test"].batches(16, shuffle=False))
    table = loaded.model.emb_ctr
    fields = loaded.prepared.checked.model.embeddings[1].fields
    f = fields.index("205")
    col = list(loaded.prepared.cls.SPARSE_FIELDS).index("205")
    with torch.inference_mode():
        looked_up = table(batch["sparse"], None)[:, f * table.dim:(f + 1) * table.dim]
        direct = table.embedding.weight[batch["sparse"][:, col].long() + table.offsets[f]]
    torch.testing.assert_close(looked_up.float(), direct.float())


def test_bad_inputs_are_one_line(trained: dict[str, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, ["analyze", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "not a finished run folder" in result.output
    result = runner.invoke(app, ["analyze", str(trained["stem"]), "--single", str(trained["mmoe"]),
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "a single-task run has exactly one task" in result.output
    result = runner.invoke(app, ["analyze", str(trained["stem"]), "--k", "12", "--out", str(tmp_path / "o"),
                                 "--single", str(trained["stem"])])
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_log_conflict_records_cosines_and_changes_nothing_else(tmp_path: Path, monkeypatch) -> None:
    import mtldsl.runtime.loop as loop
    from mtldsl.workbench.analyze import conflict_summary

    def never(*_a, **_k):  # type: ignore[no-untyped-def]
        raise AssertionError("per-task gradients computed without --log-conflict")

    with monkeypatch.context() as m:
        m.setattr(loop, "gradient_cosines", never)
        plain = train(SPECS / "stem.mtl", out=tmp_path / "plain", rows=1500, epochs=2, progress=False)
    logged = train(SPECS / "stem.mtl", out=tmp_path / "logged", rows=1500, epochs=2, log_conflict=1, progress=False)
    assert not (tmp_path / "plain" / "conflict.csv").exists()
    assert logged.metrics["tasks"] == plain.metrics["tasks"]  # recording does not change training
    lines = (tmp_path / "logged" / "conflict.csv").read_text().splitlines()
    steps = logged.metrics["train"]["steps"]
    assert lines[0] == "step,epoch,ctr/cvr" and len(lines) == 1 + steps
    values = [float(line.split(",")[2]) for line in lines[1:]]
    assert all(-1.0 <= v <= 1.0 for v in values)
    history = (tmp_path / "logged" / "history.csv").read_text().splitlines()
    assert "conflict_ctr/cvr" in history[0].split(",")
    assert (tmp_path / "logged" / "conflict.png").stat().st_size > 0
    (summary,) = conflict_summary(tmp_path / "logged", "stem")
    assert summary["records"] == steps and summary["mean"] == pytest.approx(sum(values) / len(values))


def test_gradient_cosines_of_known_gradients() -> None:
    from mtldsl.runtime.conflict import gradient_cosines

    w = torch.tensor([1.0, 2.0], requires_grad=True)
    losses = {"a": (w * torch.tensor([1.0, 0.0])).sum(), "b": (w * torch.tensor([-1.0, 0.0])).sum(),
              "c": (w * torch.tensor([0.0, 3.0])).sum()}
    got = gradient_cosines(losses, [w])
    assert got == pytest.approx({"a/b": -1.0, "a/c": 0.0, "b/c": 0.0})


def test_conflict_records_survive_a_resume(tmp_path: Path) -> None:
    whole = train(SPECS / "stem.mtl", out=tmp_path / "whole", rows=1500, epochs=2, log_conflict=1, progress=False)
    train(SPECS / "stem.mtl", out=tmp_path / "split", rows=1500, epochs=1, log_conflict=1, progress=False)
    resumed = train(SPECS / "stem.mtl", out=tmp_path / "split", resume=True, epochs=2, log_conflict=1,
                    progress=False)
    assert resumed.metrics["train"]["steps"] == whole.metrics["train"]["steps"]
    assert (tmp_path / "split" / "conflict.csv").read_text() == (tmp_path / "whole" / "conflict.csv").read_text()
