"""The closed vocabularies of the language and the trainer, each written once, as enums; no torch.

Takes nothing; gives the enums (TaskKind, Activation, Pooling, Metric, Optimizer, Weighting) that the IR, the
validator, codegen, the trainer and the CLI all read, and `parse_monitor`, the one reading of an
early-stopping monitor (`ctr.auc`, `mean.gauc`) that both validate.py (positioned diagnostics) and the
trainer (a `--monitor` flag) use. runtime/layers.py is copied into generated files and cannot import
this module; tests/test_layers.py checks that its activations are these.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from .diagnostics import did_you_mean, quoted


class TaskKind(enum.Enum):
    binary = "binary"
    regression = "regression"


class Activation(enum.Enum):
    relu = "relu"
    leaky_relu = "leaky_relu"
    sigmoid = "sigmoid"
    tanh = "tanh"
    gelu = "gelu"
    prelu = "prelu"
    none = "none"


class Pooling(enum.Enum):
    """How an embedding table pools a list field (`pool mean`; Note [List fields] in runtime/layers.py)."""

    sum = "sum"
    mean = "mean"
    max = "max"


class Metric(enum.Enum):
    """Per-output metrics, in the metrics table's column order."""

    auc = "auc"
    logloss = "logloss"
    gauc = "gauc"
    mse = "mse"
    mae = "mae"

    @property
    def higher_is_better(self) -> bool:
        return self in (Metric.auc, Metric.gauc)

    @property
    def kind(self) -> TaskKind:
        """The kind of output the metric is defined for."""
        return TaskKind.regression if self in (Metric.mse, Metric.mae) else TaskKind.binary


class Optimizer(enum.Enum):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"
    adagrad = "adagrad"


class Weighting(enum.Enum):
    """Loss weighting strategies (runtime/weighting.py)."""

    fixed = "fixed"
    uwl = "uwl"
    gradnorm = "gradnorm"
    metabalance = "metabalance"
    pcgrad = "pcgrad"


def names(vocabulary: type[enum.Enum]) -> tuple[str, ...]:
    """The spellings of a vocabulary, in declaration order: `names(Optimizer)` -> ('adam', 'adamw', …)."""
    return tuple(member.value for member in vocabulary)


MEAN = "mean"  # `mean.<metric>`: the average over the outputs that have the metric


@dataclass(frozen=True)
class Monitor:
    """A parsed monitor: `target` is an output name or MEAN."""

    text: str
    target: str
    metric: Metric


@dataclass(frozen=True)
class MonitorProblem:
    """Why a monitor cannot be used: `message` completes a sentence on its own, `hint` may be None."""

    message: str
    hint: str | None = None


def parse_monitor(text: str, kinds: Mapping[str, TaskKind], *, has_groups: bool = True) -> Monitor | MonitorProblem:
    """Read `<output>.<metric>` or `mean.<metric>` against the outputs that have a label (`kinds`).

    has_groups: False when the data has no user/group column, so gauc cannot be computed.
    The first problem found is returned; the validator reports it at the monitor's span, the trainer
    raises it as a ConfigError.
    """
    target, dot, metric_name = text.rpartition(".")
    if not dot or not target:
        hint = f"write `<output>.<metric>`, e.g. '{text}.auc'" if text in kinds else \
            "write `<output>.<metric>` or `mean.<metric>`, e.g. 'mean.auc'"
        return MonitorProblem(f"monitor '{text}' names no metric", hint)
    if target != MEAN and target not in kinds:
        return MonitorProblem(f"monitor '{text}' names unknown output '{target}'",
                              did_you_mean(target, [*kinds, MEAN]) or "outputs: " + quoted(kinds))
    try:
        metric = Metric(metric_name)
    except ValueError:
        known = names(Metric)
        return MonitorProblem(f"monitor '{text}' names unknown metric '{metric_name}'",
                              did_you_mean(metric_name, known) or "metrics: " + ", ".join(known))
    candidates = [k for k in kinds if "@" not in k] if target == MEAN else [target]
    if metric.kind is TaskKind.binary and candidates and all(kinds[k] is TaskKind.regression for k in candidates):
        if target == MEAN:
            return MonitorProblem(f"monitor '{text}': {metric.value} needs a binary output, and every output is "
                                  "regression", "monitor 'mean.mse' or 'mean.mae'")
        return MonitorProblem(f"monitor '{text}': {metric.value} needs a binary output, and '{target}' is regression",
                              f"monitor '{target}.mse' or '{target}.mae'")
    if metric.kind is TaskKind.regression and candidates and all(kinds[k] is TaskKind.binary for k in candidates):
        what = "every output is binary" if target == MEAN else f"'{target}' is binary"
        return MonitorProblem(f"monitor '{text}': {metric.value} needs a regression output, and {what}",
                              f"monitor '{target}.auc' or '{target}.logloss'")
    if metric is Metric.gauc and not has_groups:
        return MonitorProblem(f"monitor '{text}': gauc needs a user/group id, and the data has none",
                              f"monitor '{target}.auc'")
    return Monitor(text, target, metric)
