"""The one generic trainer: spec + dataset -> trained generated module, run folder, per-task metrics.

`train(spec, ...)` checks the spec against the real dataset's schema (missing fields are positioned
SpecErrors), compiles and instantiates the generated module, and trains it with losses, label domains
and metrics read from the IR only (no model-specific code). `evaluate(run_dir)` and `predict(run_dir)`
reload a run folder (spec.mtl, model.py, checkpoint.pt; runs.py describes the folder).

Hot path: batches are slices of pre-built tensors already on the device, holding only the model's
columns and the label products the losses need; per-step losses stay on the device and are read back
once every LOG_EVERY steps (NaN check, progress bar), and before any checkpoint is written, so a
diverged step never reaches a checkpoint. Gradients are zeroed in place, not freed: a large fused
embedding table keeps one persistent dense gradient buffer instead of allocating (and page-faulting) a
fresh one every step (DESIGN.md, Generated code); the optimizer is fused where the device supports it.
Note [Resume] says what a checkpoint holds and how a run continues from it.

Hooks for the parts built elsewhere: loss weighting is `mtldsl.runtime.weighting.make(name, tasks,
weights, shared)` over the loss terms, with `shared_parameters` from the block graph; data-parallel
training under torchrun is Note [Distributed training] (runtime/distributed.py: process group, shards);
`load_run` gives an exporter the trained module.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__
from ..diagnostics import SpecError, did_you_mean
from ..ir import Model, TaskKind
from ..pipeline import Checked, check_text
from ..vocab import Metric, Optimizer, Weighting, names
from . import runs
from .metrics import Accumulator

__all__ = [
    "ConfigError",
    "EvalResult",
    "LoadedRun",
    "Objective",
    "RunResult",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "evaluate",
    "format_table",
    "load_run",
    "predict",
    "resolve_device",
    "shared_parameters",
    "train",
]

EPS = 1e-7  # probabilities are clamped to [EPS, 1 - EPS] before the log of the BCE
LOG_EVERY = 20  # steps between reads of the device-side losses (NaN check, progress bar)
CHECKPOINT_EVERY = 200  # default steps between mid-epoch `last.pt` saves
EVAL_BATCH = 2048  # evaluation batch cap: larger batches gain little speed, and wide experts' activations
# at 8192 rows (64 MiB per tensor for MMoE) raised peak RSS 128 MiB above torch-rechub's
FORMAT = 1  # checkpoint layout version
HIGHER_IS_BETTER = {"auc": True, "gauc": True, "logloss": False, "mse": False, "mae": False}
# Settings a resumed run may change; everything else must match the checkpoint (Note [Resume]).
RESUMABLE = ("epochs", "patience", "device", "checkpoint_every", "precision")
SPARSE_CHOICES = ("auto", "on", "off")
PRECISIONS = ("auto", "fp32", "bf16")  # Note [Mixed precision]
BF16_AUTO_MACS = 32 << 10  # `auto` on a CPU: bf16 from this many dense multiply-adds per sample (measured crossover)
DEVICE_DATA_SHARE = 0.5  # splits move to an accelerator whole up to this share of its free memory, else stream
SPARSE_AUTO_BYTES = 4 << 20  # `auto` turns sparse embedding updates on for a table at least this large
# (Note [Sparse embedding updates]: measured crossover)


class ConfigError(ValueError):
    """A training setting that cannot work (unknown monitor, optimizer, device…); one line for the CLI."""


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; nothing from that step on reached a checkpoint."""

    def __init__(self, output: str, value: float, step: int, epoch: int, batch: int) -> None:
        self.output, self.value, self.step, self.epoch, self.batch = output, value, step, epoch, batch
        super().__init__(
            f"training diverged: loss '{output}' is {value} at step {step} (epoch {epoch}, batch {batch}); "
            "try a lower --lr, or another --weighting"
        )


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run: the spec's `train {}` defaults overridden by arguments/CLI flags."""

    data: str
    data_dir: str | None
    rows: int | None
    data_seed: int  # the synthetic data's seed: fixed, so --seed varies the training, not the data
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    optimizer: str
    weighting: str
    monitor: str
    patience: int
    seed: int
    device: str
    checkpoint_every: int
    sparse_embeddings: str = "auto"  # auto | on | off: Note [Sparse embedding updates]
    precision: str = "auto"  # auto | fp32 | bf16: Note [Mixed precision]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _choice(kind: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        hint = did_you_mean(value, choices)
        raise ConfigError(f"unknown {kind} '{value}'" + (f" ({hint})" if hint else f"; one of {', '.join(choices)}"))
    return value


def _positive(name: str, value: float | int) -> None:
    if value <= 0:
        raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _make_config(model: Model, *, data: str, data_dir: str | None, rows: int | None, epochs: int | None,
                 batch_size: int | None, lr: float | None, weighting: str | None, optimizer: str | None,
                 device: str, seed: int | None, monitor: str | None, patience: int | None,
                 checkpoint_every: int, sparse_embeddings: str = "auto", precision: str = "auto") -> TrainConfig:
    t = model.train
    cfg = TrainConfig(
        data=data, data_dir=data_dir, rows=rows, data_seed=0,
        epochs=t.epochs if epochs is None else epochs,
        batch_size=t.batch_size if batch_size is None else batch_size,
        lr=t.lr if lr is None else lr,
        weight_decay=t.weight_decay,
        optimizer=t.optimizer if optimizer is None else optimizer,
        weighting=t.weighting if weighting is None else weighting,
        monitor=t.monitor if monitor is None else monitor,
        patience=t.patience if patience is None else patience,
        seed=t.seed if seed is None else seed,
        device=device,
        checkpoint_every=checkpoint_every,
        sparse_embeddings=sparse_embeddings,
        precision=precision,
    )
    _validate_config(cfg)
    return cfg


def _validate_config(cfg: TrainConfig) -> None:
    for name in ("epochs", "batch_size", "lr"):
        _positive(name, getattr(cfg, name))
    if cfg.rows is not None:
        _positive("rows", cfg.rows)
    if cfg.patience < 0:
        raise ConfigError(f"--patience must not be negative, got {cfg.patience}")
    if cfg.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every must not be negative, got {cfg.checkpoint_every}")
    _choice("optimizer", cfg.optimizer, names(Optimizer))
    _choice("weighting", cfg.weighting, names(Weighting))
    _choice("--sparse-embeddings setting", cfg.sparse_embeddings, SPARSE_CHOICES)
    _choice("precision", cfg.precision, PRECISIONS)
    if cfg.sparse_embeddings == "on" and cfg.weight_decay > 0:
        raise ConfigError(f"--sparse-embeddings on: sparse embedding updates take no weight decay, and the spec sets "
                          f"weight_decay {cfg.weight_decay}; set it to 0 or use --sparse-embeddings off")


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; anything else must name a usable device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}' (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available here (use --device cpu or auto)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device '{name}' is not supported (auto, cpu, cuda, cuda:N)")
    return dev


