"""The generic trainer: every spec trains, losses/domains/metrics come from the IR, checkpoints resume exactly.

Tiny synthetic data and small batches keep this file fast on 2 cores; quality is checked on one larger run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtldsl.diagnostics import SpecError
from mtldsl.pipeline import check_text
from mtldsl.runtime import loop, objective, runs, trainer
from mtldsl.runtime.trainer import ConfigError, Objective, TrainingDiverged, format_table, shared_parameters, train

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.mtl"))
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = ("spec.mtl", "model.py", "checkpoint.pt", "last.pt", "metrics.json", "history.csv", "curve.png")

CENSUS_SPEC = """
model census_mmoe "MMoE on census-income"
task income binary label income
task marital binary label "marital status"
embedding emb shared { dim 4  fields all  dense all }
experts experts shared { count 2  input emb  mlp [16] }
gate g per task { input emb  mix experts }
tower per task { input g  mlp [8] }
loss income
loss marital
"""

ALIEXPRESS_SPEC = """
model aliexpress_esmm "ESMM on AliExpress"
task ctr binary label click
task cvr binary label conversion where click
output ctcvr = ctr * cvr label click * conversion
embedding emb shared { dim 4  fields all  dense all }
tower per task { input emb  mlp [16] }
loss ctr
loss ctcvr
"""


def _quick(spec: Path | str, tmp: Path, **kw: object) -> trainer.RunResult:
    args: dict[str, object] = dict(rows=2000, epochs=1, batch_size=256, out=tmp / "run", progress=False)
    args.update(kw)
    return train(spec, **args)  # type: ignore[arg-type]


def _assert_contract(run_dir: Path, outputs: list[str]) -> dict:
    for name in FILES:
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob(".*.tmp")), "a temporary file was left behind"
    m = json.loads((run_dir / "metrics.json").read_text())
    for key in ("model", "dataset", "params", "tasks", "train", "best_epoch", "monitor", "config"):
        assert key in m, key
    assert m["params"] > 0
    assert set(m["train"]) >= {"epochs", "seconds", "samples_per_second"}
    assert m["train"]["samples_per_second"] > 0
    for out in outputs:
        assert {"auc", "logloss", "n"} <= set(m["tasks"][out]), out
        assert math.isfinite(m["tasks"][out]["logloss"])
    history = (run_dir / "history.csv").read_text().splitlines()
    header = history[0].split(",")
    losses = [c for c in header if c.startswith("train_loss_")]
    assert losses
    for row in history[1:]:
        values = dict(zip(header, row.split(",")))
        assert all(math.isfinite(float(values[c])) for c in losses)
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    return m


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_every_spec_trains_one_epoch_on_synthetic(spec: Path, tmp_path: Path) -> None:
    result = _quick(spec, tmp_path)
    checked = check_text(spec.read_text(), str(spec))
    assert checked.model is not None
    labelled = [o.name for o in checked.model.outputs if o.label]
    m = _assert_contract(result.run_dir, labelled)
    assert m["model"] == checked.model.name and m["dataset"] == "synthetic" and m["train"]["epochs"] == 1
    assert result.table.splitlines()[0].split()[:3] == ["output", "auc", "logloss"]
    for o in checked.model.outputs:
        if o.label and o.where:
            assert f"{o.name}@{'*'.join(o.where)}" in m["tasks"]


def test_esmm_reports_cvr_on_clicked_rows(tmp_path: Path) -> None:
    result = _quick(ROOT / "specs" / "esmm.mtl", tmp_path)
    tasks = result.metrics["tasks"]
    assert set(tasks) == {"ctr", "cvr", "cvr@click", "ctcvr"}
    assert 0 < tasks["cvr@click"]["n"] < tasks["cvr"]["n"]
    assert "gauc" in tasks["ctr"]  # synthetic data has a user id


SHIPPED = sorted((ROOT / "specs").glob("*.mtl"))


@pytest.mark.parametrize(
    ("folder", "spec"),
    [*(("ali-ccp", p) for p in SHIPPED),  # every shipped spec reads Ali-CCP's layout as it is
     ("census-income", CENSUS_SPEC), ("aliexpress", ALIEXPRESS_SPEC)],
    ids=[*(f"ali-ccp-{p.stem}" for p in SHIPPED), "census-income", "aliexpress"],
)
def test_shared_samples_train(folder: str, spec: Path | str, tmp_path: Path) -> None:
    data = SHARED / folder
    if not data.is_dir():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{data} is absent")  # CI has ../shared
    if isinstance(spec, str):
        path = tmp_path / "spec.mtl"
        path.write_text(spec)
        spec = path
    result = _quick(spec, tmp_path, data=str(data), rows=None, batch_size=32)
    checked = check_text(spec.read_text(), str(spec))
    assert checked.model is not None
    m = _assert_contract(result.run_dir, [o.name for o in checked.model.tasks])
    assert m["dataset"] == str(data)
    assert not (data / "schema.json").exists() or folder not in ("ali-ccp", "census-income", "aliexpress")


def test_missing_fields_are_positioned_spec_errors(tmp_path: Path) -> None:
    data = SHARED / "census-income"
    if not data.is_dir():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{data} is absent")  # CI has ../shared
    with pytest.raises(SpecError) as info:
        train(ROOT / "specs" / "esmm.mtl", data=str(data), out=tmp_path / "run", progress=False)
    text = str(info.value)
    assert "specs/esmm.mtl:8:" in text and "unknown label column 'click'" in text
    assert not (tmp_path / "run").exists()


def _untrained_metrics(result: trainer.RunResult) -> dict:
    run = trainer.load_run(result.run_dir, device="cpu")
    torch.manual_seed(12345)
    fresh = run.prepared.cls(run.checkpoint["vocab_sizes"]).eval()
    return objective.evaluate_split(fresh, run.prepared.splits["test"], run.prepared.objective, 4096,
                                    torch.device("cpu"), run.precision)


def test_larger_synthetic_run_learns(tmp_path: Path) -> None:
    result = _quick(ROOT / "specs" / "mmoe.mtl", tmp_path, rows=30_000, epochs=2, batch_size=256, lr=0.005)
    tasks = result.metrics["tasks"]
    untrained = _untrained_metrics(result)
    # 3000 test rows: ~180 clicks but only ~27 purchases, so the CVR AUC is noisy; CTR must clearly learn.
    assert tasks["ctr"]["auc"] > 0.57 and tasks["ctr"]["auc"] > untrained["ctr"]["auc"] + 0.04, (tasks, untrained)
    assert tasks["cvr"]["auc"] > 0.5 and tasks["cvr"]["auc"] > untrained["cvr"]["auc"], (tasks, untrained)
    for name in ("ctr", "cvr"):
        assert tasks[name]["logloss"] < untrained[name]["logloss"] - 0.1


def _params(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_resume_after_epoch_equals_uninterrupted(tmp_path: Path) -> None:
    spec = ROOT / "specs" / "shared_bottom.mtl"
    full = _quick(spec, tmp_path / "a", rows=1500, epochs=2, seed=3, patience=5)
    _quick(spec, tmp_path / "b", rows=1500, epochs=1, seed=3, patience=5)
    resumed = train(spec, out=tmp_path / "b" / "run", resume=True, epochs=2, progress=False)
    assert resumed.metrics["train"]["epochs"] == 2
    a, b = _params(full.run_dir / "last.pt"), _params(resumed.run_dir / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full.metrics["tasks"] == resumed.metrics["tasks"]
    assert len((resumed.run_dir / "history.csv").read_text().splitlines()) == 3


@pytest.mark.parametrize("rows", [2500, 2402])  # 2402: 1921 train rows, a one-row remainder (Note [Remainder batch])
def test_resume_mid_epoch_equals_uninterrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    spec = ROOT / "specs" / "esmm.mtl"  # BatchNorm in the towers
    kw = dict(rows=rows, epochs=2, seed=5, batch_size=128, checkpoint_every=4)
    full = _quick(spec, tmp_path / "a", **kw)

    class Killed(Exception):
        pass

    original = trainer.Trainer.save

    def save_then_die(self: trainer.Trainer, *, best: bool) -> None:
        original(self, best=best)
        if self.state.epoch == 1 and self.state.batch_in_epoch >= 8:  # mid epoch 2, after a mid-epoch save
            raise Killed

    monkeypatch.setattr(trainer.Trainer, "save", save_then_die)
    with pytest.raises(Killed):
        _quick(spec, tmp_path / "b", **kw)
    monkeypatch.setattr(trainer.Trainer, "save", original)
    ckpt = torch.load(tmp_path / "b" / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"]) == (1, 8 if rows == 2500 else 9)  # saves every 4 steps
    resumed = train(spec, out=tmp_path / "b" / "run", resume=True, progress=False)
    a, b = _params(full.run_dir / "last.pt"), _params(resumed.run_dir / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = torch.load(resumed.run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert last["step"] == torch.load(full.run_dir / "last.pt", map_location="cpu", weights_only=True)["step"]
    if rows == 2402:
        assert last["step"] == 2 * 15  # 15 batches of 128 per epoch; the 1921st row's batch of one is skipped
    assert full.history[-1]["train_loss_ctr"] == pytest.approx(resumed.history[-1]["train_loss_ctr"], rel=1e-9)


@pytest.mark.parametrize("every", [None, 200])
def test_default_mid_epoch_saves_take_a_bounded_share_of_the_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  every: int | None) -> None:
    """Note [Checkpoint cost]: by default a save waits for CHECKPOINT_COST times its own duration of training;
    an explicit --checkpoint-every saves every N steps however long saving takes."""
    real, mid_epoch = loop.save_checkpoint, []

    def slow_save(state: dict, path: Path) -> None:  # a save as slow as a 250 MB table's, ~1000 tiny steps long
        if state["batch_in_epoch"]:
            mid_epoch.append(state["step"])
            time.sleep(1.0)
        real(state, path)

    monkeypatch.setattr(loop, "save_checkpoint", slow_save)
    result = _quick(ROOT / "specs" / "shared_bottom.mtl", tmp_path, rows=12000, batch_size=16, checkpoint_every=every)
    steps = result.metrics["train"]["steps"]
    assert steps >= 600  # room for mid-epoch saves at steps 200 and 400
    # the default saves at step 200 (no save yet to time) and then waits 20 s of training: none in this run
    assert mid_epoch == ([200] if every is None else list(range(200, steps, 200)))


def test_resume_refuses_changed_settings(tmp_path: Path) -> None:
    spec = ROOT / "specs" / "shared_bottom.mtl"
    _quick(spec, tmp_path, rows=600)
    with pytest.raises(ConfigError, match="lr"):
        train(spec, out=tmp_path / "run", resume=True, lr=0.5, progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        _quick(spec, tmp_path, rows=600)


def test_sigkill_mid_epoch_then_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "mtldsl", "train", str(ROOT / "specs" / "shared_bottom.mtl"), "--rows", "12000",
           "--batch-size", "64", "--epochs", "1", "--checkpoint-every", "5", "--out", str(run_dir), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    try:
        while not (run_dir / "last.pt").exists():  # the first mid-epoch save (step 5 of 150)
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)  # possibly while it writes the next checkpoint
        proc.wait()
    last = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)  # never a torn file
    assert last["epoch"] == 0 and last["batch_in_epoch"] > 0 and last["step"] % 5 == 0
    assert not (run_dir / "metrics.json").exists()
    result = train(ROOT / "specs" / "shared_bottom.mtl", out=run_dir, resume=True, progress=False)
    assert result.metrics["train"]["epochs"] == 1
    assert result.metrics["train"]["steps"] == math.ceil(9600 / 64)
    _assert_contract(run_dir, ["ctr", "cvr"])


def test_nan_loss_stops_with_output_and_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Objective.losses
    calls = {"n": 0}

    def poisoned(self: Objective, outputs: dict, y: dict) -> dict:
        res = original(self, outputs, y)
        calls["n"] += 1
        if calls["n"] == 3:
            res["cvr"] = res["cvr"] * float("nan")
        return res

    monkeypatch.setattr(Objective, "losses", poisoned)
    with pytest.raises(TrainingDiverged) as info:
        _quick(ROOT / "specs" / "shared_bottom.mtl", tmp_path, rows=3000, checkpoint_every=2)
    e = info.value
    assert (e.output, e.step, e.epoch) == ("cvr", 3, 1)
    assert "loss 'cvr' is nan at step 3" in str(e)
    run_dir = tmp_path / "run"
    assert not (run_dir / "checkpoint.pt").exists() and not list(run_dir.glob(".*.tmp"))
    last = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)  # saved at step 2, before the NaN
    assert last["step"] == 2
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_huge_learning_rate_diverges(tmp_path: Path) -> None:
    with pytest.raises(TrainingDiverged, match="training diverged: loss '(ctr|cvr)'"):
        _quick(ROOT / "specs" / "shared_bottom.mtl", tmp_path, rows=3000, lr=1e30, optimizer="sgd")


def test_stem_updates_every_embedding_table(tmp_path: Path) -> None:
    result = _quick(ROOT / "specs" / "stem.mtl", tmp_path, rows=1500)
    run = trainer.load_run(result.run_dir, device="cpu")
    torch.manual_seed(run.config.seed)
    init = run.prepared.cls(run.checkpoint["vocab_sizes"])
    trained = result.model
    names = ["emb_shared", "emb_ctr", "emb_cvr"]
    for name in names:
        before = getattr(init, name).embedding.weight
        after = getattr(trained, name).embedding.weight
        assert not torch.equal(before, after), f"{name} was not updated"


def test_shared_parameters_come_from_the_graph() -> None:
    import mtldsl

    for spec, shared, private in [
        ("mmoe", ["emb", "experts"], ["g_ctr", "g_cvr", "tower_ctr", "tower_cvr"]),
        ("stem", ["emb_shared", "experts_shared"], ["emb_ctr", "emb_cvr", "experts_ctr", "tower_cvr"]),
        ("esmm", ["emb", "tower_ctr"], ["tower_cvr"]),
        ("aitm", ["emb", "bottom_ctr"], ["bottom_cvr", "tower_cvr", "transfer_ctr_cvr"]),
    ]:
        checked = mtldsl.load_spec(ROOT / "specs" / f"{spec}.mtl")
        model = mtldsl.build_model(checked, 50)
        got = {id(p) for p in shared_parameters(model, checked.graph)}
        for name in shared:
            assert all(id(p) in got for p in getattr(model, name).parameters()), (spec, name)
        for name in private:
            assert not any(id(p) in got for p in getattr(model, name).parameters()), (spec, name)
        order = [id(p) for p in model.parameters() if id(p) in got]
        assert order == [id(p) for p in shared_parameters(model, checked.graph)]  # registration order


def _objective(text: str) -> Objective:
    checked = check_text(text)
    assert checked.ok, checked.diagnostics
    assert checked.model is not None
    return Objective(checked.model)


def test_where_loss_on_a_batch_without_such_rows_is_zero_not_nan() -> None:
    obj = _objective("""model m
