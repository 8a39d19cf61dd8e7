"""The IR: pydantic types for a resolved spec (Task, EmbeddingTable, ExpertGroup, Gate, Route, Tower, Output, Loss, Model).

Takes nothing (lower.py builds these from syntax.Spec); gives frozen, validated objects that graph.py,
validate.py, codegen.py and runtime/ read. Names are plain strings and kinds are enums; where a name
is written in the spec rides along beside it (Note [Spans in the IR]).
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .diagnostics import NOWHERE, Span
from .vocab import Pooling, TaskKind

__all__ = ["BlockKind", "Combine", "Declaration", "EmbeddingTable", "ExpertGroup", "Gate", "Input", "Loss", "Mlp",
           "Model", "NameRef", "Output", "Route", "Task", "TaskKind", "Tower", "Train", "Transfer"]

# Note [Spans in the IR]
# ~~~~~~~~~~~~~~~~~~~~~~
# Every node keeps `span`, the declaration (or reference) it came from, and the fields ending in
# `_span` (or holding NameRefs) say where a name is written: `gate g_ctr for ctr {` has `name_span`
# on `g_ctr` and `owner_span` on `ctr`; each reference of `sum(a, b)` is a NameRef with its own span.
# validate.py takes every caret from these, so it never reads the source again. Spans say where,
# never what: they are left out of ==, hash, repr and model_dump, so two models lowered from
# differently formatted texts compare equal, and runtime/ and codegen read names as plain strings.


def _where(default: Any = NOWHERE) -> Any:
    """A field that holds positions only (Note [Spans in the IR])."""
    return Field(default=default, repr=False, exclude=True)


class Combine(enum.Enum):
    sum = "sum"  # also a single reference
    concat = "concat"


class BlockKind(enum.Enum):
    embedding = "embedding"
    experts = "experts"
    gate = "gate"


class _Node(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    span: Span = _where()

    def _compared(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name, info in type(self).model_fields.items() if not info.exclude)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._compared() == other._compared()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self._compared()))


class NameRef(_Node):
    """A name as written in the spec, at `span`."""

    name: str


class Task(_Node):
    name: str
    kind: TaskKind
    label: tuple[str, ...]  # product of these 0/1 columns (one column for regression)
    where: tuple[str, ...] | None = None  # evaluation domain, reported in addition to all rows
    name_span: Span = _where()


class Input(_Node):
    op: Combine
    refs: tuple[str, ...]  # block instance names
    written: tuple[NameRef, ...] = _where(())  # each ref as written (`experts` for `experts_ctr`), with its span

    def written_ref(self, i: int) -> NameRef:
        """The i-th reference as written; a level's implied input is reported at the block."""
        return self.written[i] if i < len(self.written) else NameRef(name=self.refs[i], span=self.span)


class Mlp(_Node):
    dims: tuple[int, ...] = ()
    activation: str = "relu"  # a vocab.Activation value
    dropout: float = 0.0
    batch_norm: bool = False


class _Block(_Node):
    """What embedding tables, expert groups and gates share: an instance of a declaration."""

    name: str  # the instance: `experts_ctr_l2`
    decl_name: str  # as declared: `experts`
    owner: str | None  # a task, or None for shared
    per_task: bool = False  # declared `per task`: one instance per task
    name_span: Span = _where()  # the declared name
    owner_span: Span = _where()  # the task of `for TASK`; the declared name otherwise


class EmbeddingTable(_Block):
    fields: tuple[str, ...]  # single-valued fields: one row each
    dense: tuple[str, ...] = ()
    dim: int = 16
    copies: int = 1
    selects_nothing: bool = False  # `fields none`, `fields []`: the spec asks for no feature
    lists: tuple[str, ...] = ()  # list fields, each pooled into one row's width (Note [List fields])
    weighted: tuple[str, ...] = ()  # those of `lists` that have a weights column
    pool: Pooling | None = None  # `pool sum|mean|max`; None: not written
    pool_span: Span = _where()  # the `pool` property
    list_spans: tuple[Span, ...] = _where(())  # where each of `lists` is selected (its name, or the group)

    @property
    def width(self) -> int:
        """Single lookups, then pooled lists, then dense columns (per copy)."""
        return (len(self.fields) + len(self.lists)) * self.dim + len(self.dense)