# Note [Mixed precision]
# ~~~~~~~~~~~~~~~~~~~~~~~
# With precision bf16 the forward pass runs under torch.autocast(bfloat16): matmuls (the experts'
# GEMMs, where MMoE/PLE spend their time) take bf16 operands and accumulate in float32, while the
# parameters, the optimizer state, the embedding tables and every loss stay float32. `auto` picks
# bf16 where the device multiplies bf16 natively -- CUDA with bf16 support, or a CPU with AVX512-BF16
# or AMX (measured on a 2-core AMD EPYC with AVX512-BF16: 4x the fp32 GEMM rate, MMoE trains 1.9x
# faster with the same test AUC over 3 seeds; benchmarks/RESULTS.md) -- and float32 elsewhere, where
# emulated bf16 would be slower. On a CPU, `auto` also wants BF16_AUTO_MACS dense multiply-adds per
# sample: below that the casts cost more than the GEMMs save (measured, interleaved runs of the
# trainer step: AITM, 26k, 0.87x in bf16; ESMM, 12k, 0.95x; the shipped 2-level PLE, 22k, 0.77x;
# SharedBottom, 46k, 1.35x; single_task, 137k, 1.8x; MMoE, 1.04M, 1.9x). Tower.head computes each
# logit in float32 (layers.py Note [Float32 logits]), so outputs keep full resolution for AUC, and an
# embedding table casts its output once for all readers (Note [One cast per table]). Exported
# models (export.py) are float32.


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware (CUDA bf16 support; CPU AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own CPUID checks
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def dense_macs(model: nn.Module) -> int:
    """Multiply-adds per sample of the model's dense layers: every nn.Linear weight and BatchedExperts' stacked
    weights (the generated module's own copy of the class, hence matched by name)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel()
        elif type(m).__name__ == "BatchedExperts":
            total += sum(w.numel() for w in m.weights)
    return total


def resolve_precision(name: str, device: torch.device, macs: int) -> str:
    """`auto` -> bf16 where native_bf16(device) (on a CPU, for a model of at least BF16_AUTO_MACS dense
    multiply-adds per sample), else fp32; fp32 and bf16 as given (Note [Mixed precision])."""
    _choice("precision", name, PRECISIONS)
    if name == "auto":
        big_enough = device.type == "cuda" or macs >= BF16_AUTO_MACS
        return "bf16" if big_enough and native_bf16(device) else "fp32"
    return name


def _autocast(device: torch.device, precision: str) -> Any:
    """bf16 autocast for precision bf16, none for fp32 (losses are always computed in float32 outside it)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# --------------------------------------------------------------------------------------------
# Losses, label domains and metrics from the IR


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
        return Accumulator({k: kind.value for k, kind in self.metric_kinds.items()})

    def update(self, acc: Accumulator, outputs: Mapping[str, Tensor], y: Mapping[str, Tensor],
               groups: Tensor | None) -> None:
        acc.update({m.key: outputs[m.output] for m in self.metrics}, {m.key: y[m.label] for m in self.metrics},
                   groups=groups, masks={m.key: y[m.mask] for m in self.metrics if m.mask})


# --------------------------------------------------------------------------------------------
# Monitor (early stopping)


@dataclass(frozen=True)
class Monitor:
    name: str  # as written: `cvr.auc`, `mean.auc`, `cvr@click.auc`
    output: str
    metric: str

    @property
    def higher_is_better(self) -> bool:
        return HIGHER_IS_BETTER[self.metric]

    def value(self, metrics: Mapping[str, Mapping[str, float]]) -> float:
        if self.output == "mean":
            vals = [m[self.metric] for k, m in metrics.items() if "@" not in k and self.metric in m
                    and not math.isnan(m[self.metric])]
            return sum(vals) / len(vals) if vals else math.nan
        return float(metrics.get(self.output, {}).get(self.metric, math.nan))

    def better(self, value: float, best: float | None) -> bool:
        if math.isnan(value):
            return False
        if best is None or math.isnan(best):
            return True
        return value > best if self.higher_is_better else value < best


def _monitor(name: str, objective: Objective, has_groups: bool) -> Monitor:
    output, _, metric = name.rpartition(".")
    if not output or metric not in names(Metric):
        raise ConfigError(f"monitor '{name}' must be <output>.<metric> or mean.<metric>, metric one of "
                          + ", ".join(names(Metric)))
    kinds = objective.metric_kinds
    if output == "mean":
        candidates = [k for k in kinds if "@" not in k]
    elif output in kinds:
        candidates = [output]
    else:
        hint = did_you_mean(output, [*kinds, "mean"])
        raise ConfigError(f"monitor '{name}': no output '{output}' with a label"
                          + (f" ({hint})" if hint else f"; outputs: {', '.join(kinds) or 'none'}"))
    applicable = {"auc", "logloss", "gauc"} if any(kinds[k] is TaskKind.binary for k in candidates) else set()
    if any(kinds[k] is TaskKind.regression for k in candidates):
        applicable |= {"mse", "mae"}
    if metric == "gauc" and not has_groups:
        applicable.discard("gauc")
    if metric not in applicable:
        why = " (the dataset has no user/group id)" if metric == "gauc" else ""
        raise ConfigError(f"monitor '{name}': '{output}' has no metric '{metric}'{why}; "
                          f"available: {', '.join(sorted(applicable)) or 'none'}")
    return Monitor(name, output, metric)


# --------------------------------------------------------------------------------------------
# Model plumbing


def shared_parameters(module: nn.Module, graph: Any) -> list[nn.Parameter]:
    """Parameters of the blocks that receive gradient from two or more losses (graph.shared_nodes).

    A node `<kind>:<name>` is the module attribute `<name>` (`transfer_<name>` for transfer nodes). The
    result is in the module's registration order, which in a generated model is forward order (GradNorm
    takes the last shared layer from it).
    """
    from ..graph import shared_nodes

    wanted: set[int] = set()
    for nid in shared_nodes(graph):
        kind, name = nid.split(":", 1)
        block = getattr(module, f"transfer_{name}" if kind == "transfer" else name, None)
        if isinstance(block, nn.Module):
            wanted.update(id(p) for p in block.parameters())
    return [p for p in module.parameters() if id(p) in wanted and p.requires_grad]


def _make_weighting(name: str, objective: Objective, shared: list[nn.Parameter]) -> nn.Module:
    """runtime/weighting.py's strategy `name` over the objective's loss terms."""
    from . import weighting as strategies

    kinds = {t.key: ("binary" if t.binary else "regression") for t in objective.terms}
    try:
        return strategies.make(name, objective.loss_keys, objective.weights, shared, kinds=kinds)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _make_optimizer(name: str, params: list[dict[str, Any]], lr: float, device: torch.device) -> torch.optim.Optimizer:
    """adam/adamw/sgd/adagrad, fused where the device supports it (fused Adam: ~1.6x the foreach step)."""
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
           "adagrad": torch.optim.Adagrad}[name]
    for impl in ({"fused": True}, {"foreach": True}, {}):
        try:
            opt = cls(params, lr=lr, **impl)
        except (RuntimeError, TypeError, ValueError):
            continue
        if impl.get("fused"):  # construction may succeed where the step does not: try one on a scratch tensor
            try:
                probe = nn.Parameter(torch.zeros(1, device=device))
                probe.grad = torch.zeros(1, device=device)
                cls([probe], lr=lr, **impl).step()
            except (RuntimeError, TypeError, ValueError):
                continue
        return opt
    raise ConfigError(f"optimizer '{name}' cannot be built on {device}")


@dataclass
class Prepared:
    """A spec checked against a dataset, its generated source, and the dataset's splits cut to the model."""

    checked: Checked
    objective: Objective
    source: str
    cls: type
    dataset: Any  # runtime.data.Dataset
    splits: dict[str, Any]  # name -> data.Split with the model's columns and the objective's label products


