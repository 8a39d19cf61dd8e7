"""Loss and metric terms read from an ir.Model, the early-stopping monitor, evaluation and the metrics table.

Takes an ir.Model (and a monitor text); gives `Objective` (the loss terms, label products and metric
terms: docs/language.md, Losses and domains), `make_monitor` (vocab.parse_monitor against the model's
labelled outputs, a ConfigError when it cannot be used), `evaluate_split` (metrics of a model on a
split) and `format_table` (the per-task table `train` and `evaluate` print). No model-specific code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..ir import Model
from ..vocab import MEAN, Metric, MonitorProblem, TaskKind, parse_monitor
from .config import ConfigError
from .metrics import Accumulator
from .precision import forward

__all__ = ["EVAL_BATCH", "Monitor", "Objective", "evaluate_split", "format_table", "make_monitor"]

EPS = 1e-7  # probabilities are clamped to [EPS, 1 - EPS] before the log of the BCE
EVAL_BATCH = 2048  # evaluation batch cap: larger batches gain little speed, and wide experts' activations
# at 8192 rows (64 MiB per tensor for MMoE) raised peak RSS 128 MiB above torch-rechub's


def _product_key(columns: Sequence[str]) -> str:
    return "*".join(columns)


@dataclass(frozen=True)
class LossTerm:
    key: str  # the name the weighting and the logs use: the output's name (unique per loss)
    output: str
    label: str  # key of the label product
    where: str | None  # key of the where product (loss restricted to rows where it is 1)
    weight: float
    binary: bool


@dataclass(frozen=True)
class CalibrationTerm:
    source: str
    target: str
    weight: float
    into: str  # the loss term it is added to (the target's loss when it has one)


@dataclass(frozen=True)
class MetricTerm:
    key: str  # `cvr`, or `cvr@click` for the output's domain
    output: str
    kind: TaskKind
    label: str
    mask: str | None


class Objective:
    """What to optimise and what to measure, read from an ir.Model (docs/language.md, Losses and domains).

    Loss of output o with label product y: BCE on the (clamped, float32) probability for binary outputs,
    MSE for regression; `where w` averages over the rows with w = 1 only (0 when a batch has none). A
    transfer's calibration c adds c * mean(relu(p_target - p_source)) to the target's loss term. Metrics
    cover every output with a label, and again on its `where` domain under `<output>@<where>`.
    """

    def __init__(self, model: Model) -> None:
        outputs = {o.name: o for o in model.outputs}
        self.columns: dict[str, tuple[str, ...]] = {}  # product key -> label columns
        self.terms: list[LossTerm] = []
        seen: dict[str, int] = {}
        for lo in model.losses:
            out = outputs[lo.output]
            seen[lo.output] = seen.get(lo.output, 0) + 1
            key = lo.output if seen[lo.output] == 1 else f"{lo.output}#{seen[lo.output]}"
            self.terms.append(LossTerm(key=key, output=lo.output, label=self._need(lo.label),
                                       where=self._need(lo.where) if lo.where else None, weight=lo.weight,
                                       binary=out.kind is TaskKind.binary))
        self.calibrations: list[CalibrationTerm] = []
        for tr in model.transfers:
            if tr.calibration:
                into = next((t.key for t in self.terms if t.output == tr.target),
                            next((t.key for t in self.terms if t.output == tr.source), self.terms[0].key))
                self.calibrations.append(CalibrationTerm(tr.source, tr.target, tr.calibration, into))
        self.metrics: list[MetricTerm] = []
        for o in model.outputs:
            if not o.label:
                continue
            label = self._need(o.label)
            self.metrics.append(MetricTerm(o.name, o.name, o.kind, label, None))
            if o.where:
                self.metrics.append(MetricTerm(f"{o.name}@{_product_key(o.where)}", o.name, o.kind, label,
                                               self._need(o.where)))
        binary = self._binary_keys()  # label columns that must hold 0/1 (checked by the loader, by file and row)
        self.binary_columns = tuple(dict.fromkeys(c for key, cols in self.columns.items() if key in binary for c in cols))

    def _need(self, columns: Sequence[str]) -> str:
        key = _product_key(columns)
        self.columns.setdefault(key, tuple(columns))
        return key

    def _binary_keys(self) -> set[str]:
        keys = {t.label for t in self.terms if t.binary} | {t.where for t in self.terms if t.where}
        keys |= {m.label for m in self.metrics if m.kind is TaskKind.binary} | {m.mask for m in self.metrics if m.mask}
        return {k for k in keys if k}

    @property
    def loss_keys(self) -> list[str]:
        return [t.key for t in self.terms]

    @property
    def weights(self) -> dict[str, float]:
        return {t.key: t.weight for t in self.terms}

    @property
    def metric_kinds(self) -> dict[str, TaskKind]:
        return {m.key: m.kind for m in self.metrics}

    def targets(self, labels: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The label products the losses and metrics read, computed once per split (float32 (N,))."""
        out = {}
        for key, cols in self.columns.items():
            y = labels[cols[0]].to(torch.float32)
            for c in cols[1:]:
                y = y * labels[c]
            out[key] = y.contiguous()
        return out

    def losses(self, outputs: Mapping[str, Tensor], y: Mapping[str, Tensor], dist: Any = None) -> dict[str, Tensor]:
        """One scalar per loss term, in float32 (call outside autocast).

        Under DDP (`dist`: a distributed.Context) a masked term is W * (this shard's masked sum) / (the
        global batch's mask count), so DDP's gradient average is the global batch's masked mean
        (Note [Global batch] in distributed.py); unmasked terms are plain shard means.
        """
        res: dict[str, Tensor] = {}
        counts: dict[str, Tensor] = {}
        if dist is not None:
            wheres = list(dict.fromkeys(t.where for t in self.terms if t.where))
            if wheres:  # one all_reduce of every mask's row count
                total = dist.sum_(torch.stack([y[w].sum() for w in wheres]).float())
                counts = {w: total[i].clamp_min(1.0) / dist.world_size for i, w in enumerate(wheres)}
        for t in self.terms:
            p = outputs[t.output].float()
            target = y[t.label]
            if t.binary:  # by hand: F.binary_cross_entropy raises (a device assert on CUDA) on a NaN input
                p = p.clamp(EPS, 1.0 - EPS)
                log_not = torch.log1p(-p)
                per = -(target * (torch.log(p) - log_not) + log_not)
            else:
                per = (p - target).square()
            if t.where is None:
                res[t.key] = per.mean()
            else:
                m = y[t.where]
                res[t.key] = (per * m).sum() / (counts[t.where] if counts else m.sum().clamp_min(1.0))
        for c in self.calibrations:
            gap = torch.relu(outputs[c.target].float() - outputs[c.source].float()).mean()
            res[c.into] = res[c.into] + c.weight * gap
        return res

    def accumulator(self) -> Accumulator:
        return Accumulator(self.metric_kinds)

    def update(self, acc: Accumulator, outputs: Mapping[str, Tensor], y: Mapping[str, Tensor],
               groups: Tensor | None) -> None:
        acc.update({m.key: outputs[m.output] for m in self.metrics}, {m.key: y[m.label] for m in self.metrics},
                   groups=groups, masks={m.key: y[m.mask] for m in self.metrics if m.mask})