task ctr binary label click
task cvr binary label purchase
embedding emb shared { dim 4 fields all }
tower per task { input emb mlp [4] }
loss ctr
loss cvr where click
""")
    p = torch.tensor([0.2, 0.9, 0.5], requires_grad=True)
    y = obj.targets({"click": torch.zeros(3), "purchase": torch.tensor([0.0, 1.0, 0.0])})
    losses = obj.losses({"ctr": p, "cvr": p}, y)
    assert losses["cvr"].item() == 0.0
    losses["cvr"].backward()
    assert p.grad is not None and torch.equal(p.grad, torch.zeros(3))
    y = obj.targets({"click": torch.tensor([1.0, 1.0, 0.0]), "purchase": torch.tensor([0.0, 1.0, 1.0])})
    expected = -(math.log(0.8) + math.log(0.9)) / 2
    assert obj.losses({"ctr": p, "cvr": p}, y)["cvr"].item() == pytest.approx(expected, rel=1e-6)


def test_labels_products_calibration_and_metric_domains() -> None:
    obj = _objective((ROOT / "specs" / "aitm.mtl").read_text())
    assert obj.loss_keys == ["ctr", "cvr"] and obj.columns["click*purchase"] == ("click", "purchase")
    assert [(c.source, c.target, c.weight, c.into) for c in obj.calibrations] == [("ctr", "cvr", 0.6, "cvr")]
    y = obj.targets({"click": torch.tensor([1.0, 1.0]), "purchase": torch.tensor([1.0, 0.0])})
    ctr, cvr = torch.tensor([0.5, 0.5]), torch.tensor([0.7, 0.5])
    losses = obj.losses({"ctr": ctr, "cvr": cvr}, y)
    bce = -(math.log(0.7) + math.log(0.5)) / 2
    assert losses["cvr"].item() == pytest.approx(bce + 0.6 * 0.1, rel=1e-6)
    esmm = _objective((ROOT / "specs" / "esmm.mtl").read_text())
    assert [m.key for m in esmm.metrics] == ["ctr", "cvr", "cvr@click", "ctcvr"]
    assert set(esmm.binary_columns) == {"click", "purchase"}


def test_regression_task_uses_mse(tmp_path: Path) -> None:
    obj = _objective("""model m