def _spec_input(spec: str | Path | Checked) -> tuple[str, str]:
    if isinstance(spec, Checked):
        return spec.source.text, spec.source.path
    path = Path(spec)
    try:
        return path.read_text(encoding="utf-8"), str(spec)
    except FileNotFoundError:
        raise ConfigError(f"{spec}: no such spec file") from None


def _check_against(text: str, path: str, schema: Any) -> Checked:
    checked = check_text(text, path, schema=schema)
    if not checked.ok:
        raise SpecError(checked.diagnostics)
    assert checked.model is not None and checked.graph is not None
    return checked


def _same_fields(a: Any, b: Any) -> bool:
    return (a.labels, a.sparse, a.dense, dict(a.groups)) == (b.labels, b.sparse, b.dense, dict(b.groups))


def _cut(split: Any, cls: type, schema: Any, objective: Objective) -> Any:
    """The split with only the model's columns (selected once, here) and the label products (still on the host)."""
    from .data import Split

    def columns(matrix: Tensor, names: Sequence[str], fields: Sequence[str]) -> Tensor:
        index = [names.index(f) for f in fields]
        if index == list(range(matrix.shape[1])):
            return matrix  # the model reads every column in order: share the tensor, no second copy
        return matrix.index_select(1, torch.tensor(index, dtype=torch.long)).contiguous()

    cut = Split(
        sparse=columns(split.sparse, schema.sparse, cls.SPARSE_FIELDS),
        dense=columns(split.dense, schema.dense, cls.DENSE_FIELDS),
        labels=objective.targets(split.labels),
        groups=split.groups,
    )
    return cut


def data_fits(nbytes: int, device: torch.device, free: int | None = None) -> bool:
    """Whether splits of `nbytes` may move to `device` whole (Note [Streamed batches]): always on a CPU; on an
    accelerator when they take at most DEVICE_DATA_SHARE of its free memory (`free`, else asked of the device)."""
    if device.type == "cpu":
        return True
    if free is None:
        free = torch.cuda.mem_get_info(device)[0]
    return nbytes <= DEVICE_DATA_SHARE * free