class ExpertGroup(_Block):
    count: int = 1
    input: Input
    mlp: Mlp
    level: int = 0  # 1-based inside `levels`, 0 outside


class Route(_Node):
    group: str
    forward: bool = True  # the gate mixes this group's outputs
    backward: bool = True  # False: the gated input is .detach()ed (Note [Gate visibility])


class Gate(_Block):
    input: Input
    routes: tuple[Route, ...]
    mlp: Mlp
    level: int = 0
    written_routes: int = 0  # `mix` lines in the declaration (lower() drops the ones it reports)


class Tower(_Node):
    name: str
    task: str
    input: Input
    mlp: Mlp
    per_task: bool = False  # declared `tower per task`
    name_span: Span = _where()  # the task of `tower TASK`, or the `tower` keyword of `tower per task`


class Transfer(_Node):
    source: str
    target: str
    calibration: float | None = None  # weight of the order-calibration loss max(p_target - p_source, 0)
    keyword_span: Span = _where()
    source_span: Span = _where()
    target_span: Span = _where()


class Output(_Node):
    name: str
    factors: tuple[str, ...]  # outputs multiplied together; () for a task's own output
    kind: TaskKind
    label: tuple[str, ...] | None
    where: tuple[str, ...] | None = None
    name_span: Span = _where()
    factor_spans: tuple[Span, ...] = _where(())  # one per factor


class Loss(_Node):
    output: str
    label: tuple[str, ...]
    weight: float = 1.0
    where: tuple[str, ...] | None = None


class Train(_Node):
    optimizer: str = "adam"  # a vocab.Optimizer value
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 1024
    epochs: int = 1
    weighting: str = "fixed"  # a vocab.Weighting value
    monitor: str = "mean.auc"
    patience: int = 2
    seed: int = 0
    monitor_span: Span | None = _where(None)  # the last `monitor` value written; None: the default


class Declaration(_Node):
    """A block declaration as written (`gate g per task` is one, with an instance per task), at its span."""

    name: str
    kind: BlockKind


class Model(_Node):
    name: str
    doc: str
    path: str
    data: str
    levels: int
    sparse_fields: tuple[str, ...]  # columns of batch["sparse"], in schema order
    dense_fields: tuple[str, ...]  # columns of batch["dense"]
    list_fields: tuple[str, ...] = ()  # list fields the tables read, in schema order (Note [List fields])
    weighted_fields: tuple[str, ...] = ()  # those of list_fields with a weights column
    data_lists: tuple[str, ...] | None = None  # every list field of the dataset (for hints); None: no schema
    tasks: tuple[Task, ...]
    embeddings: tuple[EmbeddingTable, ...]
    experts: tuple[ExpertGroup, ...]
    gates: tuple[Gate, ...]
    towers: tuple[Tower, ...]
    transfers: tuple[Transfer, ...]
    outputs: tuple[Output, ...]
    losses: tuple[Loss, ...]
    train: Train
    declarations: tuple[Declaration, ...] = ()  # every block declaration, in spec order, repeats included
    name_span: Span | None = _where(None)  # None: the name comes from the file name
    model_spans: tuple[Span, ...] = _where(())  # the `model` keyword of each model declaration
    data_spans: tuple[Span, ...] = _where(())  # the source of each `data` declaration

    def task(self, name: str) -> Task | None:
        return next((t for t in self.tasks if t.name == name), None)

    def block(self, name: str) -> EmbeddingTable | ExpertGroup | Gate | Tower | None:
        """The block a reference to `name` means: when a name is declared twice, the first declaration in the
        text, whatever its kind (validate.py reports the second), so that every message agrees on what it is;
        an implied tower only when no declared block has the name."""
        found = [b for blocks in (self.embeddings, self.experts, self.gates) for b in blocks if b.name == name]
        if found:
            return min(found, key=lambda b: (b.span.line, b.span.column))
        return next((t for t in self.towers if t.name == name), None)
