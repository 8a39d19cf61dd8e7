"""The AST: frozen dataclasses, one per grammar rule, each with a span.

Nodes mirror the text and resolve nothing. Spans are `compare=False`, so two trees parsed from
differently formatted texts compare equal (the printer round-trip relies on it). A declaration's
`span` starts at its keyword (a DataDecl's is its source); `name_span` is where its name is written,
and a reference to a declared name is a NameRef with its own span.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .diagnostics import NOWHERE, Span
from .vocab import TaskKind


def _span() -> Span:
    return field(default=NOWHERE, compare=False, repr=False)


class OwnerKind(enum.Enum):
    shared = "shared"
    per_task = "per task"
    task = "for"


class Selector(enum.Enum):
    all = "all"
    own = "own"
    other = "other"
    task = "task"


class InputOp(enum.Enum):
    ref = "ref"
    sum = "sum"
    concat = "concat"


@dataclass(frozen=True, slots=True)
class NameRef:
    name: str
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Column:
    """A dataset column in a label expression or field list; `quoted` keeps the spelling."""

    name: str
    quoted: bool = False
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class LabelExpr:
    columns: tuple[Column, ...]  # product of 0/1 columns
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class ModelDecl:
    name: str
    doc: str | None = None
    span: Span = _span()
    name_span: Span = _span()


@dataclass(frozen=True, slots=True)
class DataDecl:
    source: str
    is_path: bool = False
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class TaskDecl:
    name: str
    kind: TaskKind  # the grammar admits only these words
    label: LabelExpr
    where: LabelExpr | None = None
    span: Span = _span()
    name_span: Span = _span()


@dataclass(frozen=True, slots=True)
class OutputDecl:
    name: str
    factors: tuple[NameRef, ...]
    label: LabelExpr | None = None
    where: LabelExpr | None = None
    span: Span = _span()
    name_span: Span = _span()


@dataclass(frozen=True, slots=True)
class LossDecl:
    output: NameRef
    weight: float | None = None
    label: LabelExpr | None = None
    where: LabelExpr | None = None
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Owner:
    kind: OwnerKind
    task: NameRef | None = None
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class FieldSel:
    group: str | None = None  # a named group (all, user, item, dense, none)
    fields: tuple[Column, ...] = ()  # or an explicit list
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class Prop:
    """One `key value` property of a block; `value` is already typed (int, float, bool, str, tuples)."""

    key: str
    value: object
    span: Span = _span()
    value_span: Span = _span()  # the value alone (train settings; NOWHERE in blocks)


@dataclass(frozen=True, slots=True)
class InputExpr:
    op: InputOp
    refs: tuple[NameRef, ...]
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class RouteDecl:
    group: NameRef
    selector: Selector = Selector.all
    task: NameRef | None = None  # for Selector.task
    flags: tuple[str, ...] = ()  # "forward" / "backward" as written
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class EmbeddingDecl:
    name: str
    owner: Owner | None
    props: tuple[Prop, ...]  # dim, fields (FieldSel), dense (FieldSel), copies, pool (a name)
    span: Span = _span()
    name_span: Span = _span()


@dataclass(frozen=True, slots=True)
class ExpertsDecl:
    name: str
    owner: Owner | None
    props: tuple[Prop, ...]  # count, input (InputExpr), mlp, activation, dropout, batch_norm
    span: Span = _span()
    name_span: Span = _span()


@dataclass(frozen=True, slots=True)
class GateDecl:
    name: str
    owner: Owner | None
    props: tuple[Prop, ...]  # input, mlp, activation, dropout, batch_norm
    routes: tuple[RouteDecl, ...]
    span: Span = _span()
    name_span: Span = _span()


@dataclass(frozen=True, slots=True)
class TowerDecl:
    task: NameRef | None  # None: `tower per task`
    props: tuple[Prop, ...]
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class TransferDecl:
    source: NameRef
    target: NameRef
    props: tuple[Prop, ...]  # calibration
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class LevelsDecl:
    count: int
    blocks: tuple[ExpertsDecl | GateDecl, ...]
    span: Span = _span()


@dataclass(frozen=True, slots=True)
class TrainDecl:
    props: tuple[Prop, ...]
    span: Span = _span()


Item = (
    ModelDecl | DataDecl | TaskDecl | OutputDecl | EmbeddingDecl | ExpertsDecl | GateDecl
    | TowerDecl | TransferDecl | LossDecl | TrainDecl | LevelsDecl
)


@dataclass(frozen=True, slots=True)
class Spec:
    items: tuple[Item, ...]
    span: Span = _span()