task watch regression label click
embedding emb shared { dim 4 fields all }
tower watch { input emb mlp [4] }
loss watch
""")
    y = obj.targets({"click": torch.tensor([1.0, 3.0])})
    assert obj.losses({"watch": torch.tensor([0.0, 1.0])}, y)["watch"].item() == pytest.approx(2.5)
    assert obj.metric_kinds["watch"].value == "regression"


def test_monitor_validation(tmp_path: Path) -> None:
    spec = ROOT / "specs" / "esmm.mtl"
    for monitor, message in [("cvr.acu", r"unknown metric 'acu' \(did you mean 'auc'\?\)"),
                             ("cvvr.auc", "did you mean 'cvr'"),
                             ("ctr.mse", "mse needs a regression output, and 'ctr' is binary")]:
        with pytest.raises(ConfigError, match=message):
            _quick(spec, tmp_path, monitor=monitor)
    result = _quick(spec, tmp_path / "ok", monitor="cvr@click.logloss")
    assert result.metrics["monitor"] == "cvr@click.logloss"


def test_train_options_are_declared_once() -> None:
    """train()'s keywords and TrainConfig's fields come from config.OPTIONS; a misspelt option fails loudly."""
    import dataclasses
    import inspect

    from mtldsl.runtime.config import OPTIONS, TrainConfig

    params = inspect.signature(train).parameters
    assert list(params)[1:] == [o.name for o in OPTIONS if o.keyword]
    assert all(params[o.name].default == o.default for o in OPTIONS if o.keyword)
    assert [f.name for f in dataclasses.fields(TrainConfig)] == [o.name for o in OPTIONS if o.recorded]
    with pytest.raises(TypeError, match=r"train\(\) got an unexpected keyword argument 'epoch' \(did you mean 'epochs'\?\)"):
        train(ROOT / "specs" / "esmm.mtl", epoch=1)


def test_format_table_aligns_columns() -> None:
    table = format_table({"ctr": {"auc": 0.71234, "logloss": 0.2, "gauc": math.nan, "n": 10.0},
                          "cvr@click": {"auc": 0.6, "logloss": 0.31, "n": 3.0}})
    lines = table.splitlines()
    assert lines[0].split() == ["output", "auc", "logloss", "gauc", "n"]
    assert lines[1].split() == ["ctr", "0.7123", "0.2000", "undefined", "10"]
    assert lines[2].split() == ["cvr@click", "0.6000", "0.3100", "-", "3"]
    assert len({len(line) for line in lines[:3]}) == 1  # right-aligned numbers: same width on every line
    assert lines[3:] == ["undefined: no group with both classes in the test split (ctr.gauc)"]
    one_class = format_table({"cvr": {"auc": math.nan, "logloss": 0.1, "n": 5.0}}, "val")
    assert one_class.splitlines()[-1] == "undefined: one class in the val split (cvr.auc)"


def test_runs_atomic_write_keeps_old_content_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "x.bin"
    runs.atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with runs.atomic_write(target) as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and not list(tmp_path.glob(".*.tmp"))
    assert runs.new_run_dir("mmoe", "/data/ali-ccp/", tmp_path, now=0).name.startswith("mmoe-ali-ccp-")


def test_early_stopping_keeps_the_best_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = loop.evaluate_split
    planted = iter([0.60, 0.70, 0.65, 0.64, 0.90])  # val cvr.auc per epoch; epoch 5 never comes (patience 2)

    def fake(model, split, objective, batch_size, device, precision):  # type: ignore[no-untyped-def]
        metrics = original(model, split, objective, batch_size, device, precision)
        if len(split) == 100:  # the val split of 1000 rows (test is the final evaluation)
            metrics["cvr"]["auc"] = next(planted)
        return metrics

    monkeypatch.setattr(loop, "evaluate_split", fake)
    result = _quick(ROOT / "specs" / "shared_bottom.mtl", tmp_path, rows=1000, epochs=6, patience=2)
    assert result.best_epoch == 2 and result.metrics["best_value"] == pytest.approx(0.70)
    assert result.metrics["train"]["epochs"] == 4 and result.metrics["train"]["stopped_early"]
    best = torch.load(result.run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    last = torch.load(result.run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == 2 and last["epoch"] == 4
    assert all(torch.equal(best["model"][k], v) for k, v in result.model.state_dict().items())
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
