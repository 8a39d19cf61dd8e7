"""The training options, declared once: name, type, default, help, choices, resumability, validation.

Takes nothing (no torch: the CLI builds `mtldsl train` from it without importing the runtime); gives
OPTIONS (one `Option` per setting), `TrainConfig` (the settings of a run, a dataclass made from the
options that a checkpoint records), and the three readings of a call's options: `make_config` (a new
run: unset options take the spec's `train {}` values), `resume_config` (a resumed run: only resumable
options may differ from the checkpoint, Note [Resume] in loop.py) and `validate_config`. The CLI's
`train` flags (cli/run.py) and `train()`'s keyword parameters (trainer.py) are built from OPTIONS too,
so an option is added, renamed or documented here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..diagnostics import did_you_mean
from ..vocab import Optimizer, Weighting, names

__all__ = [
    "CHECKPOINT_COST",
    "CHECKPOINT_EVERY",
    "OPTIONS",
    "RESUMABLE",
    "Check",
    "ConfigError",
    "Option",
    "Precision",
    "Role",
    "SparseEmbeddings",
    "TrainConfig",
    "bind_options",
    "choice",
    "make_config",
    "resume_config",
    "signature",
    "validate_config",
]

CHECKPOINT_EVERY = 200  # steps between mid-epoch `last.pt` saves by default (Note [Checkpoint cost] in loop.py)
CHECKPOINT_COST = 20  # by default a mid-epoch save waits for this many times its last save's duration of training


class ConfigError(ValueError):
    """A training setting that cannot work (unknown monitor, optimizer, device…); one line for the CLI."""


class SparseEmbeddings(enum.Enum):
    """--sparse-embeddings: Note [Sparse embedding updates] in optim.py."""

    auto = "auto"
    on = "on"
    off = "off"


class Precision(enum.Enum):
    """--precision: Note [Mixed precision] in precision.py."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Role(enum.Enum):
    """Where an option appears."""

    setting = "setting"  # a CLI flag, a train() keyword and a TrainConfig field
    recorded = "recorded"  # a TrainConfig field only (fixed, or the spec's value)
    call = "call"  # a CLI flag and a train() keyword, not recorded in the run's config
    api = "api"  # a train() keyword only


class Check(enum.Enum):
    none = "none"
    positive = "positive"
    non_negative = "non_negative"


_REQUIRED = object()  # no TrainConfig default


@dataclass(frozen=True)
class Option:
    """One training option. `default` is train()'s and the CLI's; None takes the spec's `train {}` value
    when `from_spec`, else `fallback`."""

    name: str
    type: type  # the value's type (int, float, str, bool, Path); None is allowed where default is None
    help: str | None = None
    default: Any = None
    role: Role = Role.setting
    from_spec: bool = False  # None -> the spec's `train { <name> }`
    fallback: Any = None  # None -> this (when not from_spec)
    choices: type[enum.Enum] | None = None
    label: str | None = None  # how an unknown choice is named: "unknown <label> 'x'" (default: the name)
    check: Check = Check.none
    resumable: bool = False  # a resumed run may change it (Note [Resume])
    show_default: bool = False  # the CLI's help shows `[default: …]`
    negate: bool = False  # the CLI flag is `--no-<name>`, default off, and passes `not flag`
    field_default: Any = _REQUIRED  # TrainConfig's default (for checkpoints from before the option)

    @property
    def flag(self) -> str:
        return f"--{'no-' if self.negate else ''}{self.name.replace('_', '-')}"

    @property
    def cli_name(self) -> str:
        return f"no_{self.name}" if self.negate else self.name

    @property
    def recorded(self) -> bool:
        return self.role in (Role.setting, Role.recorded)

    @property
    def keyword(self) -> bool:
        """A train() keyword parameter."""
        return self.role is not Role.recorded

    @property
    def cli(self) -> bool:
        return self.role in (Role.setting, Role.call)

    @property
    def annotation(self) -> Any:
        return self.type if self.default is not None else Optional[self.type]  # noqa: UP045 (a runtime object)


