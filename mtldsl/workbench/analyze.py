"""`mtldsl analyze`: where do trained runs win? STEM's subsets, gate mass, gradient conflict, per-task tables.

Takes run folders (and single-task runs, singles.py); gives an Analysis: per pair of binary tasks the
STEM subsets of the test rows (Note [STEM subsets]) with each run's AUC, gAUC and size on each, the gate
mass of every gate overall and per subset (Note [Gate mass]), the gradient-conflict summary of runs
trained with --log-conflict, and the per-task embedding distances (embeddings.py). analyze_report.py
writes it out.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .singles import AnalyzeError

__all__ = ["Analysis", "Scored", "analyze", "buckets", "gate_columns", "score_run", "subsets"]

SUBSET_BUCKETS = 10

# Note [STEM subsets]
# ~~~~~~~~~~~~~~~~~~~
# Su et al. (STEM, AAAI 2024, section on negative transfer) split the test samples by how strongly each
# task's positive feedback is expected: a single-task model per task scores every test row, each task's
# scores are cut into 10 equal-frequency buckets (0 = lowest tenth ... 9 = highest), and d = bucket(A) -
# bucket(B). Rows with d >= k are "A-overwhelming", |d| < k "comparable", d <= -k "B-overwhelming"
# (k = 3 by default, --k). The comparable subset is where the two tasks' preferences agree least with the
# tasks' overall correlation and where shared representations are said to suffer; STEM's claim is that
# per-task embeddings help most there. With more than two binary tasks every pair is split. Buckets come
# from ranks (ties broken by row order), so each holds N/10 rows up to one.

# Note [Gate mass]
# ~~~~~~~~~~~~~~~~
# The generated module's gates are modules of class `Gate` whose forward returns the softmax weights
# (B, n_experts), the experts in route order: each `mix` line of the gate (ir.Gate.routes, those with
# forward on) in the order written, each group's experts in order (codegen concatenates them so). analyze
# reads them with forward hooks over the test split and reports each gate's mean weight per expert and
# per expert group, overall and on each subset. A gate whose width differs from its routes' expert count
# is an error (the contract between codegen and analyze broke), never a silent misattribution.


@dataclass
class Scored:
    """One run's pass over the test split: outputs, label products, groups and gate weights, in row order."""

    name: str
    run_dir: Path
    outputs: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]  # label product key (objective.py) -> (N,)
    groups: np.ndarray | None
    metrics: list[tuple[str, str, str, str | None, str]]  # (key, output, label key, mask key, kind)
    gates: dict[str, np.ndarray] = field(default_factory=dict)  # gate -> (N, n_experts)
    gate_columns: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # gate -> [(group, i)]


def gate_columns(model: Any) -> dict[str, list[tuple[str, int]]]:
    """For each gate of an ir.Model: its softmax columns as (expert group, index in group) (Note [Gate mass])."""
    counts = {x.name: x.count for x in model.experts}
    return {g.name: [(r.group, i) for r in g.routes if r.forward for i in range(counts[r.group])]
            for g in model.gates}


