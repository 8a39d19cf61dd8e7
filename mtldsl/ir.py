"""Lower syntax.Spec to ir.Model: fill defaults, expand owners, unroll levels, resolve references.

`lower` never raises on a bad spec. What it cannot resolve it reports as Diagnostics and keeps
in the model under the name as written, so validate.py can still check the rest of the graph.
Instance naming and per-task reference rules are in docs/language.md (Owners and instances).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from . import syntax as s
from .catalog import Schema, field_group, schema_for
from .diagnostics import NOWHERE, Diagnostic, SourceFile, Span, did_you_mean, error

ACTIVATIONS = ("relu", "leaky_relu", "sigmoid", "tanh", "gelu", "prelu", "none")
OPTIMIZERS = ("adam", "adamw", "sgd", "adagrad")
WEIGHTINGS = ("fixed", "uwl", "gradnorm", "metabalance", "pcgrad")
METRICS = ("auc", "gauc", "logloss", "mse", "mae")


class TaskKind(enum.Enum):
    binary = "binary"
    regression = "regression"


class Combine(enum.Enum):
    sum = "sum"  # also a single reference
    concat = "concat"


class _Node(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    span: Span = Field(default=NOWHERE, repr=False, exclude=True)


class Task(_Node):
    name: str
    kind: TaskKind
    label: tuple[str, ...]  # product of these 0/1 columns (one column for regression)
    where: tuple[str, ...] | None = None  # evaluation domain, reported in addition to all rows


class Input(_Node):
    op: Combine
    refs: tuple[str, ...]  # block instance names


class Mlp(_Node):
    dims: tuple[int, ...] = ()
    activation: str = "relu"
    dropout: float = 0.0
    batch_norm: bool = False


class EmbeddingTable(_Node):
    name: str
    owner: str | None  # a task, or None for shared
    fields: tuple[str, ...]
    dense: tuple[str, ...] = ()
    dim: int = 16
    copies: int = 1

    @property
    def width(self) -> int:
        return len(self.fields) * self.dim + len(self.dense)


class ExpertGroup(_Node):
    name: str
    owner: str | None
    count: int = 1
    input: Input
    mlp: Mlp
    level: int = 0  # 1-based inside `levels`, 0 outside


class Route(_Node):
    group: str
    forward: bool = True  # the gate mixes this group's outputs
    backward: bool = True  # False: the gated input is .detach()ed (Note [Gate visibility])


class Gate(_Node):
    name: str
    owner: str | None
    input: Input
    routes: tuple[Route, ...]
    mlp: Mlp
    level: int = 0


class Tower(_Node):
    name: str
    task: str
    input: Input
    mlp: Mlp


class Transfer(_Node):
    source: str
    target: str
    calibration: float | None = None  # weight of the order-calibration loss max(p_target - p_source, 0)


class Output(_Node):
    name: str
    factors: tuple[str, ...]  # outputs multiplied together; () for a task's own output
    kind: TaskKind
    label: tuple[str, ...] | None
    where: tuple[str, ...] | None = None


class Loss(_Node):
    output: str
    label: tuple[str, ...]
    weight: float = 1.0
    where: tuple[str, ...] | None = None


class Train(_Node):
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 1024
    epochs: int = 1
    weighting: str = "fixed"
    monitor: str = "mean.auc"
    patience: int = 2
    seed: int = 0


class Model(_Node):
    name: str
    doc: str
    path: str
    data: str
    levels: int
    sparse_fields: tuple[str, ...]  # columns of batch["sparse"], in schema order
    dense_fields: tuple[str, ...]  # columns of batch["dense"]
    tasks: tuple[Task, ...]
    embeddings: tuple[EmbeddingTable, ...]
    experts: tuple[ExpertGroup, ...]
    gates: tuple[Gate, ...]
    towers: tuple[Tower, ...]
    transfers: tuple[Transfer, ...]
    outputs: tuple[Output, ...]
    losses: tuple[Loss, ...]
    train: Train

    def task(self, name: str) -> Task | None:
        return next((t for t in self.tasks if t.name == name), None)

    def block(self, name: str) -> EmbeddingTable | ExpertGroup | Gate | Tower | None:
        for blocks in (self.embeddings, self.experts, self.gates, self.towers):
            for b in blocks:
                if b.name == name:
                    return b
        return None


# --------------------------------------------------------------------------------------------
# Lowering


@dataclass
class _Decl:
    """A declared block name: what it is, who owns it, and whether it sits inside `levels`."""

    kind: str  # "embedding" | "experts" | "gate"
    node: s.EmbeddingDecl | s.ExpertsDecl | s.GateDecl
    owner: s.Owner | None
    in_levels: bool


@dataclass
class _Lowering:
    src: SourceFile | None
    tasks: list[str]
    schema: Schema | None
    levels: int
    decls: dict[str, _Decl] = field(default_factory=dict)
    diags: list[Diagnostic] = field(default_factory=list)

    def err(self, message: str, span: Span, hint: str | None = None) -> None:
        d = error(message, span, hint, self.src)
        if d not in self.diags:  # a per-task declaration repeats its mistake once per instance
            self.diags.append(d)

    # ---- owners and instance names ------------------------------------------------------

    def owners(self, owner: s.Owner | None) -> list[str | None]:
        if owner is None or owner.kind is s.OwnerKind.shared:
            return [None]
        if owner.kind is s.OwnerKind.per_task:
            return list(self.tasks)
        assert owner.task is not None
        return [owner.task.name]  # an unknown task is reported by validate.py

    def instance(self, name: str, decl: _Decl, task: str | None, level: int) -> str:
        base = f"{name}_{task}" if decl.owner is not None and decl.owner.kind is s.OwnerKind.per_task else name
        return f"{base}_l{level}" if decl.in_levels and self.levels > 1 else base

    def resolve(self, ref: s.NameRef, consumer: str | None, level: int) -> str:
        """The instance a block owned by `consumer` at `level` means by `ref` (docs/language.md)."""
        decl = self.decls.get(ref.name)
        if decl is None:
            return ref.name  # unknown: validate.py reports it with a hint
        if decl.owner is not None and decl.owner.kind is s.OwnerKind.per_task and consumer is None:
            self.err(
                f"shared block reads per-task {decl.kind} '{ref.name}': which task's?",
                ref.span,
                f"read one instance by its name ('{ref.name}_{self.tasks[0]}'), or make the reader `per task`"
                if self.tasks else None,
            )
            return ref.name
        target_level = (level or self.levels) if decl.in_levels else 0
        return self.instance(ref.name, decl, consumer, target_level)

    # ---- properties -----------------------------------------------------------------------

    def props(self, props: Sequence[s.Prop], allowed: Iterable[str], what: str) -> dict[str, s.Prop]:
        allowed = tuple(allowed)
        seen: dict[str, s.Prop] = {}
        for p in props:
            if p.key in seen:
                self.err(f"{what} sets '{p.key}' twice", p.span, "keep one")
            elif p.key not in allowed:
                self.err(f"{what} has no property '{p.key}'", p.span, did_you_mean(p.key, allowed))
            seen[p.key] = p
        return seen

    def mlp(self, props: dict[str, s.Prop], what: str) -> Mlp:
        dims = props["mlp"].value if "mlp" in props else ()
        activation = props["activation"].value if "activation" in props else "relu"
        if activation not in ACTIVATIONS:
            self.err(
                f"{what}: unknown activation '{activation}'",
                props["activation"].span,
                did_you_mean(str(activation), ACTIVATIONS) or "one of " + ", ".join(ACTIVATIONS),
            )
            activation = "relu"
        dropout = float(props["dropout"].value) if "dropout" in props else 0.0
        if not 0.0 <= dropout < 1.0:
            self.err(f"{what}: dropout {dropout!r} is outside [0, 1)", props["dropout"].span)
            dropout = 0.0
        for d in dims:  # type: ignore[union-attr]
            if d <= 0:
                self.err(f"{what}: layer width {d} must be positive", props["mlp"].span)
        return Mlp(dims=tuple(dims), activation=activation, dropout=dropout,  # type: ignore[arg-type]
                   batch_norm=bool(props["batch_norm"].value) if "batch_norm" in props else False,
                   span=props["mlp"].span if "mlp" in props else NOWHERE)

    def input(self, expr: s.InputExpr, consumer: str | None, level: int) -> Input:
        refs = tuple(self.resolve(r, consumer, level) for r in expr.refs)
        op = Combine.concat if expr.op is s.InputOp.concat else Combine.sum
        return Input(op=op, refs=refs, span=expr.span)

    def level_input(self, block_owner: str | None, level: int, gates: Sequence[s.GateDecl], span: Span) -> Input:
        """Level k > 1 reads the level-(k-1) gate with the same owner (Note in docs/language.md, Levels)."""
        names = []
        for g in gates:
            for owner in self.owners(g.owner):
                if owner == block_owner:
                    names.append(self.instance(g.name, self.decls[g.name], owner, level - 1))
        if len(names) != 1:
            who = f"task '{block_owner}'" if block_owner else "shared blocks"
            problem = "no" if not names else "more than one"
            self.err(
                f"level {level} has no input for {who}: level {level - 1} has {problem} gate owned by "
                + (f"'{block_owner}'" if block_owner else "shared"),
                span,
                "add a `shared` gate to the levels block" if block_owner is None and not names else None,
            )
            return Input(op=Combine.sum, refs=tuple(names[:1]), span=span)
        return Input(op=Combine.sum, refs=(names[0],), span=span)

    def label(self, expr: s.LabelExpr) -> tuple[str, ...]:
        if self.schema is not None:
            known = set(self.schema.labels)
            for c in expr.columns:
                if c.name not in known:
                    self.err(
                        f"unknown label column '{c.name}' in dataset '{self.schema.name}'",
                        c.span,
                        did_you_mean(c.name, known) or "labels: " + ", ".join(self.schema.labels),
                    )
        return tuple(c.name for c in expr.columns)

    def fields(self, sel: s.FieldSel, dense: bool) -> tuple[str, ...]:
        if self.schema is None:
            return tuple(c.name for c in sel.fields)
        pool = self.schema.dense if dense else self.schema.sparse
        if sel.group is not None:
            group = "dense" if dense and sel.group == "all" else sel.group
            try:
                names = field_group(self.schema, group)
            except KeyError:
                groups = sorted({*self.schema.groups, "all", "none", "dense"})
                self.err(
                    f"unknown field group '{sel.group}' in dataset '{self.schema.name}'",
                    sel.span,
                    did_you_mean(sel.group, groups) or "groups: " + ", ".join(groups),
                )
                return ()
            return tuple(n for n in names if n in pool) if sel.group != "none" else ()
        out = []
        for c in sel.fields:
            if c.name not in pool:
                kind = "dense" if dense else "sparse"
                self.err(
                    f"dataset '{self.schema.name}' has no {kind} field '{c.name}'",
                    c.span,
                    did_you_mean(c.name, pool) or ("use `dense [...]` for numeric fields" if c.name in self.schema.dense
                                                     else None),
                )
            elif c.name in out:
                self.err(f"field '{c.name}' is listed twice", c.span)
            else:
                out.append(c.name)
        return tuple(out)


TRAIN_KEYS: dict[str, Callable[[Any], Any]] = {
    "optimizer": str, "lr": float, "weight_decay": float, "batch_size": int, "epochs": int,
    "weighting": str, "monitor": str, "patience": int, "seed": int,
}


def _train(decls: Sequence[s.TrainDecl], low: _Lowering) -> Train:
    values: dict[str, Any] = {}
    for decl in decls:
        for p in decl.props:
            if p.key not in TRAIN_KEYS:
                low.err(f"unknown training setting '{p.key}'", p.span,
                        did_you_mean(p.key, TRAIN_KEYS) or "settings: " + ", ".join(TRAIN_KEYS))
                continue
            if p.key in values:
                low.err(f"training setting '{p.key}' is set twice", p.span, "keep one")
            conv = TRAIN_KEYS[p.key]
            ok = (isinstance(p.value, (int, float)) and not isinstance(p.value, bool)) if conv in (int, float) \
                else isinstance(p.value, str)
            if conv is int and isinstance(p.value, float):
                ok = False
            if not ok:
                low.err(f"training setting '{p.key}' expects {'an integer' if conv is int else 'a number' if conv is float else 'a name'}, got {p.value!r}", p.span)
                continue
            values[p.key] = conv(p.value)
            choices = {"optimizer": OPTIMIZERS, "weighting": WEIGHTINGS}.get(p.key)
            if choices and values[p.key] not in choices:
                low.err(f"unknown {p.key} '{p.value}'", p.span, did_you_mean(str(p.value), choices) or "one of " + ", ".join(choices))
                del values[p.key]
            if p.key in ("lr", "batch_size", "epochs") and p.key in values and values[p.key] <= 0:
                low.err(f"training setting '{p.key}' must be positive", p.span)
                del values[p.key]
    return Train(**values)


def lower(spec: s.Spec, src: SourceFile | None = None, schema: Schema | None = None,
          data_dir: str | None = None) -> tuple[Model, list[Diagnostic]]:
    """The IR of `spec`, and what lowering could not make sense of (never raises on a bad spec)."""
    items = spec.items
    model_decl = next((i for i in items if isinstance(i, s.ModelDecl)), None)
    data_decl = next((i for i in items if isinstance(i, s.DataDecl)), None)
    path = src.path if src else "<spec>"
    stem = path.replace("\\", "/").rsplit("/", 1)[-1].removesuffix(".mtl")
    name = model_decl.name if model_decl else stem
    data = data_decl.source if data_decl else "synthetic"
    task_decls = [i for i in items if isinstance(i, s.TaskDecl)]
    levels_decls = [i for i in items if isinstance(i, s.LevelsDecl)]
    n_levels = levels_decls[0].count if levels_decls else 0

    low = _Lowering(src, list(dict.fromkeys(t.name for t in task_decls)), None, n_levels)  # validate.py reports repeats
    if schema is None:
        try:
            schema = schema_for(data, data_dir)
        except Exception as exc:  # unknown dataset or unreadable folder: say so at the `data` line
            low.err(f"cannot read the schema of dataset '{data}': {exc}", data_decl.span if data_decl else NOWHERE)
    low.schema = schema
    for extra in levels_decls[1:]:
        low.err("only one `levels` block is allowed", extra.span)
    if levels_decls and n_levels < 1:
        low.err("`levels` needs a count of at least 1", levels_decls[0].span)

    # Declared block names (validate.py reports duplicates; the first one wins here).
    top_blocks = [i for i in items if isinstance(i, (s.EmbeddingDecl, s.ExpertsDecl, s.GateDecl))]
    level_blocks = [b for lv in levels_decls[:1] for b in lv.blocks]
    for b in top_blocks + level_blocks:
        kind = {s.EmbeddingDecl: "embedding", s.ExpertsDecl: "experts", s.GateDecl: "gate"}[type(b)]
        low.decls.setdefault(b.name, _Decl(kind, b, b.owner, b in level_blocks))

    tasks = []
    for t in task_decls:
        try:
            kind = TaskKind(t.kind)
        except ValueError:
            kind = TaskKind.binary
        label = low.label(t.label)
        if kind is TaskKind.regression and len(label) > 1:
            low.err(f"regression task '{t.name}' needs one label column, not a product", t.label.span)
        tasks.append(Task(name=t.name, kind=kind, label=label,
                          where=low.label(t.where) if t.where else None, span=t.span))

    embeddings = []
    for e in (i for i in items if isinstance(i, s.EmbeddingDecl)):
        props = low.props(e.props, ("dim", "fields", "dense", "copies"), f"embedding '{e.name}'")
        dim = int(props["dim"].value) if "dim" in props else 16  # type: ignore[arg-type]
        copies = int(props["copies"].value) if "copies" in props else 1  # type: ignore[arg-type]
        if dim <= 0:
            low.err(f"embedding '{e.name}': dim must be positive", props["dim"].span)
        if copies <= 0:
            low.err(f"embedding '{e.name}': copies must be positive", props["copies"].span)
        fields = low.fields(props["fields"].value, False) if "fields" in props else ()  # type: ignore[arg-type]
        dense = low.fields(props["dense"].value, True) if "dense" in props else ()  # type: ignore[arg-type]
        if "fields" not in props and "dense" not in props:
            low.err(f"embedding '{e.name}' reads no fields", e.span, "add `fields all` or a list")
        for owner in low.owners(e.owner):
            embeddings.append(EmbeddingTable(
                name=low.instance(e.name, low.decls[e.name], owner, 0), owner=owner, fields=fields, dense=dense,
                dim=max(dim, 1), copies=max(copies, 1), span=e.span))

    experts: list[ExpertGroup] = []
    gates: list[Gate] = []

    def block_input(props: dict[str, s.Prop], owner: str | None, level: int, level_gates: Sequence[s.GateDecl],
                    span: Span, what: str, hint: str) -> Input:
        """Level k > 1 is wired by owner; level 1 and blocks outside `levels` read their written input."""
        if level > 1:
            return low.level_input(owner, level, level_gates, span)
        if "input" in props:
            return low.input(props["input"].value, owner, level)  # type: ignore[arg-type]
        low.err(f"{what} has no input", span, hint)
        return Input(op=Combine.sum, refs=(), span=span)

    def lower_experts(e: s.ExpertsDecl, level: int, level_gates: Sequence[s.GateDecl]) -> None:
        what = f"experts '{e.name}'"
        props = low.props(e.props, ("count", "input", "mlp", "activation", "dropout", "batch_norm"), what)
        count = int(props["count"].value) if "count" in props else 1  # type: ignore[arg-type]
        if count <= 0:
            low.err(f"{what}: count must be positive", props["count"].span)
        if "mlp" not in props:
            low.err(f"{what} has no `mlp [...]` layers", e.span, "experts need at least one layer, e.g. `mlp [64]`")
        mlp = low.mlp(props, what)
        for owner in low.owners(e.owner):
            inp = block_input(props, owner, level, level_gates, e.span, what, "add `input <embedding>`")
            experts.append(ExpertGroup(
                name=low.instance(e.name, low.decls[e.name], owner, level), owner=owner, count=max(count, 1),
                input=inp, mlp=mlp, level=level, span=e.span))

    def lower_gate(g: s.GateDecl, level: int, level_gates: Sequence[s.GateDecl]) -> None:
        what = f"gate '{g.name}'"
        props = low.props(g.props, ("input", "mlp", "activation", "dropout", "batch_norm"), what)
        mlp = low.mlp(props, what)
        for owner in low.owners(g.owner):
            inp = block_input(props, owner, level, level_gates, g.span, what,
                              "add `input <embedding>` (what the gate's softmax reads)")
            routes: list[Route] = []
            for r in g.routes:
                routes.extend(lower_route(r, owner, level))
            if level and level == low.levels and owner is None and low.levels > 1 and g in level_gates:
                continue  # final-level shared gate: no consumer, not built (docs/language.md, Levels)
            gates.append(Gate(name=low.instance(g.name, low.decls[g.name], owner, level), owner=owner, input=inp,
                              routes=tuple(routes), mlp=mlp, level=level, span=g.span))

    def lower_route(r: s.RouteDecl, owner: str | None, level: int) -> list[Route]:
        flags = r.flags
        if len(set(flags)) != len(flags):
            low.err("a route flag is repeated", r.span, "write `forward` or `forward backward`")
        if flags and "forward" not in flags:
            low.err("`backward` without `forward` has no effect: the gate does not mix this group", r.span,
                    "write `forward backward`, or drop the route")
        forward = True
        backward = not flags or "backward" in flags
        decl = low.decls.get(r.group.name)
        per_task = decl is not None and decl.owner is not None and decl.owner.kind is s.OwnerKind.per_task
        if decl is None or decl.kind != "experts":
            return [Route(group=r.group.name, forward=forward, backward=backward, span=r.group.span)]
        target_level = (level or low.levels) if decl.in_levels else 0
        if not per_task:
            if r.selector is not s.Selector.all:
                low.err(f"'{r.group.name}' is not a per-task group: it has no [{r.selector.value}] instances",
                        r.span, f"write `mix {r.group.name}`")
            return [Route(group=low.instance(r.group.name, decl, None, target_level), forward=forward,
                          backward=backward, span=r.span)]
        if r.selector is s.Selector.all:
            chosen = list(low.tasks)
        elif r.selector is s.Selector.task:
            assert r.task is not None
            if r.task.name not in low.tasks:
                low.err(f"unknown task '{r.task.name}'", r.task.span, did_you_mean(r.task.name, low.tasks))
                return []
            chosen = [r.task.name]
        elif owner is None:
            low.err(f"a shared gate has no own task: [{r.selector.value}] needs a task-owned gate", r.span,
                    f"write `mix {r.group.name}` for every task's instance")
            return []
        else:
            chosen = [owner] if r.selector is s.Selector.own else [t for t in low.tasks if t != owner]
        return [Route(group=low.instance(r.group.name, decl, t, target_level), forward=forward, backward=backward,
                      span=r.span) for t in chosen]

    for item in items:
        if isinstance(item, s.ExpertsDecl):
            lower_experts(item, 0, ())
        elif isinstance(item, s.GateDecl):
            lower_gate(item, 0, ())
        elif isinstance(item, s.LevelsDecl) and item is (levels_decls[0] if levels_decls else None):
            level_gates = [b for b in item.blocks if isinstance(b, s.GateDecl)]
            for level in range(1, max(item.count, 1) + 1):
                for b in item.blocks:
                    if isinstance(b, s.ExpertsDecl):
                        lower_experts(b, level, level_gates)
                    else:
                        lower_gate(b, level, level_gates)

    towers = []
    tower_tasks: set[str] = set()
    for t in (i for i in items if isinstance(i, s.TowerDecl)):
        props = low.props(t.props, ("input", "mlp", "activation", "dropout", "batch_norm"), "tower")
        mlp = low.mlp(props, "tower")
        for task in ([t.task.name] if t.task else list(low.tasks)):
            if task in tower_tasks:
                low.err(f"task '{task}' has two towers", t.span, "keep one tower per task")
                continue
            tower_tasks.add(task)
            if "input" in props:
                inp = low.input(props["input"].value, task, 0)  # type: ignore[arg-type]
            else:
                low.err("tower has no input", t.span, "add `input <gate or embedding>`")
                inp = Input(op=Combine.sum, refs=(), span=t.span)
            towers.append(Tower(name=f"tower_{task}", task=task, input=inp, mlp=mlp,
                                span=t.task.span if t.task else t.span))

    transfers = []
    for tr in (i for i in items if isinstance(i, s.TransferDecl)):
        props = low.props(tr.props, ("calibration",), "transfer")
        cal = float(props["calibration"].value) if "calibration" in props else None  # type: ignore[arg-type]
        if cal is not None and cal < 0:
            low.err("calibration weight must not be negative", props["calibration"].span)
        transfers.append(Transfer(source=tr.source.name, target=tr.target.name, calibration=cal, span=tr.span))

    outputs = [Output(name=t.name, factors=(), kind=t.kind, label=t.label, where=t.where, span=t.span) for t in tasks]
    kinds = {t.name: t.kind for t in tasks}
    for o in (i for i in items if isinstance(i, s.OutputDecl)):
        kind = TaskKind.binary if all(kinds.get(f.name, TaskKind.binary) is TaskKind.binary for f in o.factors) \
            else TaskKind.regression
        outputs.append(Output(name=o.name, factors=tuple(f.name for f in o.factors), kind=kind,
                              label=low.label(o.label) if o.label else None,
                              where=low.label(o.where) if o.where else None, span=o.span))
        kinds[o.name] = kind

    losses = []
    by_output = {o.name: o for o in outputs}
    for lo in (i for i in items if isinstance(i, s.LossDecl)):
        out = by_output.get(lo.output.name)
        label = low.label(lo.label) if lo.label else (out.label if out else None)
        if out is not None and label is None:
            low.err(f"loss on '{lo.output.name}' has no label", lo.span,
                    f"add `label <column>` to the loss or to `output {lo.output.name}`")
        where = low.label(lo.where) if lo.where else None
        losses.append(Loss(output=lo.output.name, label=label or (), weight=lo.weight if lo.weight is not None else 1.0,
                           where=where, span=lo.output.span))

    train = _train([i for i in items if isinstance(i, s.TrainDecl)], low)

    sparse_used = {f for e in embeddings for f in e.fields}
    dense_used = {f for e in embeddings for f in e.dense}
    sparse_order = schema.sparse if schema else tuple(sorted(sparse_used))
    dense_order = schema.dense if schema else tuple(sorted(dense_used))
    model = Model(
        name=name,
        doc=(model_decl.doc if model_decl and model_decl.doc else name),
        path=path,
        data=data,
        levels=n_levels,
        sparse_fields=tuple(f for f in sparse_order if f in sparse_used),
        dense_fields=tuple(f for f in dense_order if f in dense_used),
        tasks=tuple(tasks),
        embeddings=tuple(embeddings),
        experts=tuple(experts),
        gates=tuple(gates),
        towers=tuple(towers),
        transfers=tuple(transfers),
        outputs=tuple(outputs),
        losses=tuple(losses),
        train=train,
        span=spec.span,
    )
    return model, low.diags