OPTIONS: tuple[Option, ...] = (
    Option("data", str, "Dataset name or folder (default: the spec's `data`)."),
    Option("data_dir", str, "Where named datasets live."),
    Option("rows", int, "Synthetic: total rows; folders: a cap per file.", check=Check.positive),
    Option("data_seed", int, role=Role.recorded, fallback=0),  # the synthetic data's seed: --seed varies training only
    Option("epochs", int, from_spec=True, check=Check.positive, resumable=True),
    Option("batch_size", int, "Rows per step; under torchrun per process (global batch N x B).", from_spec=True,
           check=Check.positive),
    Option("lr", float, from_spec=True, check=Check.positive),
    Option("weight_decay", float, role=Role.recorded, from_spec=True),
    Option("weighting", str, ", ".join(names(Weighting)) + ".", from_spec=True, choices=Weighting),
    Option("optimizer", str, ", ".join(names(Optimizer)) + ".", from_spec=True, choices=Optimizer),
    Option("device", str, "auto (CUDA when present), cpu, cuda, cuda:N.", default="auto", resumable=True,
           show_default=True),
    Option("seed", int, from_spec=True),
    Option("out", Path, "Run folder (default runs/<model>-<data>-<time>).", role=Role.call),
    Option("resume", bool, "Continue the run in --out from its last checkpoint.", default=False, role=Role.call),
    Option("monitor", str, "Early stopping metric: <output>.<metric> or mean.<metric>.", from_spec=True),
    Option("patience", int, "Epochs without improvement before stopping.", from_spec=True,
           check=Check.non_negative, resumable=True),
    Option("checkpoint_every", int, "Steps between mid-epoch last.pt saves (0: epoch ends only). Default: "
           f"every {CHECKPOINT_EVERY} steps, but at most ~{100 // CHECKPOINT_COST}% of the training time spent saving.",
           check=Check.non_negative, resumable=True, field_default=None),
    Option("progress", bool, "No progress bar and no per-epoch lines.", default=True, role=Role.call, negate=True),
    Option("runs_root", Path, default="runs", role=Role.api),
    Option("hash_ids", int, "Hash every id field into N buckets (ids modulo N), for id spaces beyond the "
           "vocabulary limit (Note [Vocabulary bound]).", check=Check.positive, field_default=None),
    Option("sparse_embeddings", str,
           "auto (default: on for a table of 4 MiB or more), on or off: sparse gradients and a row-wise "
           "optimizer (lazy Adam for adam) for the embedding tables.",
           fallback="auto", choices=SparseEmbeddings, label="--sparse-embeddings setting", field_default="auto"),
    Option("log_conflict", int, "Every N steps, the cosine between per-task gradients on the shared parameters "
           "(conflict.csv, conflict.png, history.csv; Note [Gradient conflict]). 0: off, no extra cost.",
           default=0, check=Check.non_negative, resumable=True, field_default=0),
    Option("precision", str,
           "auto (default: bf16 autocast where the device multiplies bf16 natively -- CUDA, or a CPU with "
           "AVX512-BF16 or AMX and a model of 32k+ multiply-adds per sample -- else fp32), fp32 or bf16. "
           "Weights, optimizer state, losses and logits stay float32.",
           fallback="auto", choices=Precision, resumable=True, field_default="auto"),
)
_BY_NAME = {o.name: o for o in OPTIONS}
RESUMABLE = tuple(o.name for o in OPTIONS if o.resumable)  # everything else must match the checkpoint


def _to_json(self: Any) -> dict[str, Any]:
    return dataclasses.asdict(self)


TrainConfig = dataclasses.make_dataclass(
    "TrainConfig",
    [(o.name, o.annotation) if o.field_default is _REQUIRED else (o.name, o.annotation, o.field_default)
     for o in OPTIONS if o.recorded],
    namespace={"to_json": _to_json,
               "__doc__": "Every setting of a run: the spec's `train {}` defaults overridden by arguments/CLI flags."},
    frozen=True,
)
TrainConfig.__module__ = __name__  # pickles and prints as mtldsl.runtime.config.TrainConfig