def score_run(run_dir: Path, name: str | None = None, batch_size: int = 4096) -> Scored:
    """Run a trained model over its test split in order, recording outputs and every Gate's weights."""
    from ..runtime.checkpoint import load_run
    from ..runtime.precision import forward

    loaded = load_run(run_dir)
    model_ir = loaded.prepared.checked.model
    assert model_ir is not None
    columns = gate_columns(model_ir)
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for path, module in loaded.model.named_modules():
        if type(module).__name__ == "Gate":
            gate = path.rsplit(".", 1)[-1]
            if gate not in columns:
                raise AnalyzeError(f"{run_dir}: the model has a Gate '{gate}' the spec does not declare")
            hooks.append(module.register_forward_hook(
                lambda _m, _i, out, gate=gate: captured.setdefault(gate, []).append(out.detach().float().cpu())))
    objective = loaded.prepared.objective
    outputs: dict[str, list[np.ndarray]] = {}
    targets: dict[str, list[np.ndarray]] = {}
    groups: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for batch in loaded.prepared.splits["test"].batches(batch_size, shuffle=False):
                out = forward(loaded.model, batch, loaded.device, loaded.precision)
                for k, v in out.items():
                    outputs.setdefault(k, []).append(v.float().cpu().numpy().reshape(-1))
                for k, v in batch["labels"].items():
                    targets.setdefault(k, []).append(v.float().cpu().numpy().reshape(-1))
                if batch["groups"] is not None:
                    groups.append(batch["groups"].cpu().numpy().reshape(-1))
    finally:
        for h in hooks:
            h.remove()
    scored = Scored(name or run_dir.name, run_dir, {k: np.concatenate(v) for k, v in outputs.items()},
                    {k: np.concatenate(v) for k, v in targets.items()}, np.concatenate(groups) if groups else None,
                    [(m.key, m.output, m.label, m.mask, m.kind.value) for m in objective.metrics])
    for gate, parts in captured.items():
        weights = torch.cat(parts).numpy()
        if weights.shape[1] != len(columns[gate]):
            raise AnalyzeError(f"{run_dir}: gate '{gate}' yields {weights.shape[1]} weights, its routes name "
                               f"{len(columns[gate])} experts (Note [Gate mass])")
        scored.gates[gate] = weights
        scored.gate_columns[gate] = columns[gate]
    return scored


def buckets(scores: np.ndarray, n: int = SUBSET_BUCKETS) -> np.ndarray:
    """Equal-frequency bucket 0..n-1 of each score, from its rank (ties by row order)."""
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[np.argsort(scores, kind="mergesort")] = np.arange(len(scores))
    return ranks * n // max(len(scores), 1)


def subsets(score_a: np.ndarray, score_b: np.ndarray, a: str, b: str, k: int) -> dict[str, np.ndarray]:
    """Note [STEM subsets]: row masks of the A-overwhelming, comparable and B-overwhelming subsets."""
    d = buckets(score_a) - buckets(score_b)
    return {f"{a}-overwhelming": d >= k, "comparable": np.abs(d) < k, f"{b}-overwhelming": d <= -k}


def _metrics_on(s: Scored, keys: Sequence[str], rows: np.ndarray) -> dict[str, dict[str, float]]:
    from ..runtime.metrics import auc, gauc

    out = {}
    for key, output, label, mask, _ in s.metrics:
        if key not in keys:
            continue
        keep = rows & (s.targets[mask] > 0.5) if mask else rows
        y = torch.from_numpy(s.targets[label][keep])
        p = torch.from_numpy(s.outputs[output][keep])
        g = torch.from_numpy(s.groups[keep]) if s.groups is not None else None
        out[key] = {"auc": auc(p, y) if len(y) else math.nan,
                    "gauc": gauc(p, y, g) if g is not None and len(y) else math.nan,
                    "n": int(keep.sum()), "positives": int((y > 0.5).sum())}
    return out


def _mass(s: Scored, rows: np.ndarray | None) -> dict[str, dict[str, Any]]:
    out = {}
    for gate, w in s.gates.items():
        part = w if rows is None else w[rows]
        mean = part.mean(0) if len(part) else np.full(w.shape[1], math.nan)
        cols = s.gate_columns[gate]
        per_group: dict[str, float] = {}
        for (group, _), v in zip(cols, mean):
            per_group[group] = per_group.get(group, 0.0) + float(v)
        out[gate] = {"groups": per_group,
                     "experts": {f"{group}[{i}]": float(v) for (group, i), v in zip(cols, mean)}}
    return out


@dataclass
class Analysis:
    k: int
    runs: list[dict[str, Any]] = field(default_factory=list)  # name, run_dir, model
    singles: dict[str, str] = field(default_factory=dict)  # task -> single-task run folder
    subsets: list[dict[str, Any]] = field(default_factory=list)  # pair, subset, run, output, auc, gauc, n
    gate_mass: list[dict[str, Any]] = field(default_factory=list)  # run, gate, subset, groups, experts
    conflict: list[dict[str, Any]] = field(default_factory=list)  # run, pair, mean, min, max, steps
    embeddings: list[dict[str, Any]] = field(default_factory=list)  # run, table, distance (embeddings.py)


