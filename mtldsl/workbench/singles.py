"""The single-task runs STEM's subsets are cut by: given (--single) or trained from a run's tasks.

Takes a trained run folder and, optionally, single-task run folders; gives one run folder per task of the
run. A missing one is trained under `out/single/<task>/` with the run's settings from a single-task spec
built as a syntax tree (the run's task, data, loss and `train {}`, one shared table over every field and
an MLP tower, like specs/single_task.mtl) and printed with printer.print_spec. Reused when finished,
resumed when interrupted, like compare's runs (Note [Resumable compare]).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import syntax as s
from ..diagnostics import did_you_mean
from ..parser import parse_file
from ..printer import print_spec
from ..vocab import TaskKind

__all__ = ["AnalyzeError", "single_spec", "single_runs"]

TOWER = (256, 128, 64)  # specs/single_task.mtl's tower


class AnalyzeError(ValueError):
    """Runs that cannot be analysed together, or a bad --single; one line."""


def single_spec(spec: s.Spec, task: str) -> s.Spec:
    """A single-task spec for `task` of `spec`: its data, task, loss and training settings."""
    decl = next(i for i in spec.items if isinstance(i, s.TaskDecl) and i.name == task)
    data = [i for i in spec.items if isinstance(i, s.DataDecl)][:1]
    loss = next((i for i in spec.items if isinstance(i, s.LossDecl) and i.output.name == task),
                s.LossDecl(s.NameRef(task)))
    train = [replace(i, props=tuple(p for p in i.props if p.key != "monitor"))  # it may name another task
             for i in spec.items if isinstance(i, s.TrainDecl)]
    emb = s.EmbeddingDecl("emb", s.Owner(s.OwnerKind.shared), (
        s.Prop("dim", 16), s.Prop("fields", s.FieldSel("all")), s.Prop("dense", s.FieldSel("all"))))
    tower = s.TowerDecl(s.NameRef(task), (s.Prop("input", s.InputExpr(s.InputOp.ref, (s.NameRef("emb"),))),
                                          s.Prop("mlp", TOWER), s.Prop("batch_norm", True)))
    items = (s.ModelDecl(f"single_{task}", f"Single-task baseline ({task})"), *data, decl, emb, tower, loss, *train)
    return s.Spec(items)


def _task_of(run_dir: Path) -> str:
    from ..pipeline import check_file

    checked = check_file(run_dir / "spec.mtl")
    if checked.model is None or len(checked.model.tasks) != 1:
        raise AnalyzeError(f"--single {run_dir}: a single-task run has exactly one task")
    return checked.model.tasks[0].name


def single_runs(run_dir: Path, given: Sequence[Path], out: Path, *, progress: bool) -> dict[str, Path]:
    """Task -> single-task run folder for every task of `run_dir`, training the ones not given."""
    from ..pipeline import check_file
    from ..runtime import runs
    from ..runtime.checkpoint import read_run
    from ..runtime.trainer import train

    checked = check_file(run_dir / runs.SPEC)
    assert checked.model is not None
    tasks = {t.name: t for t in checked.model.tasks}
    found: dict[str, Path] = {}
    for folder in given:
        if not (folder / runs.METRICS).is_file():
            raise AnalyzeError(f"--single {folder}: not a finished run folder (no {runs.METRICS})")
        task = _task_of(folder)
        if task not in tasks:
            hint = did_you_mean(task, list(tasks))
            raise AnalyzeError(f"--single {folder}: its task '{task}' is not a task of {run_dir} ("
                               + (hint or ", ".join(tasks)) + ")")
        found[task] = folder
    missing = [t for t in tasks if t not in found]
    if not missing:
        return found
    cfg = read_run(run_dir).config
    _, parsed = parse_file(run_dir / runs.SPEC)
    assert isinstance(parsed, s.Spec)
    for task in missing:
        text = print_spec(single_spec(parsed, task))
        folder = out / "single" / task
        spec_file = out / "single" / f"{task}.mtl"
        spec_file.parent.mkdir(parents=True, exist_ok=True)
        runs.atomic_write_text(spec_file, text)
        monitor = f"{task}.auc" if tasks[task].kind is TaskKind.binary else f"{task}.mse"
        options: dict[str, Any] = {"data": cfg.data, "data_dir": cfg.data_dir, "rows": cfg.rows, "epochs": cfg.epochs,
                                   "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed, "monitor": monitor}
        if not (folder / runs.METRICS).is_file():
            resume = (folder / runs.LAST).is_file() or (folder / runs.CHECKPOINT).is_file()
            train(spec_file, out=folder, progress=progress, **({"resume": True} if resume else options))
        found[task] = folder
    return found