def signature(*, leading: Sequence[inspect.Parameter] = ()) -> inspect.Signature:
    """train()'s signature: `leading` parameters, then every option as a keyword with its default."""
    params = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default, annotation=o.annotation)
              for o in OPTIONS if o.keyword]
    return inspect.Signature([*leading, *params])


def bind_options(function: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Every keyword option of train(): `given` over the defaults; an unknown name is a TypeError, as Python's."""
    keywords = {o.name: o.default for o in OPTIONS if o.keyword}
    for name in given:
        if name not in keywords:
            hint = did_you_mean(name, list(keywords))
            raise TypeError(f"{function}() got an unexpected keyword argument '{name}'" + (f" ({hint})" if hint else ""))
    return {**keywords, **given}


def choice(label: str, value: str, choices: Sequence[str]) -> str:
    """`value` when it is one of `choices`, else a ConfigError naming the closest."""
    if value not in choices:
        hint = did_you_mean(value, choices)
        raise ConfigError(f"unknown {label} '{value}'" + (f" ({hint})" if hint else f"; one of {', '.join(choices)}"))
    return value


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def make_config(train: Any, given: Mapping[str, Any]) -> TrainConfig:
    """A new run's config: each recorded option from `given` (train()'s keywords), else the spec's
    `train {}` value (`train`: ir.Model.train), else the option's fallback; then validated."""
    values = {}
    for o in OPTIONS:
        if not o.recorded:
            continue
        value = given.get(o.name, o.default)
        if value is None:
            value = _plain(getattr(train, o.name)) if o.from_spec else o.fallback
        values[o.name] = value
    cfg = TrainConfig(**values)
    validate_config(cfg)
    return cfg


def validate_config(cfg: TrainConfig) -> None:
    for o in OPTIONS:
        if not o.recorded:
            continue
        value = getattr(cfg, o.name)
        if value is None:
            continue
        flag = o.flag
        if o.check is Check.positive and not (value > 0 and math.isfinite(value)):  # nan and inf are not
            raise ConfigError(f"{flag} must be a positive finite number, got {value}" if isinstance(value, float)
                              else f"{flag} must be positive, got {value}")
        if o.check is Check.non_negative and value < 0:
            raise ConfigError(f"{flag} must not be negative, got {value}")
        if o.choices is not None:
            choice(o.label or o.name, value, names(o.choices))
    if cfg.sparse_embeddings == SparseEmbeddings.on.value and cfg.weight_decay > 0:
        raise ConfigError(f"--sparse-embeddings on: sparse embedding updates take no weight decay, and the spec sets "
                          f"weight_decay {cfg.weight_decay}; set it to 0 or use --sparse-embeddings off")


def resume_config(saved: Mapping[str, Any], given: Mapping[str, Any], run_dir: Path) -> TrainConfig:
    """A resumed run's config: the checkpoint's, with the options `given` away from their defaults; only
    RESUMABLE ones may differ from it (Note [Resume])."""
    # runs from before these settings: dense embedding updates, bf16 only on CUDA
    precision = "auto" if str(saved["device"]).startswith("cuda") else "fp32"
    cfg = TrainConfig(**{"sparse_embeddings": "off", "precision": precision, **saved})
    changes: dict[str, Any] = {}
    for key, value in given.items():
        option = _BY_NAME[key]
        if not option.recorded or value is None or value == option.default or value == getattr(cfg, key):
            continue
        if not option.resumable:
            raise ConfigError(f"--resume: {run_dir} was trained with {key}={getattr(cfg, key)!r}, not {value!r}; "
                              f"a resumed run may change only {', '.join(RESUMABLE)}")
        changes[key] = value
    cfg = dataclasses.replace(cfg, **changes)
    validate_config(cfg)
    return cfg