# --------------------------------------------------------------------------------------------
# Monitor (early stopping)


@dataclass(frozen=True)
class Monitor:
    name: str  # as written: `cvr.auc`, `mean.auc`, `cvr@click.auc`
    output: str  # an output key or vocab.MEAN
    metric: Metric

    @property
    def higher_is_better(self) -> bool:
        return self.metric.higher_is_better

    def value(self, metrics: Mapping[str, Mapping[str, float]]) -> float:
        metric = self.metric.value
        if self.output == MEAN:
            vals = [m[metric] for k, m in metrics.items() if "@" not in k and metric in m and not math.isnan(m[metric])]
            return sum(vals) / len(vals) if vals else math.nan
        return float(metrics.get(self.output, {}).get(metric, math.nan))

    def better(self, value: float, best: float | None) -> bool:
        if math.isnan(value):
            return False
        if best is None or math.isnan(best):
            return True
        return value > best if self.higher_is_better else value < best


def make_monitor(text: str, objective: Objective, has_groups: bool) -> Monitor:
    """The monitor `text` over the objective's labelled outputs (vocab.parse_monitor, the validator's reading)."""
    parsed = parse_monitor(text, objective.metric_kinds, has_groups=has_groups)
    if isinstance(parsed, MonitorProblem):
        raise ConfigError(parsed.message + (f" ({parsed.hint})" if parsed.hint else ""))
    return Monitor(parsed.text, parsed.target, parsed.metric)


# --------------------------------------------------------------------------------------------
# Evaluation and the metric table


@torch.inference_mode()
def evaluate_split(model: nn.Module, split: Any, objective: Objective, batch_size: int,
                   device: torch.device, precision: str) -> dict[str, dict[str, float]]:
    """Per-output metrics of `model` on a whole split (data.Split), in batches of at most EVAL_BATCH rows."""
    was_training = model.training
    model.eval()
    acc = objective.accumulator()
    for batch in split.batches(min(batch_size, EVAL_BATCH) if batch_size > 0 else EVAL_BATCH, shuffle=False):
        out = forward(model, batch, device, precision)
        objective.update(acc, {k: v.float() for k, v in out.items()}, batch["labels"], batch["groups"])
    model.train(was_training)
    return acc.compute()


def undefined_cause(metric: str, split: str, m: Mapping[str, float]) -> str:
    """Why `metric` is nan on `split` (m: that output's metrics)."""
    if not m.get("n"):
        return f"no rows in the {split} split"
    if metric == "gauc":
        return f"no group with both classes in the {split} split"
    if metric == "auc":
        return f"one class in the {split} split"
    return f"not a finite value on the {split} split"


def format_table(metrics: Mapping[str, Mapping[str, float]], split: str = "test") -> str:
    """A plain-text table, one row per output (and domain): output, then the vocab.Metric columns any row has, n.
    An undefined (nan) metric reads `undefined`, and a line under the table says why."""
    cols = [c.value for c in Metric if any(c.value in m for m in metrics.values())]
    rows = [["output", *cols, "n"]]
    why: dict[str, list[str]] = {}
    for name, m in metrics.items():
        cells = [name]
        for c in cols:
            v = m.get(c)
            if v is not None and math.isnan(v):
                why.setdefault(undefined_cause(c, split, m), []).append(f"{name}.{c}")
            cells.append("-" if v is None else "undefined" if math.isnan(v) else f"{v:.4f}")
        cells.append(str(int(m.get("n", 0))))
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(r)).rstrip()
             for r in rows]
    lines += [f"undefined: {cause} ({', '.join(names)})" for cause, names in why.items()]
    return "\n".join(lines)
