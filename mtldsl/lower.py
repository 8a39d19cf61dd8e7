"""Lower syntax.Spec + schema to ir.Model: fill defaults, expand owners, unroll levels, resolve references.

Takes the syntax tree, the dataset's schema (pipeline.py resolves it; None skips the dataset checks)
and the spec's path; gives the Model and what lowering could not make sense of, as Diagnostics
without a source (pipeline.py attaches it). No disk I/O, and it never raises on a bad spec: what it
cannot resolve it reports and keeps in the model under the name as written, so validate.py can
still check the rest of the graph. Names keep where they are written (Note [Spans in the IR]).
Instance naming and per-task reference rules are in docs/language.md (Owners and instances).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, assert_never

from . import syntax as s
from .catalog import LISTS_GROUP, Schema, field_group
from .diagnostics import NOWHERE, Diagnostic, Span, did_you_mean, error
from .ir import (BlockKind, Combine, Declaration, EmbeddingTable, ExpertGroup, Gate, Input, Loss, Mlp, Model, NameRef,
                 Output, Route, Task, Tower, Train, Transfer)
from .size import LIMITS
from .vocab import Activation, Optimizer, Pooling, TaskKind, Weighting, names

DEFAULT_DATA = "synthetic"  # the dataset of a spec without a `data` line
_LIMITS_HINT = "sizes have limits, so that a typo fails `check`, not the allocation (docs/language.md, Limits)"

TRAIN_KEYS: dict[str, Callable[[Any], Any]] = {
    "optimizer": str, "lr": float, "weight_decay": float, "batch_size": int, "epochs": int,
    "weighting": str, "monitor": str, "patience": int, "seed": int,
}
_TRAIN_CHOICES = {"optimizer": names(Optimizer), "weighting": names(Weighting)}
_ACTIVATIONS = names(Activation)
_POOLINGS = names(Pooling)
_MLP_KEYS = ("mlp", "activation", "dropout", "batch_norm")

BlockDecl = s.EmbeddingDecl | s.ExpertsDecl | s.GateDecl
_KINDS = {s.EmbeddingDecl: BlockKind.embedding, s.ExpertsDecl: BlockKind.experts, s.GateDecl: BlockKind.gate}


def lower(spec: s.Spec, schema: Schema | None = None, path: str = "<spec>") -> tuple[Model, list[Diagnostic]]:
    """The IR of `spec`, and what lowering could not make sense of (never raises on a bad spec)."""
    low = Lowering(spec, schema, path)
    for item in spec.items:
        low.item(item)
    return low.model(), low.diags


def _keyword_span(decl_span: Span, word: str) -> Span:
    """The keyword a declaration starts with (`tower`, `transfer`, `model`): its span begins there."""
    return Span(decl_span.line, decl_span.column, decl_span.line, decl_span.column + len(word))


@dataclass(frozen=True)
class _Decl:
    """A declared block name: what it is, how it is owned, and whether it sits inside `levels`."""

    kind: BlockKind
    node: BlockDecl
    in_levels: bool

    @property
    def per_task(self) -> bool:
        return self.node.owner is not None and self.node.owner.kind is s.OwnerKind.per_task


class Lowering:
    """One spec's lowering: `item` takes each declaration in spec order, `model` assembles the result.

    Tasks are lowered first (any declaration may name a task declared after it), derived outputs and
    losses last (a loss may name an output declared after it); block names are known up front.
    """

    def __init__(self, spec: s.Spec, schema: Schema | None, path: str) -> None:
        self.spec = spec
        self.schema = schema
        self.path = path
        self.diags: list[Diagnostic] = []
        task_decls = [i for i in spec.items if isinstance(i, s.TaskDecl)]
        self.tasks = list(dict.fromkeys(t.name for t in task_decls))  # validate.py reports repeats
        self.levels_decl = next((i for i in spec.items if isinstance(i, s.LevelsDecl)), None)
        self.levels = min(self.levels_decl.count, LIMITS["levels"]) if self.levels_decl else 0  # Note [Size limits]
        top = [i for i in spec.items if isinstance(i, BlockDecl)]
        in_levels = list(self.levels_decl.blocks) if self.levels_decl else []
        self.decls: dict[str, _Decl] = {}  # the first declaration of each name, top level first (validate.py reports repeats)
        for block, inside in [*((b, False) for b in top), *((b, True) for b in in_levels)]:
            self.decls.setdefault(block.name, _Decl(_KINDS[type(block)], block, inside))
        every = [b for i in spec.items for b in (i.blocks if isinstance(i, s.LevelsDecl) else (i,))
                 if isinstance(b, BlockDecl)]
        self.declarations = [Declaration(name=b.name, kind=_KINDS[type(b)], span=b.span) for b in every]
        self.task_nodes = [self.task(t) for t in task_decls]
        self.embeddings: list[EmbeddingTable] = []
        self.experts: list[ExpertGroup] = []
        self.gates: list[Gate] = []
        self.towers: list[Tower] = []
        self.transfers: list[Transfer] = []
        self.derived: list[s.OutputDecl] = []
        self.loss_decls: list[s.LossDecl] = []
        self.train_values: dict[str, Any] = {}
        self.monitor_span: Span | None = None

    def err(self, message: str, span: Span, hint: str | None = None) -> None:
        d = error(message, span, hint)
        if d not in self.diags:  # a per-task declaration repeats its mistake once per instance
            self.diags.append(d)

    # ---- declarations, one method each -------------------------------------------------------

    def item(self, item: s.Item) -> None:
        match item:
            case s.ModelDecl() | s.DataDecl():
                pass  # read by model()
            case s.TaskDecl():
                pass  # lowered first, in __init__: every other declaration may name a task
            case s.OutputDecl():
                self.derived.append(item)
            case s.LossDecl():
                self.loss_decls.append(item)
            case s.EmbeddingDecl():
                self.embedding(item)
            case s.ExpertsDecl():
                self.expert_group(item, 0)
            case s.GateDecl():
                self.gate(item, 0)
            case s.LevelsDecl():
                self.levels_block(item)
            case s.TowerDecl():
                self.tower(item)
            case s.TransferDecl():
                self.transfer(item)
            case s.TrainDecl():
                self.train(item)
            case _:
                assert_never(item)

    def task(self, t: s.TaskDecl) -> Task:
        label = self.label(t.label)
        if t.kind is TaskKind.regression and len(label) > 1:
            self.err(f"regression task '{t.name}' needs one label column, not a product", t.label.span)
        return Task(name=t.name, kind=t.kind, label=label, where=self.label(t.where) if t.where else None,
                    span=t.span, name_span=t.name_span)

    def embedding(self, e: s.EmbeddingDecl) -> None:
        props = self.props(e.props, ("dim", "fields", "dense", "copies", "pool"), f"embedding '{e.name}'")
        dim = self.bounded(props, "dim", 16, f"embedding '{e.name}'")
        copies = self.bounded(props, "copies", 1, f"embedding '{e.name}'")
        if dim <= 0:
            self.err(f"embedding '{e.name}': dim must be positive", props["dim"].span)
        if copies <= 0:
            self.err(f"embedding '{e.name}': copies must be positive", props["copies"].span)
        selected = self.fields(props["fields"].value, False) if "fields" in props else ()  # type: ignore[arg-type]
        dense = tuple(n for n, _ in self.fields(props["dense"].value, True)) if "dense" in props else ()  # type: ignore[arg-type]
        lists = set(self.schema.lists) if self.schema else set()
        weights = self.schema.list_weights if self.schema else {}
        fields = tuple(n for n, _ in selected if n not in lists)
        listed = tuple((n, span) for n, span in selected if n in lists)
        pool = self.pool(props.get("pool"), e.name)
        if "fields" in props and getattr(props["fields"].value, "group", None) == LISTS_GROUP and not listed:
            pool = None  # `fields lists` without list fields is reported by fields(): one mistake, one error
        if "fields" not in props and "dense" not in props:
            self.err(f"embedding '{e.name}' reads no fields", e.span, "add `fields all` or a list")
        selections = [p.value for p in e.props if p.key in ("fields", "dense")]
        nothing = bool(selections) and all(
            isinstance(f, s.FieldSel) and (f.group == "none" or (f.group is None and not f.fields)) for f in selections)
        for owner in self.owners(e.owner):
            self.embeddings.append(EmbeddingTable(
                **self.block_names(e, owner, 0), fields=fields, dense=dense, dim=max(dim, 1), copies=max(copies, 1),
                selects_nothing=nothing, lists=tuple(n for n, _ in listed),
                weighted=tuple(n for n, _ in listed if n in weights), pool=pool,
                pool_span=props["pool"].span if "pool" in props else NOWHERE,
                list_spans=tuple(span for _, span in listed), span=e.span))

    def pool(self, prop: s.Prop | None, table: str) -> Pooling | None:
        """The `pool` mode; an unknown one is reported here and read as sum (so validate.py says nothing more)."""
        if prop is None:
            return None
        if prop.value in _POOLINGS:
            return Pooling(prop.value)
        self.err(f"embedding '{table}': unknown pool mode '{prop.value}'", prop.span,
                 did_you_mean(str(prop.value), _POOLINGS) or "one of " + ", ".join(_POOLINGS))
        return Pooling.sum

    def expert_group(self, e: s.ExpertsDecl, level: int) -> None:
        what = f"experts '{e.name}'"
        props = self.props(e.props, ("count", "input", *_MLP_KEYS), what)
        count = self.bounded(props, "count", 1, what)
        if count <= 0:
            self.err(f"{what}: count must be positive", props["count"].span)
        if "mlp" not in props:
            self.err(f"{what} has no `mlp [...]` layers", e.span, "experts need at least one layer, e.g. `mlp [64]`")
        elif not props["mlp"].value:
            self.err(f"{what} has an empty `mlp []`", props["mlp"].span, "experts need at least one layer, e.g. `mlp [64]`")
        mlp = self.mlp(props, what)
        for owner in self.owners(e.owner):
            inp = self.block_input(props, owner, level, e.span, what, "add `input <embedding>`")
            self.experts.append(ExpertGroup(**self.block_names(e, owner, level), count=max(count, 1), input=inp,
                                            mlp=mlp, level=level, span=e.span))

    def gate(self, g: s.GateDecl, level: int) -> None:
        what = f"gate '{g.name}'"
        props = self.props(g.props, ("input", *_MLP_KEYS), what)
        mlp = self.mlp(props, what)
        for owner in self.owners(g.owner):
            inp = self.block_input(props, owner, level, g.span, what,
                                   "add `input <embedding>` (what the gate's softmax reads)")
            routes = [route for r in g.routes for route in self.route(r, owner, level)]
            if owner is None and self.levels > 1 and level == self.levels:
                continue  # final-level shared gate: no consumer, not built (docs/language.md, Levels)
            self.gates.append(Gate(**self.block_names(g, owner, level), input=inp, routes=tuple(routes), mlp=mlp,
                                   level=level, written_routes=len(g.routes), span=g.span))

    def levels_block(self, lv: s.LevelsDecl) -> None:
        if lv is not self.levels_decl:
            self.err("only one `levels` block is allowed", lv.span)
            return
        if self.levels < 1:
            self.err("`levels` needs a count of at least 1", lv.span)
        if lv.count > LIMITS["levels"]:
            self.err(f"levels {lv.count} is above the limit of {LIMITS['levels']}", lv.span, _LIMITS_HINT)
        for level in range(1, max(self.levels, 1) + 1):
            for b in lv.blocks:
                if isinstance(b, s.ExpertsDecl):
                    self.expert_group(b, level)
                else:
                    self.gate(b, level)

    def tower(self, t: s.TowerDecl) -> None:
        props = self.props(t.props, ("input", *_MLP_KEYS), "tower")
        mlp = self.mlp(props, "tower")
        tower_tasks = {tw.task for tw in self.towers}
        for task in ([t.task.name] if t.task else list(self.tasks)):
            if task in tower_tasks:
                self.err(f"task '{task}' has two towers", t.span, "keep one tower per task")
                continue
            tower_tasks.add(task)
            if "input" in props:
                inp = self.input(props["input"].value, task, 0)  # type: ignore[arg-type]
            else:
                self.err("tower has no input", t.span, "add `input <gate or embedding>`")
                inp = Input(op=Combine.sum, refs=(), span=t.span)
            self.towers.append(Tower(
                name=f"tower_{task}", task=task, input=inp, mlp=mlp, per_task=t.task is None,
                name_span=t.task.span if t.task else _keyword_span(t.span, "tower"),
                span=t.task.span if t.task else t.span))

    def transfer(self, tr: s.TransferDecl) -> None:
        props = self.props(tr.props, ("calibration",), "transfer")
        cal = float(props["calibration"].value) if "calibration" in props else None  # type: ignore[arg-type]
        if cal is not None and cal < 0:
            self.err("calibration weight must not be negative", props["calibration"].span)
        self.transfers.append(Transfer(
            source=tr.source.name, target=tr.target.name, calibration=cal, span=tr.span,
            keyword_span=_keyword_span(tr.span, "transfer"), source_span=tr.source.span, target_span=tr.target.span))

    def train(self, decl: s.TrainDecl) -> None:
        values = self.train_values
        for p in decl.props:
            if p.key == "monitor":
                self.monitor_span = p.value_span  # validate.py checks the monitor that is kept, here
            if p.key not in TRAIN_KEYS:
                self.err(f"unknown training setting '{p.key}'", p.span,
                         did_you_mean(p.key, TRAIN_KEYS) or "settings: " + ", ".join(TRAIN_KEYS))
                continue
            if p.key in values:
                self.err(f"training setting '{p.key}' is set twice", p.span, "keep one")
            conv = TRAIN_KEYS[p.key]
            ok = (isinstance(p.value, (int, float)) and not isinstance(p.value, bool)) if conv in (int, float) \
                else isinstance(p.value, str)
            if conv is int and isinstance(p.value, float):
                ok = False
            if not ok:
                expects = "an integer" if conv is int else "a number" if conv is float else "a name"
                self.err(f"training setting '{p.key}' expects {expects}, got {p.value!r}", p.span)
                continue
            values[p.key] = conv(p.value)
            choices = _TRAIN_CHOICES.get(p.key)
            if choices and values[p.key] not in choices:
                self.err(f"unknown {p.key} '{p.value}'", p.span,
                         did_you_mean(str(p.value), choices) or "one of " + ", ".join(choices))
                del values[p.key]
            if p.key in ("lr", "batch_size", "epochs") and p.key in values and values[p.key] <= 0:
                self.err(f"training setting '{p.key}' must be positive", p.span)
                del values[p.key]

    # ---- the model --------------------------------------------------------------------------

    def outputs(self) -> list[Output]:
        """Each task's own output, then the derived ones in spec order."""
        outputs = [Output(name=t.name, factors=(), kind=t.kind, label=t.label, where=t.where, span=t.span,
                          name_span=t.name_span) for t in self.task_nodes]
        kinds = {t.name: t.kind for t in self.task_nodes}
        for o in self.derived:
            binary = all(kinds.get(f.name, TaskKind.binary) is TaskKind.binary for f in o.factors)
            kind = TaskKind.binary if binary else TaskKind.regression
            outputs.append(Output(name=o.name, factors=tuple(f.name for f in o.factors), kind=kind,
                                  label=self.label(o.label) if o.label else None,
                                  where=self.label(o.where) if o.where else None, span=o.span,
                                  name_span=o.name_span, factor_spans=tuple(f.span for f in o.factors)))
            kinds[o.name] = kind
        return outputs

    def losses(self, outputs: Sequence[Output]) -> list[Loss]:
        by_output = {o.name: o for o in outputs}
        losses = []
        for lo in self.loss_decls:
            out = by_output.get(lo.output.name)
            label = self.label(lo.label) if lo.label else (out.label if out else None)
            if out is not None and label is None:
                self.err(f"loss on '{lo.output.name}' has no label", lo.span,
                         f"add `label <column>` to the loss or to `output {lo.output.name}`")
            losses.append(Loss(output=lo.output.name, label=label or (),
                               weight=lo.weight if lo.weight is not None else 1.0,
                               where=self.label(lo.where) if lo.where else None, span=lo.output.span))
        return losses

    def model(self) -> Model:
        items = self.spec.items
        model_decls = [i for i in items if isinstance(i, s.ModelDecl)]
        data_decls = [i for i in items if isinstance(i, s.DataDecl)]
        stem = self.path.replace("\\", "/").rsplit("/", 1)[-1].removesuffix(".mtl")
        name = model_decls[0].name if model_decls else stem
        outputs = self.outputs()
        losses = self.losses(outputs)
        sparse_used = {f for e in self.embeddings for f in e.fields}
        dense_used = {f for e in self.embeddings for f in e.dense}
        lists_used = {f for e in self.embeddings for f in e.lists}
        schema_lists = self.schema.lists if self.schema else ()
        sparse_order = self.schema.sparse if self.schema else tuple(sorted(sparse_used))
        dense_order = self.schema.dense if self.schema else tuple(sorted(dense_used))
        return Model(
            name=name,
            doc=(model_decls[0].doc if model_decls and model_decls[0].doc else name),
            path=self.path,
            data=data_decls[0].source if data_decls else DEFAULT_DATA,
            levels=self.levels,
            sparse_fields=tuple(f for f in sparse_order if f in sparse_used),
            dense_fields=tuple(f for f in dense_order if f in dense_used),
            list_fields=tuple(f for f in schema_lists if f in lists_used),
            weighted_fields=tuple(f for f in schema_lists if f in lists_used and f in self.schema.list_weights),  # type: ignore[union-attr]
            data_lists=schema_lists if self.schema else None,
            tasks=tuple(self.task_nodes),
            embeddings=tuple(self.embeddings),
            experts=tuple(self.experts),
            gates=tuple(self.gates),
            towers=tuple(self.towers),
            transfers=tuple(self.transfers),
            outputs=tuple(outputs),
            losses=tuple(losses),
            train=Train(**self.train_values, monitor_span=self.monitor_span),
            declarations=tuple(self.declarations),
            name_span=model_decls[0].name_span if model_decls else None,
            model_spans=tuple(_keyword_span(m.span, "model") for m in model_decls),
            data_spans=tuple(d.span for d in data_decls),
            span=self.spec.span,
        )

    # ---- owners, instance names, references ---------------------------------------------------

    def owners(self, owner: s.Owner | None) -> list[str | None]:
        if owner is None or owner.kind is s.OwnerKind.shared:
            return [None]
        if owner.kind is s.OwnerKind.per_task:
            return list(self.tasks)
        assert owner.task is not None
        return [owner.task.name]  # an unknown task is reported by validate.py

    def instance(self, name: str, decl: _Decl, task: str | None, level: int) -> str:
        base = f"{name}_{task}" if decl.per_task else name
        return f"{base}_l{level}" if decl.in_levels and self.levels > 1 else base

    def block_names(self, node: BlockDecl, owner: str | None, level: int) -> dict[str, Any]:
        """The naming fields of one instance of a block declaration (ir._Block)."""
        task_ref = node.owner.task if node.owner is not None else None
        return dict(name=self.instance(node.name, self.decls[node.name], owner, level), decl_name=node.name,
                    owner=owner, per_task=node.owner is not None and node.owner.kind is s.OwnerKind.per_task,
                    name_span=node.name_span,
                    owner_span=task_ref.span if task_ref is not None else node.name_span)

    def resolve(self, ref: s.NameRef, consumer: str | None, level: int) -> str:
        """The instance a block owned by `consumer` at `level` means by `ref` (docs/language.md)."""
        decl = self.decls.get(ref.name)
        if decl is None:
            return ref.name  # unknown: validate.py reports it with a hint
        if decl.per_task and consumer is None:
            self.err(
                f"shared block reads per-task {decl.kind.value} '{ref.name}': which task's?",
                ref.span,
                f"read one instance by its name ('{ref.name}_{self.tasks[0]}'), or make the reader `per task`"
                if self.tasks else None,
            )
            return ref.name
        target_level = (level or self.levels) if decl.in_levels else 0
        return self.instance(ref.name, decl, consumer, target_level)

    def input(self, expr: s.InputExpr, consumer: str | None, level: int) -> Input:
        refs = tuple(self.resolve(r, consumer, level) for r in expr.refs)
        op = Combine.concat if expr.op is s.InputOp.concat else Combine.sum
        written = tuple(NameRef(name=r.name, span=r.span) for r in expr.refs)
        return Input(op=op, refs=refs, written=written, span=expr.span)

    def block_input(self, props: dict[str, s.Prop], owner: str | None, level: int, span: Span, what: str,
                    hint: str) -> Input:
        """Level k > 1 is wired by owner; level 1 and blocks outside `levels` read their written input."""
        if level > 1:
            return self.level_input(owner, level, span)
        if "input" in props:
            return self.input(props["input"].value, owner, level)  # type: ignore[arg-type]
        self.err(f"{what} has no input", span, hint)
        return Input(op=Combine.sum, refs=(), span=span)

    def level_input(self, block_owner: str | None, level: int, span: Span) -> Input:
        """Level k > 1 reads the level-(k-1) gate with the same owner (docs/language.md, Levels)."""
        assert self.levels_decl is not None
        found = [self.instance(g.name, self.decls[g.name], owner, level - 1)
                 for g in self.levels_decl.blocks if isinstance(g, s.GateDecl)
                 for owner in self.owners(g.owner) if owner == block_owner]
        if len(found) != 1:
            who = f"task '{block_owner}'" if block_owner else "shared blocks"
            problem = "no" if not found else "more than one"
            self.err(
                f"level {level} has no input for {who}: level {level - 1} has {problem} gate owned by "
                + (f"'{block_owner}'" if block_owner else "shared"),
                span,
                "add a `shared` gate to the levels block" if block_owner is None and not found else None,
            )
        return Input(op=Combine.sum, refs=tuple(found[:1]), span=span)

    def route(self, r: s.RouteDecl, owner: str | None, level: int) -> list[Route]:
        flags = r.flags
        if len(set(flags)) != len(flags):
            self.err("a route flag is repeated", r.span, "write `forward` or `forward backward`")
        if flags and "forward" not in flags:
            self.err("`backward` without `forward` has no effect: the gate does not mix this group", r.span,
                     "write `forward backward`, or drop the route")
        backward = not flags or "backward" in flags
        decl = self.decls.get(r.group.name)
        if decl is None or decl.kind is not BlockKind.experts:
            return [Route(group=r.group.name, backward=backward, span=r.group.span)]
        target_level = (level or self.levels) if decl.in_levels else 0
        if not decl.per_task:
            if r.selector is not s.Selector.all:
                self.err(f"'{r.group.name}' is not a per-task group: it has no [{r.selector.value}] instances",
                         r.span, f"write `mix {r.group.name}`")
            return [Route(group=self.instance(r.group.name, decl, None, target_level), backward=backward, span=r.span)]
        match r.selector:
            case s.Selector.all:
                chosen = list(self.tasks)
            case s.Selector.task:
                assert r.task is not None
                if r.task.name not in self.tasks:
                    self.err(f"unknown task '{r.task.name}'", r.task.span, did_you_mean(r.task.name, self.tasks))
                    return []
                chosen = [r.task.name]
            case s.Selector.own | s.Selector.other if owner is None:
                self.err(f"a shared gate has no own task: [{r.selector.value}] needs a task-owned gate", r.span,
                         f"write `mix {r.group.name}` for every task's instance")
                return []
            case s.Selector.own:
                chosen = [owner]
            case s.Selector.other:
                chosen = [t for t in self.tasks if t != owner]
            case _:
                assert_never(r.selector)
        return [Route(group=self.instance(r.group.name, decl, t, target_level), backward=backward, span=r.span)
                for t in chosen]

    # ---- properties, labels, fields -------------------------------------------------------------

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

    def bounded(self, props: dict[str, s.Prop], key: str, default: int, what: str) -> int:
        """An integer size (`count`, `dim`, `copies`); one above its limit is reported (Note [Size limits])."""
        if key not in props:
            return default
        value = int(props[key].value)  # type: ignore[arg-type]
        if value > LIMITS[key]:  # kept as written: nothing before codegen (which never sees it) loops over it
            self.err(f"{what}: {key} {value} is above the limit of {LIMITS[key]}", props[key].span, _LIMITS_HINT)
        return value

    def mlp(self, props: dict[str, s.Prop], what: str) -> Mlp:
        dims = props["mlp"].value if "mlp" in props else ()
        activation = props["activation"].value if "activation" in props else Activation.relu.value
        if activation not in _ACTIVATIONS:
            self.err(
                f"{what}: unknown activation '{activation}'",
                props["activation"].span,
                did_you_mean(str(activation), _ACTIVATIONS) or "one of " + ", ".join(_ACTIVATIONS),
            )
            activation = Activation.relu.value
        dropout = float(props["dropout"].value) if "dropout" in props else 0.0  # type: ignore[arg-type]
        if not 0.0 <= dropout < 1.0:
            self.err(f"{what}: dropout {dropout!r} is outside [0, 1)", props["dropout"].span)
            dropout = 0.0
        for d in dims:  # type: ignore[union-attr]
            if d <= 0:
                self.err(f"{what}: layer width {d} must be positive", props["mlp"].span)
            elif d > LIMITS["width"]:
                self.err(f"{what}: layer width {d} is above the limit of {LIMITS['width']}", props["mlp"].span,
                         _LIMITS_HINT)
        return Mlp(dims=tuple(dims), activation=activation, dropout=dropout,  # type: ignore[arg-type]
                   batch_norm=bool(props["batch_norm"].value) if "batch_norm" in props else False,
                   span=props["mlp"].span if "mlp" in props else NOWHERE)

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

    def fields(self, sel: s.FieldSel, dense: bool) -> tuple[tuple[str, Span], ...]:
        """The selected fields, each with where it is selected (its name, or the group). `fields` may select
        single-valued and list fields alike (embedding() tells them apart), `dense` numeric ones."""
        if self.schema is None:
            return tuple((c.name, c.span) for c in sel.fields)
        pool = self.schema.dense if dense else (*self.schema.sparse, *self.schema.lists)
        if sel.group == LISTS_GROUP and not self.schema.lists and LISTS_GROUP not in self.schema.groups:
            self.err(f"dataset '{self.schema.name}' has no list fields", sel.span,
                     "`fields lists` selects the fields that hold a list of ids per row")
            return ()
        if sel.group is not None:
            group = "dense" if dense and sel.group == "all" else sel.group
            try:
                found = field_group(self.schema, group)
            except KeyError:
                special = ("all", "none", "dense", "lists") if self.schema.lists else ("all", "none", "dense")
                groups = sorted({*self.schema.groups, *special})
                self.err(
                    f"unknown field group '{sel.group}' in dataset '{self.schema.name}'",
                    sel.span,
                    did_you_mean(sel.group, groups) or "groups: " + ", ".join(groups),
                )
                return ()
            return tuple((n, sel.span) for n in found if n in pool) if sel.group != "none" else ()
        out: list[tuple[str, Span]] = []
        for c in sel.fields:
            if c.name not in pool:
                kind = "dense" if dense else "sparse"
                self.err(
                    f"dataset '{self.schema.name}' has no {kind} field '{c.name}'",
                    c.span,
                    did_you_mean(c.name, pool) or ("use `dense [...]` for numeric fields" if c.name in self.schema.dense
                                                     else None),
                )
            elif any(c.name == n for n, _ in out):
                self.err(f"field '{c.name}' is listed twice", c.span)
            else:
                out.append((c.name, c.span))
        return tuple(out)