def _place(splits: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the splits to `device` when they fit there, else leave them on the host, streaming batches to it."""
    if data_fits(sum(split.nbytes for split in splits.values()), device):
        return {name: split.to(device) for name, split in splits.items()}
    return {name: replace(split, stream_to=device) for name, split in splits.items()}


def _check_columns(cls: type, dataset: Any, source: str) -> None:
    """The generated module's columns exist in the dataset (evaluate/predict on other data than trained on)."""
    from .data import DataError

    schema = dataset.schema
    missing = [f for f in cls.SPARSE_FIELDS if f not in schema.sparse] + \
              [f for f in cls.DENSE_FIELDS if f not in schema.dense]
    if missing:
        cols = ", ".join(f"'{c}'" for c in missing)
        raise DataError(f"{source}: the model reads column(s) {cols}, which the dataset does not have")


def _check_vocab(cls: type, dataset: Any, split: str, vocab: Mapping[str, int]) -> None:
    """Ids beyond the trained vocabulary would read another field's rows: refuse them by column and row."""
    from .data import DataError

    schema, data = dataset.schema, dataset.split(split)
    for f in cls.SPARSE_FIELDS:
        col = data.sparse[:, schema.sparse.index(f)]
        over = col >= vocab[f]
        if bool(over.any()):
            i = int(torch.nonzero(over)[0, 0])
            raise DataError(f"{dataset.source}: {split} split, column '{f}', row {i + 1}: id {int(col[i])} is outside "
                            f"the model's vocabulary (size {vocab[f]}, from the data it was trained on)")


def check_spec(text: str, path: str, *, data: str | None, data_dir: str | None) -> tuple[Checked, str, Any]:
    """The spec checked against the schema of the data it will really read, that data source, and the schema.

    Lowering against the real schema (not only the spec's `data` line) makes `fields all` resolve there
    and turns a field or label the dataset lacks into a positioned SpecError, before any data is loaded.
    """
    from ..catalog import schema_for

    if data is None:  # the spec's own `data` line
        first = check_text(text, path, data_dir=data_dir)
        if not first.ok:
            raise SpecError(first.diagnostics)
        assert first.model is not None
        data = first.model.data
    schema = schema_for(data, data_dir)
    return _check_against(text, path, schema), data, schema


def prepare(text: str, path: str, *, data: str | None, data_dir: str | None, rows: int | None, data_seed: int,
            device: torch.device, source: str | None = None,
            checked: tuple[Checked, str, Any] | None = None) -> Prepared:
    """Check the spec against the dataset (check_spec), load the data, compile (or reuse `source`), cut the splits."""
    from .. import compile_spec, load_module
    from ..codegen import class_name
    from .data import load_dataset

    spec, data, schema = checked or check_spec(text, path, data=data, data_dir=data_dir)
    assert spec.model is not None
    objective = Objective(spec.model)
    dataset = load_dataset(data, data_dir=data_dir, rows=rows, seed=data_seed, binary_labels=objective.binary_columns)
    if not _same_fields(dataset.schema, schema):  # e.g. a folder whose schema was inferred differently on load
        spec = _check_against(text, path, dataset.schema)
        assert spec.model is not None
        objective = Objective(spec.model)
    if source is None:
        source = compile_spec(spec)
    module = load_module(source, f"mtldsl_{spec.model.name}")
    cls = getattr(module, class_name(spec.model.name))
    _check_columns(cls, dataset, dataset.source)
    splits = _place({name: _cut(dataset.split(name), cls, dataset.schema, objective)
                     for name in ("train", "val", "test")}, device)
    return Prepared(spec, objective, source, cls, dataset, splits)


def _instantiate(cls: type, vocab: Mapping[str, int], seed: int, device: torch.device,
                 sparse_grad: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    model = cls(dict(vocab), sparse_grad=sparse_grad)
    return model.to(device)


# Note [Sparse embedding updates]
# With dense gradients every step touches every row of every embedding table several times: the
# embedding backward zeroes and scatters into a (rows x dim) gradient, and Adam reads and writes the
# weight, the gradient and both moments of every row, although a batch of 1024 rows touches at most
# 1024 x fields of them. For the small synthetic tables that costs nothing; on real vocabularies (millions
# of ids) it dominates the step (DESIGN.md, Generated code). `--sparse-embeddings on` builds the tables
# with sparse gradients (nn.Embedding(sparse=True): the gradient holds only the looked-up rows) and gives
# the table weights their own row-wise optimizer: SparseAdam for adam/adamw (lazy Adam: a row's moments
# and weight move only in steps whose batch contains it; its first step is dense Adam's except for
# gradients near eps, which SparseAdam adds before the second moment's bias correction), Adagrad
# and SGD as they are (both update only the rows present). Every other parameter keeps the fused dense
# optimizer. Sparse updates take no weight decay (a decayed row would have to move every step, which is
# what they avoid), so `on` refuses a spec with weight_decay > 0; and DDP's NCCL backend cannot reduce
# sparse gradients, so `on` refuses torchrun. `auto` (the default) turns them on when neither applies and
# the largest table holds at least SPARSE_AUTO_BYTES of weights.

SPARSE_OPTIMIZERS = {"adam": torch.optim.SparseAdam, "adamw": torch.optim.SparseAdam,
                     "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}


def _table_bytes(cls: type, vocab: Mapping[str, int]) -> int:
    """Weight bytes of the largest embedding table `cls` builds over `vocab` (built on the meta device)."""
    with torch.device("meta"):
        model = cls(dict(vocab))
    return max((m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Embedding)),
               default=0)


def _use_sparse(cfg: TrainConfig, table_bytes: int, distributed: bool) -> bool:
    """Whether this run updates its embedding tables sparsely (Note [Sparse embedding updates])."""
    if cfg.sparse_embeddings == "off":
        return False
    if cfg.sparse_embeddings == "on":
        if distributed:
            raise ConfigError("--sparse-embeddings on: sparse embedding gradients do not work under torchrun "
                              "(DDP's NCCL backend cannot reduce them); use --sparse-embeddings off")
        return True
    return not distributed and cfg.weight_decay == 0 and table_bytes >= SPARSE_AUTO_BYTES


class Optimizers:
    """The dense optimizer and, with sparse embedding updates, the tables' row-wise one, stepped as one."""

    def __init__(self, dense: torch.optim.Optimizer, sparse: torch.optim.Optimizer | None) -> None:
        self.dense, self.sparse = dense, sparse

    def zero_grad(self) -> None:
        self.dense.zero_grad(set_to_none=False)  # reuse dense gradient buffers (DESIGN.md: no fresh page faults)
        if self.sparse is not None:
            self.sparse.zero_grad(set_to_none=True)  # a sparse gradient is rebuilt by every backward

    def step(self) -> None:
        self.dense.step()
        if self.sparse is not None:
            self.sparse.step()

    def state_dict(self) -> dict[str, Any]:
        """The dense optimizer's state dict, plus the sparse one's under "sparse" when there is one."""
        state = self.dense.state_dict()
        if self.sparse is not None:
            state = {**state, "sparse": self.sparse.state_dict()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        sparse = state.pop("sparse", None)
        if (sparse is None) != (self.sparse is None):
            raise ConfigError("--resume: the checkpoint's embedding updates were "
                              f"{'dense' if sparse is None else 'sparse'}; resume with the same --sparse-embeddings")
        self.dense.load_state_dict(state)
        if self.sparse is not None:
            self.sparse.load_state_dict(sparse)


def _vocab(cls: type, schema: Any) -> dict[str, int]:
    if schema.vocab_sizes is None:
        raise ConfigError(f"dataset '{schema.name}' has no vocabulary sizes")
    return {f: int(schema.vocab_sizes[f]) for f in cls.SPARSE_FIELDS}


# --------------------------------------------------------------------------------------------
# Evaluation and the metric table


@torch.inference_mode()
def _evaluate(model: nn.Module, split: Any, objective: Objective, batch_size: int,
              device: torch.device, precision: str) -> dict[str, dict[str, float]]:
    was_training = model.training
    model.eval()
    acc = objective.accumulator()
    for batch in split.batches(min(batch_size, EVAL_BATCH) if batch_size > 0 else EVAL_BATCH, shuffle=False):
        with _autocast(device, precision):
            out = model({"sparse": batch["sparse"], "dense": batch["dense"]})
        objective.update(acc, {k: v.float() for k, v in out.items()}, batch["labels"], batch["groups"])
    model.train(was_training)
    return acc.compute()


_TABLE_METRICS = ("auc", "logloss", "gauc", "mse", "mae")


def format_table(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table, one row per output (and domain): output, auc, logloss, gauc (mse, mae), n."""
    cols = [c for c in _TABLE_METRICS if any(c in m for m in metrics.values())]
    rows = [["output", *cols, "n"]]
    for name, m in metrics.items():
        cells = [name]
        for c in cols:
            v = m.get(c)
            cells.append("-" if v is None else "nan" if math.isnan(v) else f"{v:.4f}")
        cells.append(str(int(m.get("n", 0))))
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(r)).rstrip()
             for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Checkpoints

# Note [Resume]
# `last.pt` is written at the end of every epoch (after validation) and every `checkpoint_every` steps;
# `checkpoint.pt` at the end of each epoch that improves the monitor (the best state; written before
# `last.pt`, so `last.pt` never claims a best that `checkpoint.pt` does not hold). Both hold the whole
# training state: model, optimizer and weighting state dicts, completed epochs, the global step, the
# batches already done in the current epoch with their partial loss sums, best value/epoch, patience
# counter, history, the torch RNG states, the config and the vocabulary sizes.
# Resume (`resume=True`, `out` = the run folder) rebuilds the model from the run's model.py, loads
# `last.pt` and continues *exactly* where it stopped, mid-epoch included: each epoch's shuffle comes
# from a generator seeded by (seed, epoch), so the resumed epoch redraws the same permutation and skips
# the batches already trained on (none is seen twice or skipped), and the restored RNG state gives the
# same dropout masks. Resuming the end of epoch k with the same seed therefore ends with the same
# parameters as an uninterrupted run. Steps after the last save are lost and redone. A resumed run may
# change only RESUMABLE settings (e.g. more --epochs); anything else must match the checkpoint.

# Note [Distributed training]
# `torchrun --nproc_per_node=N -m mtldsl train SPEC` runs `train()` in N processes; `_join_group` joins
# the group (distributed.process_group: gloo on CPU, nccl on cuda:LOCAL_RANK) and leaves it when train()
# returns or raises. Without torchrun's environment nothing below applies. Under it:
# - every rank loads the same dataset and builds the same model (DDP also broadcasts rank 0's weights);
#   `--batch-size` is per process, a step trains on a global batch of N x batch_size rows, each rank
#   its own equal-size block of the same per-epoch permutation (Note [Global batch] in distributed.py):
#   one DDP step is one single-process step on the global batch. Masked (`where`) losses divide by the
#   global mask count, so that holds for them too.
# - the training steps run through `Trainer.net`, DDP's wrapper of `Trainer.model`. DDP averages the
#   gradients of the final backward (its hooks fire on `.backward()`, not on torch.autograd.grad); the
#   gradient strategies' per-task gradients (torch.autograd.grad on the shared parameters) are averaged
#   by weighting.py, and their correction sum_t (c_t - 1) g_t is added after DDP's average, so every
#   gradient is averaged exactly once and all ranks apply the same update (UWL/GradNorm's own weights
#   are averaged by weighting.py). Logged losses are averaged over ranks at each read-back, so a NaN on
#   any rank stops every rank at the same step.
# - rank 0 alone evaluates (val each epoch, test at the end) with the unwrapped module, on the whole
#   split; the others wait for its metrics (broadcast), so early-stopping state is identical everywhere.
# - rank 0 alone writes the run folder (it picks the name and broadcasts it), checkpoints (the unwrapped
#   module's state dict: no `module.` prefix; loadable by a single process) and prints; every rank reads
#   the checkpoint on --resume (the run folder must be visible to all ranks, as on one machine). A run
#   stopped mid-epoch resumes only with the same number of processes (the batch position depends on it).


def _save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """torch.save straight into the atomic temporary file: no in-memory copy of a large table's state."""
    with runs.atomic_write(path, "wb") as f:
        torch.save(state, f)


def _load_checkpoint(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint at `path`; mmap=True maps its tensors from the file, so the ones never read (the
    optimizer state when only the model is wanted) cost no memory."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a file from elsewhere, or damaged by hand: one clear line
        raise ConfigError(f"{path}: not a readable mtldsl checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{path}: not an mtldsl checkpoint (format {FORMAT})")
    return state


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffle of epoch `epoch` (1-based) depends only on (seed, epoch): a resumed epoch redraws it."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]  # the content of metrics.json
    history: list[dict[str, Any]]
    table: str  # the final per-task table (test split)
    model: nn.Module  # the best checkpoint's weights, in eval mode (under DDP: on rank 0; final weights elsewhere)
    best_epoch: int | None
    is_main: bool = True  # False on the non-zero ranks of a torchrun launch (they print nothing)


@dataclass
class EvalResult:
    metrics: dict[str, dict[str, float]]
    table: str
    dataset: str
    split: str


@dataclass
class _State:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps so far
    batch_in_epoch: int = 0  # batches of epoch `epoch + 1` already trained
    loss_sums: list[float] = field(default_factory=list)  # partial sums of epoch `epoch + 1`
    loss_count: int = 0
    epoch_seconds: float = 0.0  # partial training-loop time of epoch `epoch + 1`
    train_seconds: float = 0.0  # training-loop time of completed epochs (no evaluation)
    samples: int = 0  # training samples of completed epochs
    best_value: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    stopped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """The loop over one prepared spec: steps, NaN checks, validation, early stopping, checkpoints.

    Data-parallel (Note [Distributed training]) when `dist` (a distributed.Context) is given: `self.model`
    stays the plain module (checkpoints, evaluation), `self.net` is its DistributedDataParallel wrapper
    that the training steps run through, `train_batches` yields this rank's shard, and only the process
    with `is_main` writes files or prints.
    """

    def __init__(self, prepared: Prepared, cfg: TrainConfig, run_dir: Path, device: torch.device, *,
                 progress: bool, log: Any = None, dist: Any = None) -> None:
        self.p, self.cfg, self.run_dir, self.device = prepared, cfg, run_dir, device
        self.dist = dist
        self.world_size = dist.world_size if dist is not None else 1
        self.rank = dist.rank if dist is not None else 0
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.objective = prepared.objective
        self.vocab = _vocab(prepared.cls, prepared.dataset.schema)
        self.sparse = _use_sparse(cfg, _table_bytes(prepared.cls, self.vocab), dist is not None)
        self.model = _instantiate(prepared.cls, self.vocab, cfg.seed, device, sparse_grad=self.sparse)
        self.precision = resolve_precision(cfg.precision, device, dense_macs(self.model))
        self.net: nn.Module = self.model
        if dist is not None:  # broadcasts rank 0's parameters and buffers: every rank starts equal
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        assert prepared.checked.graph is not None
        self.weighting = _make_weighting(cfg.weighting, self.objective,
                                         shared_parameters(self.model, prepared.checked.graph)).to(device)
        tables = {id(m.weight) for m in self.model.modules() if isinstance(m, nn.Embedding) and m.sparse}
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad and id(p) not in tables],
                   "weight_decay": cfg.weight_decay}]
        extra = [p for p in self.weighting.parameters() if p.requires_grad]
        if extra:  # learnable loss weights (UWL): trained, never decayed
            groups.append({"params": extra, "weight_decay": 0.0})
        sparse_params = [p for p in self.model.parameters() if id(p) in tables and p.requires_grad]
        self.optimizer = Optimizers(
            _make_optimizer(cfg.optimizer, groups, cfg.lr, device),
            SPARSE_OPTIMIZERS[cfg.optimizer](sparse_params, lr=cfg.lr) if sparse_params else None)
        self.monitor = _monitor(cfg.monitor, self.objective, prepared.dataset.train.groups is not None)
        self._losses_of = (self.objective.losses if dist is None
                           else functools.partial(self.objective.losses, dist=dist))
        self.state = _State(loss_sums=[0.0] * len(self.objective.loss_keys))
        self.last_weights: Mapping[str, Any] = {}

    # ---- checkpoints --------------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        s = self.state
        return {
            "format": FORMAT,
            "mtldsl": __version__,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "weighting": self.weighting.state_dict(),
            "epoch": s.epoch, "step": s.step, "batch_in_epoch": s.batch_in_epoch,
            "loss_sums": list(s.loss_sums), "loss_count": s.loss_count, "epoch_seconds": s.epoch_seconds,
            "train_seconds": s.train_seconds, "samples": s.samples,
            "best": {"value": s.best_value, "epoch": s.best_epoch},
            "bad_epochs": s.bad_epochs, "stopped": s.stopped,
            "history": list(s.history),
            "rng": _rng_state(),
            "config": self.cfg.to_json(),
            "vocab_sizes": dict(self.vocab),
            "loss_keys": self.objective.loss_keys,
            "world_size": self.world_size,
        }

    def save(self, *, best: bool) -> None:
        if not self.is_main:
            return
        state = self.checkpoint()
        if best:
            _save_checkpoint(state, self.run_dir / runs.CHECKPOINT)
            runs.atomic_copy(self.run_dir / runs.CHECKPOINT, self.run_dir / runs.LAST)
        else:
            _save_checkpoint(state, self.run_dir / runs.LAST)

    def restore(self, ckpt: Mapping[str, Any]) -> None:
        saved_world = int(ckpt.get("world_size", 1))
        if ckpt["batch_in_epoch"] and saved_world != self.world_size:
            raise ConfigError(f"--resume: the run stopped mid-epoch with {saved_world} process(es); resume it with "
                              f"{saved_world} (a different number of processes is fine from the end of an epoch)")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.weighting.load_state_dict(ckpt["weighting"])
        best = ckpt["best"]
        self.state = _State(
            epoch=ckpt["epoch"], step=ckpt["step"], batch_in_epoch=ckpt["batch_in_epoch"],
            loss_sums=list(ckpt["loss_sums"]), loss_count=ckpt["loss_count"], epoch_seconds=ckpt["epoch_seconds"],
            train_seconds=ckpt["train_seconds"], samples=ckpt["samples"], best_value=best["value"],
            best_epoch=best["epoch"], bad_epochs=ckpt["bad_epochs"], stopped=ckpt["stopped"],
            history=list(ckpt["history"]),
        )
        _set_rng_state(ckpt["rng"])

    # ---- the loop ------------------------------------------------------------------------------

    def train_batches(self, epoch: int) -> Iterator[dict[str, Any]]:
        """This process's batches of `epoch`: all of them, or its shard of each global batch under DDP."""
        generator = _epoch_generator(self.cfg.seed, epoch)
        if self.dist is None:
            return self.p.splits["train"].batches(self.cfg.batch_size, shuffle=True, generator=generator)
        from .distributed import shard_batches

        return shard_batches(self.p.splits["train"], self.cfg.batch_size, self.rank, self.world_size, generator)

    def batches_per_epoch(self) -> int:
        n = len(self.p.splits["train"])
        if self.dist is None:
            return math.ceil(n / self.cfg.batch_size)
        from .distributed import batches_per_epoch

        return batches_per_epoch(n, self.cfg.batch_size, self.world_size)

    def rows_per_epoch(self) -> int:
        """Training rows of one epoch over all processes (samples/s is the global throughput)."""
        n = len(self.p.splits["train"])
        if self.dist is None:
            return n
        from .distributed import rows_per_epoch

        return rows_per_epoch(n, self.cfg.batch_size, self.world_size)

    def fit(self) -> None:
        s = self.state
        if s.stopped:
            return
        while s.epoch < self.cfg.epochs:
            self.run_epoch(s.epoch + 1)
            if s.stopped:
                break

    def _flush(self, pending: list[Tensor], first_step: int, epoch: int, first_batch: int) -> list[float] | None:
        """Read back the losses of the last steps (one sync): NaN check, epoch sums; the block's mean."""
        if not pending:
            return None
        block = torch.stack(pending)  # (steps, losses)
        pending.clear()
        if self.dist is not None:  # the global batches' losses; a NaN on any rank stops every rank here
            self.dist.mean_(block)
        block = block.double().cpu()
        bad = ~torch.isfinite(block)
        if bool(bad.any()):
            i, j = (int(v) for v in torch.nonzero(bad)[0])
            raise TrainingDiverged(self.objective.loss_keys[j], float(block[i, j]), first_step + i, epoch,
                                   first_batch + i)
        s = self.state
        sums = block.sum(0).tolist()
        s.loss_sums = [a + b for a, b in zip(s.loss_sums, sums)]
        s.loss_count += block.shape[0]
        return block.mean(0).tolist()

    def train_step(self, batch: Mapping[str, Any]) -> Tensor:
        """One optimizer step on `batch` (the module in train mode): the losses, (n_losses,), left on the device."""
        with _autocast(self.device, self.precision):
            out = self.net({"sparse": batch["sparse"], "dense": batch["dense"]})
        losses = self._losses_of(out, batch["labels"])
        self.optimizer.zero_grad()
        self.last_weights = self.weighting.backward(losses)
        self.optimizer.step()
        return torch.stack([losses[k].detach() for k in self.objective.loss_keys])

    def run_epoch(self, epoch: int) -> None:
        from tqdm.auto import tqdm

        s, cfg = self.state, self.cfg
        n_batches = self.batches_per_epoch()
        skip = s.batch_in_epoch  # > 0 only when resuming mid-epoch (Note [Resume])
        if skip == 0:
            s.loss_sums, s.loss_count, s.epoch_seconds = [0.0] * len(self.objective.loss_keys), 0, 0.0
        batches = self.train_batches(epoch)
        for _ in range(skip):
            next(batches)
        bar = tqdm(total=n_batches, initial=skip, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False,
                   file=sys.stderr, dynamic_ncols=True, disable=not self.progress or not sys.stderr.isatty())
        keys = self.objective.loss_keys
        pending: list[Tensor] = []
        first_step, first_batch = s.step + 1, s.batch_in_epoch + 1
        self.net.train()
        t0 = time.perf_counter()
        try:
            for batch in batches:
                pending.append(self.train_step(batch))
                s.step += 1
                s.batch_in_epoch += 1
                bar.update(1)
                if len(pending) >= LOG_EVERY:
                    mean = self._flush(pending, first_step, epoch, first_batch)
                    first_step, first_batch = s.step + 1, s.batch_in_epoch + 1
                    if mean is not None and not bar.disable:
                        bar.set_postfix({k: f"{v:.4f}" for k, v in zip(keys, mean)}, refresh=False)
                if cfg.checkpoint_every and s.step % cfg.checkpoint_every == 0 and s.batch_in_epoch < n_batches:
                    self._flush(pending, first_step, epoch, first_batch)  # never checkpoint a diverged step
                    first_step, first_batch = s.step + 1, s.batch_in_epoch + 1
                    s.epoch_seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.save(best=False)
            self._flush(pending, first_step, epoch, first_batch)
        finally:
            bar.close()
        s.epoch_seconds += time.perf_counter() - t0
        self.end_epoch(epoch, self.rows_per_epoch())

    def main_evaluate(self, split: str) -> dict[str, dict[str, float]]:
        """Metrics of `self.model` on a whole split: computed by the main process, the same dict on every rank."""
        val = None
        if self.is_main:
            val = _evaluate(self.model, self.p.splits[split], self.objective, self.cfg.batch_size, self.device,
                            self.precision)
        if self.dist is not None:  # the other ranks wait here while rank 0 evaluates
            val = self.dist.broadcast(val)
        assert val is not None
        return val

    def end_epoch(self, epoch: int, n_samples: int) -> None:
        s, cfg = self.state, self.cfg
        t_eval = time.perf_counter()
        val = self.main_evaluate("val")  # every rank sees rank 0's metrics: identical early-stopping decisions
        eval_seconds = time.perf_counter() - t_eval
        value = self.monitor.value(val)
        improved = self.monitor.better(value, s.best_value) or s.best_epoch is None
        row: dict[str, Any] = {"epoch": epoch}
        n = max(s.loss_count, 1)
        for k, total in zip(self.objective.loss_keys, s.loss_sums):
            row[f"train_loss_{k}"] = total / n
        for k, w in self.last_weights.items():
            row[f"weight_{k}"] = float(w)
        for key, m in val.items():
            for metric, v in m.items():
                if metric != "n":
                    row[f"val_{key}.{metric}"] = v
        row[f"val_{self.monitor.name}"] = value
        row["seconds"] = s.epoch_seconds + eval_seconds
        row["samples_per_second"] = n_samples / s.epoch_seconds if s.epoch_seconds > 0 else math.nan
        s.history.append(row)
        s.train_seconds += s.epoch_seconds
        s.samples += n_samples
        s.epoch, s.batch_in_epoch = epoch, 0
        s.loss_sums, s.loss_count, s.epoch_seconds = [0.0] * len(self.objective.loss_keys), 0, 0.0
        if improved:
            s.best_value, s.best_epoch, s.bad_epochs = value, epoch, 0
        else:
            s.bad_epochs += 1
            if s.bad_epochs >= cfg.patience:
                s.stopped = True
        self.save(best=improved)
        if self.is_main:
            runs.write_history(self.run_dir / runs.HISTORY, s.history)
        if self.progress:
            losses = " ".join(f"{k} {row[f'train_loss_{k}']:.4f}" for k in self.objective.loss_keys)
            mark = " *" if improved else ""
            stop = f"  (no improvement for {s.bad_epochs} epochs: stopping)" if s.stopped else ""
            self.log(f"epoch {epoch}/{cfg.epochs}  loss {losses}  val {self.monitor.name} {value:.4f}{mark}  "
                     f"{row['seconds']:.1f}s  {row['samples_per_second']:,.0f} samples/s{stop}")


# --------------------------------------------------------------------------------------------
# train / evaluate / predict


def _resume_config(saved: Mapping[str, Any], overrides: Mapping[str, Any], run_dir: Path) -> TrainConfig:
    # runs from before these settings: dense embedding updates, bf16 only on CUDA
    precision = "auto" if str(saved["device"]).startswith("cuda") else "fp32"
    cfg = TrainConfig(**{"sparse_embeddings": "off", "precision": precision, **saved})
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None or value == getattr(cfg, key):
            continue
        if key not in RESUMABLE:
            raise ConfigError(f"--resume: {run_dir} was trained with {key}={getattr(cfg, key)!r}, not {value!r}; "
                              f"a resumed run may change only {', '.join(RESUMABLE)}")
        changes[key] = value
    cfg = replace(cfg, **changes)
    _validate_config(cfg)
    return cfg


def train(
    spec: str | Path | Checked,
    *,
    data: str | None = None,
    data_dir: str | None = None,
    rows: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weighting: str | None = None,
    optimizer: str | None = None,
    device: str = "auto",
    seed: int | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    monitor: str | None = None,
    patience: int | None = None,
    progress: bool = True,
    checkpoint_every: int = CHECKPOINT_EVERY,
    runs_root: str | Path = "runs",
    sparse_embeddings: str | None = None,
    precision: str | None = None,
) -> RunResult:
    """Train a spec; every argument left None takes the spec's `train {}` value (data: its `data` line).

    Writes the run folder (runs.py) at `out` or `runs_root/<model>-<data>-<time>`, prints the test
    table to stdout and returns it with the metrics. metrics.json's `train.seconds` counts training
    steps only (no evaluation); `samples_per_second` is training samples over those seconds. Raises SpecError (diagnostics), DataError /
    DatasetNotFound (bad or absent data), ConfigError (bad setting) or TrainingDiverged.
    `resume=True` continues the run in `out` (Note [Resume]). `sparse_embeddings` is auto (default), on or
    off (Note [Sparse embedding updates]); `precision` is auto (default), fp32 or bf16 (Note [Mixed precision]).
    """
    with contextlib.ExitStack() as stack:  # leaves the torchrun process group at the end, on error too
        return _train(stack, spec, data=data, data_dir=data_dir, rows=rows, epochs=epochs, batch_size=batch_size,
                      lr=lr, weighting=weighting, optimizer=optimizer, device=device, seed=seed, out=out,
                      resume=resume, monitor=monitor, patience=patience, progress=progress,
                      checkpoint_every=checkpoint_every, runs_root=runs_root, sparse_embeddings=sparse_embeddings,
                      precision=precision)


def _join_group(stack: contextlib.ExitStack, dev: torch.device) -> tuple[Any, torch.device]:
    """Join torchrun's process group when launched by it (distributed.process_group): (context or None, device)."""
    from . import distributed

    try:
        ctx = stack.enter_context(distributed.process_group(dev))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return ctx, (ctx.device if ctx is not None else dev)


def _train(stack: contextlib.ExitStack, spec: str | Path | Checked, *, data: str | None, data_dir: str | None,
           rows: int | None, epochs: int | None, batch_size: int | None, lr: float | None, weighting: str | None,
           optimizer: str | None, device: str, seed: int | None, out: str | Path | None, resume: bool,
           monitor: str | None, patience: int | None, progress: bool, checkpoint_every: int,
           runs_root: str | Path, sparse_embeddings: str | None, precision: str | None) -> RunResult:
    text, path = _spec_input(spec)
    dev = resolve_device(device)  # fails early on a bad --device; a resumed run re-resolves its config's
    ckpt: dict[str, Any] | None = None
    if resume:
        if out is None:
            raise ConfigError("--resume needs --out RUN_DIR (the run folder to continue)")
        run_dir = Path(out)
        last = run_dir / runs.LAST if (run_dir / runs.LAST).is_file() else run_dir / runs.CHECKPOINT
        if not last.is_file():
            raise ConfigError(f"--resume: {run_dir} has no {runs.LAST} or {runs.CHECKPOINT} to continue from")
        saved_spec = (run_dir / runs.SPEC).read_text(encoding="utf-8") if (run_dir / runs.SPEC).is_file() else None
        if saved_spec is not None and saved_spec != text:
            raise ConfigError(f"--resume: {path} differs from the spec the run in {run_dir} was trained with "
                              f"({run_dir / runs.SPEC})")
        ckpt = _load_checkpoint(last)
        cfg = _resume_config(ckpt["config"], {
            "data": data, "data_dir": data_dir, "rows": rows, "epochs": epochs, "batch_size": batch_size,
            "lr": lr, "weighting": weighting, "optimizer": optimizer, "seed": seed, "monitor": monitor,
            "patience": patience, "device": device if device != "auto" else None,
            "checkpoint_every": checkpoint_every if checkpoint_every != CHECKPOINT_EVERY else None,
            "sparse_embeddings": sparse_embeddings, "precision": precision,
        }, run_dir)
        dist, dev = _join_group(stack, resolve_device(cfg.device))
        source = (run_dir / runs.MODEL_SOURCE).read_text(encoding="utf-8")
        prepared = prepare(text, path, data=cfg.data, data_dir=cfg.data_dir, rows=cfg.rows, data_seed=cfg.data_seed,
                           device=dev, source=source)
        if dist is None or dist.is_main:
            runs.clean_stale_tmp(run_dir)
    else:
        dist, dev = _join_group(stack, dev)
        spec_checked = check_spec(text, path, data=data, data_dir=data_dir)
        model_ir = spec_checked[0].model
        assert model_ir is not None
        data_source = spec_checked[1]
        cfg = _make_config(model_ir, data=data_source, data_dir=data_dir, rows=rows, epochs=epochs,
                           batch_size=batch_size, lr=lr, weighting=weighting, optimizer=optimizer, device=device,
                           seed=seed, monitor=monitor, patience=patience, checkpoint_every=checkpoint_every,
                           sparse_embeddings=sparse_embeddings or "auto", precision=precision or "auto")
        _monitor(cfg.monitor, Objective(model_ir), True)  # before loading any data; gauc is re-checked below
        if out is not None and ((Path(out) / runs.LAST).exists() or (Path(out) / runs.CHECKPOINT).exists()):
            raise ConfigError(f"{out} already holds a run; pass --resume to continue it, or another --out")
        prepared = prepare(text, path, data=data_source, data_dir=data_dir, rows=rows, data_seed=0, device=dev,
                           checked=spec_checked)
        _monitor(cfg.monitor, prepared.objective, prepared.dataset.train.groups is not None)
        if dist is None or dist.is_main:  # only the main process writes (Note [Distributed training])
            if out is None:
                run_dir = runs.new_run_dir(model_ir.name, data_source, runs_root)
            else:
                run_dir = Path(out)
                run_dir.mkdir(parents=True, exist_ok=True)
            runs.atomic_write_text(run_dir / runs.SPEC, text)
            runs.atomic_write_text(run_dir / runs.MODEL_SOURCE, prepared.source)
        if dist is not None:  # one run folder: the name rank 0 chose (its time stamp)
            run_dir = Path(dist.broadcast(str(run_dir) if dist.is_main else None))

    trainer = Trainer(prepared, cfg, run_dir, dev, progress=progress, dist=dist)
    if ckpt is not None:
        trainer.restore(ckpt)
        if trainer.state.stopped and trainer.state.bad_epochs < cfg.patience:
            trainer.state.stopped = False  # a larger --patience lets a stopped run go on
        if trainer.progress:
            where = (f"epoch {trainer.state.epoch + 1}, batch {trainer.state.batch_in_epoch + 1}"
                     if trainer.state.epoch < cfg.epochs else "the end of training")
            trainer.log(f"resuming {run_dir} at step {trainer.state.step} ({where})")
    elif trainer.progress:
        for note in prepared.dataset.notes:
            trainer.log(note)
        if prepared.splits["train"].stream_to is not None:
            nbytes = sum(split.nbytes for split in prepared.splits.values())
            trainer.log(f"data: {nbytes / 2**30:.1f} GiB stay in host memory, batches stream to {trainer.device} "
                        "through pinned buffers (Note [Streamed batches])")
        if trainer.sparse:
            trainer.log(f"embedding tables: sparse gradients, {type(trainer.optimizer.sparse).__name__} "
                        "(Note [Sparse embedding updates])")
        if trainer.precision == "bf16":
            trainer.log(f"precision: bf16 autocast on {trainer.device.type}, float32 weights and losses "
                        "(Note [Mixed precision]; --precision fp32 turns it off)")
    trainer.fit()
    return _finish(trainer, prepared, cfg, run_dir)


def _finish(trainer: Trainer, prepared: Prepared, cfg: TrainConfig, run_dir: Path) -> RunResult:
    """Load the best checkpoint, evaluate it on test, write metrics.json, history.csv and curve.png."""
    s = trainer.state
    if trainer.is_main:  # under DDP the other ranks keep their final weights (the run folder may be rank 0's only)
        best = _load_checkpoint(run_dir / runs.CHECKPOINT, mmap=True)
        trainer.model.load_state_dict(best["model"])
        del best
    test = trainer.main_evaluate("test")
    best_row = next((r for r in s.history if r["epoch"] == s.best_epoch), {})
    model_ir = prepared.checked.model
    assert model_ir is not None
    metrics = {
        "model": model_ir.name,
        "dataset": cfg.data,
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "tasks": test,
        "train": {
            "epochs": s.epoch,
            "seconds": round(s.train_seconds, 3),
            "samples_per_second": round(s.samples / s.train_seconds, 1) if s.train_seconds > 0 else None,
            "steps": s.step,
            "stopped_early": s.stopped,
            "processes": trainer.world_size,  # data-parallel processes (torchrun); samples/s is over all of them
            "sparse_embeddings": trainer.sparse,  # what --sparse-embeddings (config) resolved to
            "precision": trainer.precision,  # what --precision (config) resolved to on this device
        },
        "best_epoch": s.best_epoch,
        "monitor": cfg.monitor,
        "best_value": s.best_value,
        "val": {k[len("val_"):]: v for k, v in best_row.items() if k.startswith("val_")},
        "config": cfg.to_json(),
        "mtldsl": __version__,
        "device": str(trainer.device),
    }
    if trainer.is_main:
        runs.atomic_write_json(run_dir / runs.METRICS, metrics)
        runs.write_history(run_dir / runs.HISTORY, s.history)
        runs.write_curve(run_dir / runs.CURVE, s.history, trainer.objective.loss_keys, trainer.monitor.name,
                         best_epoch=s.best_epoch, log=trainer.log if trainer.progress else None)
    table = format_table(test)
    if trainer.is_main:
        print(table, flush=True)
    trainer.model.eval()
    return RunResult(run_dir, metrics, list(s.history), table, trainer.model, s.best_epoch, trainer.is_main)


@dataclass
class LoadedRun:
    """A run folder brought back: config, spec checked against `dataset`, generated module, best weights."""

    run_dir: Path
    config: TrainConfig
    prepared: Prepared
    model: nn.Module  # best checkpoint, eval mode, on `device`
    device: torch.device
    checkpoint: dict[str, Any]
    precision: str  # the run's precision setting resolved on `device` (Note [Mixed precision])


def load_run(run_dir: str | Path, *, data: str | None = None, data_dir: str | None = None, rows: int | None = None,
             device: str = "auto") -> LoadedRun:
    """Reload a run folder (spec.mtl, model.py, checkpoint.pt) with a dataset (default: the one it trained on)."""
    run_dir = Path(run_dir)
    for name in (runs.SPEC, runs.MODEL_SOURCE, runs.CHECKPOINT):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir}: not a finished run folder (no {name})")
    ckpt = _load_checkpoint(run_dir / runs.CHECKPOINT, mmap=True)
    cfg = TrainConfig(**ckpt["config"])
    dev = resolve_device(device)
    if data is None:
        data, data_dir, rows = cfg.data, cfg.data_dir if data_dir is None else data_dir, cfg.rows if rows is None else rows
    text = (run_dir / runs.SPEC).read_text(encoding="utf-8")
    source = (run_dir / runs.MODEL_SOURCE).read_text(encoding="utf-8")
    prepared = prepare(text, str(run_dir / runs.SPEC), data=data, data_dir=data_dir, rows=rows,
                       data_seed=cfg.data_seed, device=dev, source=source)
    vocab = {str(k): int(v) for k, v in ckpt["vocab_sizes"].items()}
    model = prepared.cls(vocab, sparse_grad=False)
    model.load_state_dict(ckpt["model"])
    model.to(dev).eval()
    return LoadedRun(run_dir, cfg, prepared, model, dev, ckpt, resolve_precision(cfg.precision, dev, dense_macs(model)))


def evaluate(run_dir: str | Path, data: str | None = None, *, data_dir: str | None = None, rows: int | None = None,
             split: str = "test", device: str = "auto", batch_size: int | None = None) -> EvalResult:
    """Per-task metrics of a run's best checkpoint on a split of its dataset (or of `data`)."""
    if split not in ("train", "val", "test"):
        raise ConfigError(f"unknown split '{split}' (train, val, test)")
    run = load_run(run_dir, data=data, data_dir=data_dir, rows=rows, device=device)
    _check_vocab(run.prepared.cls, run.prepared.dataset, split, run.checkpoint["vocab_sizes"])
    metrics = _evaluate(run.model, run.prepared.splits[split], run.prepared.objective,
                        batch_size or run.config.batch_size, run.device, run.precision)
    return EvalResult(metrics, format_table(metrics), run.prepared.dataset.source, split)


def predict(run_dir: str | Path, out_file: str | Path, data: str | None = None, *, data_dir: str | None = None,
            rows: int | None = None, split: str = "test", device: str = "auto",
            batch_size: int | None = None) -> Path:
    """Write per-sample predictions of a split (.parquet or .csv by suffix): row, one column per output,
    then the label columns (`label_<column>`) and the group id when the dataset has one."""
    import pandas as pd

    out_file = Path(out_file)
    suffix = out_file.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise ConfigError(f"{out_file}: unknown prediction format '{out_file.suffix}' (use .parquet or .csv)")
    if split not in ("train", "val", "test"):
        raise ConfigError(f"unknown split '{split}' (train, val, test)")
    run = load_run(run_dir, data=data, data_dir=data_dir, rows=rows, device=device)
    _check_vocab(run.prepared.cls, run.prepared.dataset, split, run.checkpoint["vocab_sizes"])
    cut = run.prepared.splits[split]
    raw = run.prepared.dataset.split(split)
    preds: dict[str, list[Tensor]] = {name: [] for name in run.prepared.cls.OUTPUTS}
    with torch.inference_mode():
        for batch in cut.batches(min(batch_size or run.config.batch_size, EVAL_BATCH), shuffle=False):
            with _autocast(run.device, run.precision):
                out = run.model({"sparse": batch["sparse"], "dense": batch["dense"]})
            for name in preds:
                preds[name].append(out[name].float().cpu())
    columns: dict[str, Any] = {"row": torch.arange(len(raw)).numpy()}
    for name, parts in preds.items():
        columns[name] = torch.cat(parts).numpy() if parts else []
    for col, values in raw.labels.items():
        columns[f"label_{col}"] = values.numpy()
    schema = run.prepared.dataset.schema
    if raw.groups is not None:
        columns[schema.user_id or "group"] = raw.groups.numpy()
    frame = pd.DataFrame(columns)
    if suffix == ".parquet":
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        runs.atomic_write_bytes(out_file, buf.getvalue())
    else:
        runs.atomic_write_text(out_file, frame.to_csv(index=False))
    return out_file