def _same_rows(scored: Sequence[Scored]) -> None:
    first = scored[0]
    for s in scored[1:]:
        n0 = len(next(iter(first.targets.values())))
        n1 = len(next(iter(s.targets.values())))
        shared = set(first.targets) & set(s.targets)
        if n0 != n1 or any(not np.array_equal(first.targets[k], s.targets[k]) for k in shared):
            raise AnalyzeError(f"runs of different datasets (or test rows) analysed together: {first.run_dir} "
                               f"and {s.run_dir}")


def _pair_rows(pair: tuple[str, str], masks: dict[str, np.ndarray], scored: Sequence[Scored],
               single: dict[str, Scored]) -> list[dict[str, Any]]:
    rows = []
    a, b = pair
    for subset, mask in masks.items():
        for s in [*scored, None]:
            parts = [(s, [m[0] for m in s.metrics if m[1] in pair])] if s is not None else \
                [(single[t], [m[0] for m in single[t].metrics if m[1] == t]) for t in pair]
            for run, keys in parts:
                for key, values in _metrics_on(run, keys, mask).items():
                    rows.append({"pair": f"{a}/{b}", "subset": subset, "run": "single-task" if s is None else s.name,
                                 "output": key, **values})
    return rows


def conflict_summary(run_dir: Path, name: str) -> list[dict[str, Any]]:
    """Per task pair of a run trained with --log-conflict: mean, min, max and last cosine, and the records."""
    import csv

    from ..runtime.conflict import CONFLICT_CSV

    path = run_dir / CONFLICT_CSV
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        records = list(csv.DictReader(f))
    rows = []
    for pair in [k for k in (records[0] if records else {}) if k not in ("step", "epoch")]:
        vals = [float(r[pair]) for r in records if r[pair] not in ("", "nan")]
        if vals:
            rows.append({"run": name, "pair": pair, "mean": float(np.mean(vals)), "min": min(vals), "max": max(vals),
                         "last": vals[-1], "records": len(vals)})
    return rows


def _run_name(run_dir: Path, all_dirs: Sequence[Path]) -> str:
    """The folder's name; with its parent's when that is ambiguous (compare's `<entry>/seed<k>`); else the path."""
    for name in (run_dir.name, f"{run_dir.parent.name}/{run_dir.name}"):
        if [f"{d.parent.name}/{d.name}" if "/" in name else d.name for d in all_dirs].count(name) == 1:
            return name
    return str(run_dir)


def analyze(run_dirs: Sequence[Path], singles: dict[str, Path], k: int = 3) -> Analysis:
    """Everything but the single-task training (singles.py): subsets, gate mass, conflict, embeddings."""
    from .embeddings import table_distances

    if k < 1 or k >= SUBSET_BUCKETS:
        raise AnalyzeError(f"--k must be between 1 and {SUBSET_BUCKETS - 1}, got {k}")
    names = [_run_name(d, run_dirs) for d in run_dirs]
    scored = [score_run(d, n) for d, n in zip(run_dirs, names)]
    single = {t: score_run(d, f"single-task {t}") for t, d in singles.items()}
    _same_rows([*scored, *single.values()])
    result = Analysis(k, singles={t: str(d) for t, d in singles.items()})
    kinds = {m[0]: m[4] for m in scored[0].metrics}
    binary = [t for t in single if kinds.get(t) == "binary"]
    masks_by_pair = {}
    for a, b in itertools.combinations(binary, 2):
        masks = subsets(single[a].outputs[a], single[b].outputs[b], a, b, k)
        masks_by_pair[f"{a}/{b}"] = masks
        result.subsets += _pair_rows((a, b), masks, scored, single)
    for s in scored:
        result.runs.append({"name": s.name, "run_dir": str(s.run_dir)})
        for gate, mass in _mass(s, None).items():
            result.gate_mass.append({"run": s.name, "gate": gate, "pair": None, "subset": "all", **mass})
        for pair, masks in masks_by_pair.items():
            for subset, mask in masks.items():
                for gate, mass in _mass(s, mask).items():
                    result.gate_mass.append({"run": s.name, "gate": gate, "pair": pair, "subset": subset, **mass})
        result.embeddings += table_distances(s.run_dir, s.name)
        result.conflict += conflict_summary(s.run_dir, s.name)
    return result
