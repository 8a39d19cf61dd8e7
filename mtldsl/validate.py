"""Check an ir.Model and its graph: check_*(model, graph) -> list[Diagnostic]; never raises on a bad spec.

`validate` runs every check and returns what they found, warnings included, without repeats and in
source order. lower() has already reported what it could not make sense of in the syntax (block
properties, selectors, labels, fields, level wiring, a shared block reading a per-task one); the
checks here cover names, references, kinds, structure, widths and gradient flow, and stay quiet about
what lower() reported, so that one mistake gives one error.

Spans. IR nodes carry the span of the declaration they came from (a route, an input expression, a
loss's output name). For a sharper caret (the name in `gate g_ctr for ctr {`, one reference inside
`sum(a, b)`, one factor of an output) the checks ask a Locator, which re-reads the source text; without
a source they fall back to the IR spans.

Messages name per-task blocks by their declared name when the problem is the declaration's (every
instance shares it: `gate 'g' mixes nothing`), and by the instance name when it is the instance's
(`stop-gradient leaves expert group 'experts_cvr' unreachable by any loss`).

Identifiers: every name that reaches generated code is safe (Note [Safe names] in names.py).
"""

from __future__ import annotations

import bisect
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import networkx as nx

from . import syntax as s
from .diagnostics import NOWHERE, Diagnostic, SourceFile, Span, did_you_mean, error, sort_key, warning
from .graph import grad_reach, input_width, node_id
from .ir import Combine, EmbeddingTable, ExpertGroup, Gate, Input, Model, Output, TaskKind, Tower, Transfer
from .names import GENERATED_CLASSES, class_name, name_problem
from .parser import parse_text
from .vocab import MonitorProblem, parse_monitor

# --------------------------------------------------------------------------------------------
# Locating names in the source

_SKIP = re.compile(r"(?:[ \t\f\r\n]+|#[^\n]*)*")
_TOKEN = re.compile(
    r'"(?:[^"\\\n]|\\.)*"?'  # a string (unterminated ones end at the line)
    r"|[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"  # a name or dotted name
    r"|[0-9.][0-9A-Za-z_.]*"  # a number
    r"|->|.",
    re.S,
)

Block = EmbeddingTable | ExpertGroup | Gate | Tower
Decl = s.EmbeddingDecl | s.ExpertsDecl | s.GateDecl


class Locator:
    """Precise spans for parts of declarations the IR keeps only as names.

    Built from the source the model was lowered from; every method falls back to the span it is
    given when there is no source or the text does not match.
    """

    def __init__(self, model: Model, src: SourceFile | None = None) -> None:
        self.model = model
        self.src = src
        self.text = src.text if src is not None else ""
        self._starts = [0] + [i + 1 for i, c in enumerate(self.text) if c == "\n"]
        parsed = parse_text(src.text, src.path) if src is not None else None
        self.spec: s.Spec | None = parsed if isinstance(parsed, s.Spec) else None
        self.decls: dict[Span, object] = {}  # declaration span (and a tower's task span) -> syntax node
        self.inputs: dict[Span, s.InputExpr] = {}
        self.block_decls: list[Decl] = []
        if self.spec is not None:
            for item in self.spec.items:
                self._index(item)

    def _index(self, item: object) -> None:
        span = getattr(item, "span", None)
        if span is not None:
            self.decls.setdefault(span, item)
        if isinstance(item, (s.EmbeddingDecl, s.ExpertsDecl, s.GateDecl)):
            self.block_decls.append(item)
        if isinstance(item, s.TowerDecl) and item.task is not None:
            self.decls.setdefault(item.task.span, item)
        if isinstance(item, s.LevelsDecl):
            for b in item.blocks:
                self._index(b)
        for p in getattr(item, "props", ()):
            if isinstance(p.value, s.InputExpr):
                self.inputs.setdefault(p.value.span, p.value)

    # ---- positions ------------------------------------------------------------------------

    def _offset(self, line: int, column: int) -> int | None:
        if not self.text or not 1 <= line <= len(self._starts):
            return None
        return self._starts[line - 1] + column - 1

    def _span_of(self, start: int, end: int) -> Span:
        line = bisect.bisect_right(self._starts, start)
        end_line = bisect.bisect_right(self._starts, max(end - 1, start))
        return Span(line, start - self._starts[line - 1] + 1, end_line, end - self._starts[end_line - 1] + 1)

    def token(self, span: Span, n: int) -> tuple[str, Span] | None:
        """The n-th token (0-based) of the text at `span`, skipping white space and comments."""
        pos = self._offset(span.line, span.column)
        if pos is None:
            return None
        for i in range(n + 1):
            pos = _SKIP.match(self.text, pos).end()  # type: ignore[union-attr]
            m = _TOKEN.match(self.text, pos)
            if m is None:
                return None
            if i == n:
                return m.group(), self._span_of(m.start(), m.end())
            pos = m.end()
        return None

    def name(self, span: Span, name: str) -> Span:
        """The declared name in `keyword NAME ...` at `span` (task, output, embedding, experts, gate, model)."""
        tok = self.token(span, 1)
        return tok[1] if tok is not None and tok[0] == name else span

    # ---- syntax nodes behind IR nodes ---------------------------------------------------------

    def decl(self, node: object) -> object | None:
        return self.decls.get(getattr(node, "span", NOWHERE))

    def decl_name(self, node: Block) -> str:
        """The name as declared: 'experts' for the instance 'experts_ctr_l2'."""
        d = self.decl(node)
        return d.name if isinstance(d, (s.EmbeddingDecl, s.ExpertsDecl, s.GateDecl)) else node.name

    def node_name_span(self, node: Block) -> Span:
        """Where a block's name is written (a tower: its task, or the `tower` keyword of `tower per task`)."""
        if isinstance(node, Tower):
            d = self.decl(node)
            return self.keyword(node.span) if isinstance(d, s.TowerDecl) and d.task is None else node.span
        return self.name(node.span, self.decl_name(node))

    def keyword(self, span: Span) -> Span:
        """The first token at `span`: the keyword of a declaration."""
        tok = self.token(span, 0)
        return tok[1] if tok is not None else span

    def owner_span(self, node: Block) -> Span:
        d = self.decl(node)
        owner = getattr(d, "owner", None)
        if isinstance(owner, s.Owner) and owner.task is not None:
            return owner.task.span
        return self.node_name_span(node)

    def ref(self, inp: Input, i: int) -> tuple[str, Span]:
        """The i-th reference of an input expression as written, and its span."""
        expr = self.inputs.get(inp.span)
        if expr is not None and len(expr.refs) == len(inp.refs) and i < len(expr.refs):
            return expr.refs[i].name, expr.refs[i].span
        return inp.refs[i], inp.span

    def factor(self, out: Output, i: int) -> Span:
        d = self.decl(out)
        if isinstance(d, s.OutputDecl) and i < len(d.factors) and len(d.factors) == len(out.factors):
            return d.factors[i].span
        return self.name(out.span, out.name)

    def transfer_ends(self, tr: Transfer) -> tuple[Span, Span]:
        d = self.decl(tr)
        if isinstance(d, s.TransferDecl):
            return d.source.span, d.target.span
        return tr.span, tr.span

    def model_decls(self) -> list[s.ModelDecl]:
        return [i for i in self.spec.items if isinstance(i, s.ModelDecl)] if self.spec else []

    def data_decls(self) -> list[s.DataDecl]:
        return [i for i in self.spec.items if isinstance(i, s.DataDecl)] if self.spec else []

    def monitor_props(self) -> list[s.Prop]:
        return [p for i in (self.spec.items if self.spec else ()) if isinstance(i, s.TrainDecl)
                for p in i.props if p.key == "monitor"]

    def monitor_span(self) -> Span:
        """The value of the `monitor` setting that lower() kept (the last one written)."""
        props = self.monitor_props()
        if not props:
            return self.model.train.span
        tok = self.token(props[-1].span, 1)
        return tok[1] if tok is not None else props[-1].span

    def declared(self, kind: type) -> set[str]:
        """Names declared with `embedding`, `experts` or `gate` (per-task ones have no instance of that name)."""
        return {d.name for d in self.block_decls if isinstance(d, kind)}


# --------------------------------------------------------------------------------------------
# Small helpers


def _kind(node: object) -> str:
    match node:
        case EmbeddingTable():
            return "embedding"
        case ExpertGroup():
            return "expert group"
        case Gate():
            return "gate"
        case Tower():
            return "tower"
        case _:
            return type(node).__name__.lower()


def _what(node: object, at: Locator, instance: bool = False) -> str:
    """`gate 'g'` (declared name) or `gate 'g_ctr'` (instance name) for messages."""
    match node:
        case EmbeddingTable():
            return f"embedding '{node.name if instance else at.decl_name(node)}'"
        case ExpertGroup():
            return f"expert group '{node.name if instance else at.decl_name(node)}'"
        case Gate():
            return f"gate '{node.name if instance else at.decl_name(node)}'"
        case Tower():
            d = at.decl(node)
            if not instance and isinstance(d, s.TowerDecl) and d.task is None:
                return "tower per task"
            return f"tower of '{node.task}'"
        case _:
            return f"'{getattr(node, 'name', node)}'"


def _blocks(model: Model) -> list[Block]:
    return [*model.embeddings, *model.experts, *model.gates, *model.towers]


def _consumers(model: Model) -> list[ExpertGroup | Gate | Tower]:
    return [*model.experts, *model.gates, *model.towers]


def _owner_ok(model: Model, node: Block) -> bool:
    """False for blocks owned by an unknown task: their references cannot be resolved, and the owner is reported."""
    tasks = {t.name for t in model.tasks}
    owner = node.task if isinstance(node, Tower) else node.owner
    return owner is None or owner in tasks


def _producer(model: Model, name: str) -> EmbeddingTable | ExpertGroup | Gate | None:
    b = model.block(name)
    return None if isinstance(b, Tower) else b


def _line(span: Span) -> str:
    return f"line {span.line}"


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


@dataclass
class _Out:
    """Collects one check's diagnostics."""

    src: SourceFile | None
    items: list[Diagnostic]

    def error(self, message: str, span: Span, hint: str | None = None) -> None:
        self.items.append(error(message, span, hint, self.src))

    def warning(self, message: str, span: Span, hint: str | None = None) -> None:
        self.items.append(warning(message, span, hint, self.src))


def _out(at: Locator) -> _Out:
    return _Out(at.src, [])


def _at(model: Model, at: Locator | None) -> Locator:
    return at if at is not None else Locator(model, None)


# --------------------------------------------------------------------------------------------
# 1. Names


def check_names(model: Model, graph: nx.DiGraph, at: Locator | None = None) -> list[Diagnostic]:
    """Every name that reaches generated code is safe (Note [Safe names]).

    Checked: the model name (also as a class name), tasks, derived outputs, declared block names and
    the instance names they make (`state` per task with a task `dict` makes `state_dict`), tower names.
    An instance is checked only when its parts are valid, so one bad name gives one error. The model's
    doc may be any text: codegen writes it with repr() (tests/test_codegen.py checks escapes).
    """
    at = _at(model, at)
    out = _out(at)

    def report(kind: str, name: str, span: Span, local: bool = True) -> bool:
        problem = name_problem(name, local)
        if problem is not None:
            out.error(f"{kind} name '{name}' {problem[0]}", span, problem[1])
        return problem is None

    models = at.model_decls()
    if models:
        span = at.name(models[0].span, models[0].name)
        if report("model", model.name, span, local=False) and class_name(model.name) in GENERATED_CLASSES:
            out.error(f"model name '{model.name}' makes the class '{class_name(model.name)}', which the generated code "
                      "already uses", span, f"rename it, e.g. '{model.name}_model'")
    else:
        problem = name_problem(model.name, local=False)
        if problem is not None:
            out.error(f"model name '{model.name}', taken from the file name, {problem[0]}", NOWHERE,
                      "name the model with `model <name>` at the top of the spec")

    tasks_ok = {t.name for t in model.tasks if report("task", t.name, at.name(t.span, t.name))}
    for o in model.outputs:
        if o.factors:
            report("output", o.name, at.name(o.span, o.name))

    for tr in model.transfers:
        module = f"transfer_{tr.source}_{tr.target}"
        problem = name_problem(module, local=False)
        if tr.source in tasks_ok and tr.target in tasks_ok and problem is not None:
            out.error(f"transfer '{tr.source}' -> '{tr.target}' would be named '{module}', which {problem[0]}",
                      at.keyword(tr.span), "the generated module names it after both tasks; shorten the task names")

    reported: set[Span] = set()
    instance_reported: set[Span] = set()
    for node in _blocks(model):
        if isinstance(node, Tower):
            if node.task in tasks_ok:
                problem = name_problem(node.name, local=False)
                if problem is not None:
                    out.error(f"the tower of task '{node.task}' would be named '{node.name}', which {problem[0]}",
                              at.node_name_span(node), "shorten the task name")
            continue
        kind = _kind(node)
        decl_name = at.decl_name(node)
        span = at.node_name_span(node)
        if span not in reported:
            reported.add(span)
            if not report(kind, decl_name, span):
                continue
        elif name_problem(decl_name) is not None:
            continue
        if node.name != decl_name and (node.owner is None or node.owner in tasks_ok) and span not in instance_reported:
            problem = name_problem(node.name)
            if problem is not None:
                instance_reported.add(span)
                out.error(f"{kind} '{decl_name}' makes an instance named '{node.name}', which {problem[0]}", span,
                          f"rename '{decl_name}'")
    return out.items


# --------------------------------------------------------------------------------------------
# 2. Duplicates


def check_duplicates(model: Model, graph: nx.DiGraph, at: Locator | None = None) -> list[Diagnostic]:
    """Each name is declared once: the model and data lines, tasks, outputs (a derived output may not take a
    task's name), block instances across kinds (a `per task` declaration's instances and the towers'
    `tower_<task>` included), losses and transfers. The later declaration is reported."""
    at = _at(model, at)
    out = _out(at)
    for kind, decls in (("model", at.model_decls()), ("data", at.data_decls())):
        for extra in decls[1:]:
            out.error(f"`{kind}` is declared twice", at.keyword(extra.span), f"keep the one at {_line(decls[0].span)}")

    first_output: dict[str, Output] = {}
    for o in model.outputs:
        prev = first_output.setdefault(o.name, o)
        if prev is o:
            continue
        what = "output" if o.factors else "task"
        if bool(prev.factors) == bool(o.factors):
            out.error(f"{what} '{o.name}' is declared twice", at.name(o.span, o.name), f"first declared at {_line(prev.span)}")
        else:
            out.error(f"{what} '{o.name}' has the same name as {'task' if not prev.factors else 'output'} '{o.name}'",
                      at.name(o.span, o.name), f"first declared at {_line(prev.span)}; rename one")

    by_name: dict[str, list[Block]] = defaultdict(list)
    for node in _blocks(model):
        by_name[node.name].append(node)
    done: set[tuple[Span, Span]] = set()
    for name, nodes in by_name.items():
        nodes = sorted(nodes, key=lambda n: (isinstance(n, Tower), n.span.line, n.span.column))
        first = nodes[0]
        for node in nodes[1:]:
            if node.span == first.span or (first.span, node.span) in done:
                continue  # instances of one declaration: lower() names them apart, or reported below
            done.add((first.span, node.span))
            if isinstance(node, Tower) and isinstance(first, Tower):
                continue  # lower() reports a task with two towers
            a, b = (node, first) if isinstance(node, Tower) else (first, node)  # report at the declared block
            if not isinstance(a, Tower) and at.decl_name(a) == at.decl_name(b):
                first_kind = "" if _kind(a) == _kind(b) else f" as {_kind(a)}"
                out.error(f"{_kind(b)} '{at.decl_name(b)}' is declared twice", at.node_name_span(b),
                          f"first declared{first_kind} at {_line(a.span)}")
            else:
                where = f"the tower of task '{a.task}' is implied at" if isinstance(a, Tower) else \
                    f"{_kind(a)} '{at.decl_name(a)}' is declared at"
                out.error(f"{_describe(b, at)} has the same name as {_describe(a, at)}", at.node_name_span(b),
                          f"{where} {_line(a.span)}; rename one")

    # One namespace in forward(): block instances, tasks and outputs (Note [Safe names]).
    local_blocks: dict[str, Block] = {}
    for b in [*model.embeddings, *model.experts, *model.gates]:
        local_blocks.setdefault(b.name, b)
    for o in model.outputs:
        b = local_blocks.get(o.name)
        if b is None or first_output[o.name] is not o:
            continue
        what = f"{'output' if o.factors else 'task'} '{o.name}'"
        hint = "blocks, tasks and outputs are variables of the generated forward(); rename one"
        if (o.span.line, o.span.column) > (b.span.line, b.span.column):
            out.error(f"{what} has the same name as {_describe(b, at)}", at.name(o.span, o.name), hint)
        else:
            out.error(f"{_describe(b, at)} has the same name as {what}", at.node_name_span(b), hint)
    for tr in model.transfers:
        b = local_blocks.get(f"transfer_{tr.source}_{tr.target}")
        if b is not None:
            out.error(f"{_describe(b, at)} has the same name as the module of transfer '{tr.source}' -> '{tr.target}'",
                      at.node_name_span(b), f"the generated code names it 'transfer_{tr.source}_{tr.target}'; rename the block")

    seen_loss: dict[str, Span] = {}
    for lo in model.losses:
        if lo.output in seen_loss:
            out.error(f"loss on '{lo.output}' is declared twice", lo.span,
                      f"keep the one at {_line(seen_loss[lo.output])}; `weight` scales a loss")
        else:
            seen_loss[lo.output] = lo.span
    seen_tr: dict[str, Transfer] = {}
    for tr in model.transfers:
        key = f"{tr.source}_{tr.target}"
        prev = seen_tr.setdefault(key, tr)
        if prev is tr:
            continue
        if (prev.source, prev.target) == (tr.source, tr.target):
            out.error(f"transfer '{tr.source}' -> '{tr.target}' is declared twice", at.keyword(tr.span),
                      f"keep the one at {_line(prev.span)}")
        else:
            out.error(f"transfer '{tr.source}' -> '{tr.target}' has the same name '{key}' as transfer "
                      f"'{prev.source}' -> '{prev.target}'", at.keyword(tr.span), "rename one of the tasks")
    return out.items


def _describe(node: Block, at: Locator) -> str:
    """`embedding 'emb_ctr'`, `the 'ctr' instance of per-task embedding 'emb'`, `the tower of task 'ctr'`."""
    if isinstance(node, Tower):
        return f"the tower of task '{node.task}'"
    decl = at.decl_name(node)
    kind = _kind(node)
    if decl == node.name:
        return f"{kind} '{decl}'"
    d = at.decl(node)
    per_task = isinstance(getattr(d, "owner", None), s.Owner) and d.owner.kind is s.OwnerKind.per_task  # type: ignore[union-attr]
    which = " ".join(w for w in (f"level-{node.level}" if getattr(node, "level", 0) else "", f"'{node.owner}'" if per_task else "") if w)
    return f"the {which} instance of {'per-task ' if per_task else ''}{kind} '{decl}'"


# --------------------------------------------------------------------------------------------
# 3. References to unknown names


def check_references(model: Model, graph: nx.DiGraph, at: Locator | None = None) -> list[Diagnostic]:
    """Every name used is declared: the task in `for TASK` and `tower TASK`, loss and factor outputs,
    transfer ends, block inputs, gate routes. Names that exist but are of the wrong kind are left to
    check_kinds; a shared block reading a per-task declaration is lower()'s to report."""
    at = _at(model, at)
    out = _out(at)
    tasks = [t.name for t in model.tasks]
    outputs = [o.name for o in model.outputs]
    blocks = {b.name for b in _blocks(model)}
    declared = at.declared(s.EmbeddingDecl) | at.declared(s.ExpertsDecl) | at.declared(s.GateDecl)
    experts = {x.name for x in model.experts} | at.declared(s.ExpertsDecl)

    for node in [*model.embeddings, *model.experts, *model.gates]:
        if node.owner is not None and node.owner not in tasks:
            out.error(f"{_what(node, at)} is owned by unknown task '{node.owner}'", at.owner_span(node),
                      did_you_mean(node.owner, tasks))
    for t in model.towers:
        if t.task not in tasks and t.task not in outputs:
            out.error(f"tower for unknown task '{t.task}'", t.span, did_you_mean(t.task, tasks))
    for lo in model.losses:
        if lo.output not in outputs:
            out.error(f"loss on unknown output '{lo.output}'", lo.span, did_you_mean(lo.output, outputs))
    for o in model.outputs:
        for i, f in enumerate(o.factors):
            if f not in outputs:
                out.error(f"output '{o.name}' multiplies unknown output '{f}'", at.factor(o, i), did_you_mean(f, outputs))
    for tr in model.transfers:
        for end, span, word in zip((tr.source, tr.target), at.transfer_ends(tr), ("from", "to")):
            if end not in outputs and model.block(end) is None:
                out.error(f"transfer {word} unknown task '{end}'", span, did_you_mean(end, tasks))

    names_of_things = set(tasks) | set(outputs)
    for node in _consumers(model):
        if not _owner_ok(model, node):
            continue
        for i, ref in enumerate(node.input.refs):
            written, span = at.ref(node.input, i)
            if ref in blocks or written in declared or ref in names_of_things or written in names_of_things:
                continue
            out.error(f"{_what(node, at)} reads unknown block '{written}'", span,
                      did_you_mean(written, blocks | declared))
    for gate in model.gates:
        if not _owner_ok(model, gate):
            continue
        for r in gate.routes:
            if r.group in blocks or r.group in declared or r.group in names_of_things:
                continue
            out.error(f"{_what(gate, at)} mixes unknown expert group '{r.group}'", r.span, did_you_mean(r.group, experts))
    return out.items


# --------------------------------------------------------------------------------------------
# 4. Kinds


def check_kinds(model: Model, graph: nx.DiGraph, at: Locator | None = None) -> list[Diagnostic]:
    """Each reference names the right kind of thing.

    - `input` reads embeddings, gates, and expert groups of `count 1` (a bottom); never a task, an output
      or a tower, and never a group of several experts (its output is (B, count, d): a gate must mix it).
    - Inside `levels`, the written `input` is what level 1 reads: it may not name a block of the
      `levels` block itself (later levels read the previous level's gates on their own).
      Outside `levels`, blocks may read gates and bottoms of any level: hand-written stacking is fine
      (check_cycles catches a block that ends up reading itself).
    - `mix` takes expert groups only. `tower X` and transfer ends are tasks, not derived outputs.
    - A derived output multiplies probabilities: a regression task cannot be a factor.
    """
    at = _at(model, at)
    out = _out(at)
    kinds = {t.name: t.kind for t in model.tasks}
    derived = {o.name for o in model.outputs if o.factors}
    tower_names = {t.name: t for t in model.towers}
    declared_kind: dict[str, str] = {}
    for d in at.block_decls:
        declared_kind.setdefault(d.name, {s.EmbeddingDecl: "embedding", s.ExpertsDecl: "expert group",
                                          s.GateDecl: "gate"}[type(d)])

    def thing(name: str) -> str | None:
        if name in tower_names:
            return f"tower '{name}'"
        if name in derived:
            return f"output '{name}'"
        if name in kinds:
            return f"task '{name}'"
        return None

    for node in _consumers(model):
        if not _owner_ok(model, node):
            continue
        for i, ref in enumerate(node.input.refs):
            written, span = at.ref(node.input, i)
            producer = _producer(model, ref)
            if producer is None:
                what = thing(ref) if written not in declared_kind else None  # else: lower() reported it
                if what is not None:
                    out.error(f"{_what(node, at)} reads {what}, which is not a block", span,
                              "inputs are embeddings, gates or expert groups; one task's tower feeds another "
                              "through `transfer`")
                continue
            if producer.name == node.name:
                continue  # check_cycles
            if _same_level_read(node, producer):
                out.error(f"{_what(node, at)} reads {_what(producer, at)} of its own `levels` block", span,
                          "inside `levels`, `input` is what level 1 reads (an embedding); later levels read "
                          "the previous level's gates on their own")
            elif isinstance(producer, ExpertGroup) and producer.count > 1:
                out.error(f"{_what(node, at)} reads {_what(producer, at)} of {producer.count} experts: put a gate "
                          "in between", span, "only a group with `count 1` feeds a block directly")
    for gate in model.gates:
        for r in gate.routes:
            b = model.block(r.group)
            if isinstance(b, ExpertGroup):
                continue
            if isinstance(b, (EmbeddingTable, Gate)):
                what: str | None = _what(b, at, instance=True)
            elif r.group in declared_kind:
                what = f"{declared_kind[r.group]} '{r.group}'"
            else:
                what = thing(r.group)
            if what is not None:
                out.error(f"{_what(gate, at)} mixes {what}, which is not an expert group", r.span,
                          "`mix` takes expert groups; read embeddings and gates with `input`")
    for t in model.towers:
        if t.task in derived and t.task not in kinds:
            out.error(f"tower for output '{t.task}', which is not a task", t.span,
                      "towers belong to tasks; a derived output is computed from its factors")
    for tr in model.transfers:
        for end, span, word in zip((tr.source, tr.target), at.transfer_ends(tr), ("from", "to")):
            what = thing(end) if end not in kinds else None
            if what is None and model.block(end) is not None and end not in kinds:
                what = _what(model.block(end), at, instance=True)
            if what is not None:
                out.error(f"transfer {word} {what}, which is not a task", span, "transfers connect two tasks' towers")
    for o in model.outputs:
        for i, f in enumerate(o.factors):
            if kinds.get(f) is TaskKind.regression:
                out.error(f"output '{o.name}' multiplies regression task '{f}'", at.factor(o, i),
                          "a derived output is a product of probabilities: its factors are binary tasks")
    return out.items


def _same_level_read(node: Block, producer: Block) -> bool:
    """A block inside `levels` reading a block of the same level (see check_kinds)."""
    level = getattr(node, "level", 0)
    return level >= 1 and getattr(producer, "level", 0) == level


# --------------------------------------------------------------------------------------------
# 5. Structure


def check_structure(model: Model, graph: nx.DiGraph, at: Locator | None = None) -> list[Diagnostic]:
    """The model is complete: at least one task; every task has a tower; every task reaches a loss,
    directly or through a derived output (ESMM's cvr); a derived output without a loss, and a loss of
    weight 0, are warnings; every gate mixes something, and no group twice."""
    at = _at(model, at)
    out = _out(at)
    if not model.tasks:
        models = at.model_decls()
        out.error("the spec declares no task", at.name(models[0].span, models[0].name) if models else NOWHERE,
                  "add one, e.g. `task ctr binary label click`")
    towers = {t.task for t in model.towers}
    trained = _trained_outputs(model, graph)
    names = {o.name for o in model.outputs}
    # While a tower or a loss names an unknown task/output, the missing tower or loss is most likely that
    # one (check_references reports it): say nothing more.
    towers_resolved = all(t.task in names for t in model.towers)
    losses_resolved = all(lo.output in names for lo in model.losses) and \
        all(f in names for o in model.outputs for f in o.factors)
    for t in model.tasks:
        span = at.name(t.span, t.name)
        if t.name not in towers and towers_resolved:
            out.error(f"task '{t.name}' has no tower", span, f"add `tower {t.name} {{ input ... }}` or `tower per task`")
        if t.name not in trained and losses_resolved:
            out.error(f"task '{t.name}' is not trained: no loss reaches it", span,
                      f"add `loss {t.name}`, or multiply it into an output that has a loss")
    for lo in model.losses:
        if lo.weight == 0:
            out.warning(f"loss on '{lo.output}' has weight 0: it trains nothing", lo.span,
                        "give it a positive weight, or remove it")
    for o in model.outputs:
        if o.factors and o.name not in trained:
            out.warning(f"output '{o.name}' has no loss: it is computed but not trained", at.name(o.span, o.name),
                        f"add `loss {o.name}`, or drop the output")

    written_routes = {d.span: len(d.routes) for d in at.block_decls if isinstance(d, s.GateDecl)}
    twice: set[Span] = set()
    for gate in model.gates:
        if not gate.routes and written_routes.get(gate.span, 0) == 0:
            out.error(f"{_what(gate, at)} mixes nothing", at.node_name_span(gate),
                      "add `mix <expert group>`; a gate is a softmax over experts")
        seen: dict[str, Span] = {}
        for r in gate.routes:
            if r.group in seen and r.span not in twice:
                twice.add(r.span)
                hint = "the route at " + _line(seen[r.group]) + " already mixes it" if seen[r.group] != r.span \
                    else "this route names the group twice"
                out.error(f"{_what(gate, at, instance=True)} mixes expert group '{r.group}' twice", r.span, hint)
            elif r.group not in seen:
                seen[r.group] = r.span
    return out.items


def _trained_outputs(model: Model, graph: nx.DiGraph) -> set[str]:
    """Outputs with a path to a loss: supervised directly, or a factor of one that is."""
    trained: set[str] = set()
    stack = [n for n, k in graph.nodes(data="kind") if k == "loss"]
    seen = set(stack)
    while stack:
        v = stack.pop()
        for u in graph.predecessors(v):
            if graph.nodes[u].get("kind") == "output" and u not in seen:
                seen.add(u)
                trained.add(graph.nodes[u]["name"])
                stack.append(u)
    return trained


# --------------------------------------------------------------------------------------------
# 6. Cycles


def check_cycles(model: Model, graph: nx.DiGraph, at: Locator | None = None) -> list[Diagnostic]:
    """No block depends on its own output: a block reading itself, a cycle of inputs and routes
    (reported once per cycle, at the input that closes it), a derived output that is its own factor.
    Cycles of transfers are check_transfers'."""
    at = _at(model, at)
    out = _out(at)
    for node in _consumers(model):
        for i, ref in enumerate(node.input.refs):
            if ref == node.name and not isinstance(node, Tower):  # a tower reading a tower: check_kinds
                out.error(f"{_what(node, at)} reads itself", at.ref(node.input, i)[1],
                          "a block cannot read its own output")
    blocks = graph.subgraph(n for n, k in graph.nodes(data="kind") if k in ("emb", "experts", "gate")).copy()
    for u, v in list(blocks.edges):
        if _same_level_read(graph.nodes[v]["block"], graph.nodes[u]["block"]):
            blocks.remove_edge(u, v)  # check_kinds reports it
    for comp in sorted(nx.strongly_connected_components(blocks), key=lambda c: sorted(c)):
        if len(comp) < 2:
            continue
        cycle = nx.find_cycle(blocks.subgraph(comp))
        closing = []  # (span, producer, consumer) of each `input` edge in the cycle
        for u, v in cycle:
            consumer = graph.nodes[v]["block"]
            for i, ref in enumerate(consumer.input.refs):
                if node_id(graph.nodes[u]["kind"], ref) == u:
                    closing.append((at.ref(consumer.input, i)[1], u, v))
        if not closing:
            continue
        span, u, v = min(closing, key=lambda c: (c[0].line, c[0].column))
        order = [a for a, _ in cycle]
        k = order.index(u)
        order = order[k:] + order[:k] + [u]
        names = " -> ".join(f"'{at.decl_name(graph.nodes[n]['block'])}'" for n in order)
        out.error(f"cycle: {names}", span,
                  f"{_what(graph.nodes[v]['block'], at)} reads {_what(graph.nodes[u]['block'], at)}, which is "
                  "computed from it; a block cannot depend on its own output")
    outputs = graph.subgraph(n for n, k in graph.nodes(data="kind") if k == "output")
    counts = defaultdict(int)
    for o in model.outputs:
        counts[o.name] += 1
    by_name = {o.name: o for o in model.outputs if o.factors and counts[o.name] == 1}  # else: check_duplicates
    for comp in sorted(nx.strongly_connected_components(outputs), key=lambda c: sorted(c)):
        if len(comp) < 2 and not outputs.has_edge(next(iter(comp)), next(iter(comp))):
            continue
        cycle = nx.find_cycle(outputs.subgraph(comp))
        u, v = cycle[-1]
        o = by_name.get(graph.nodes[v]["name"])
        if o is None:
            continue
        f = graph.nodes[u]["name"]
        i = o.factors.index(f) if f in o.factors else 0
        if u == v:
            out.error(f"output '{o.name}' multiplies itself", at.factor(o, i), "a derived output is a product of other outputs")
        else:
            names = " -> ".join(f"'{graph.nodes[a]['name']}'" for a, _ in cycle) + f" -> '{graph.nodes[u]['name']}'"
            out.error(f"cycle of derived outputs: {names}", at.factor(o, i), "a derived output cannot depend on itself")
    return out.items


# --------------------------------------------------------------------------------------------
# 7. Transfers


def check_transfers(model: Model, graph: nx.DiGraph, at: Locator | None = None) -> list[Diagnostic]:
    """AITM transfers connect two different tasks that both have towers, along a chain: no task
    transfers to itself, no cycle, and each task receives from at most one task."""
    at = _at(model, at)
    out = _out(at)
    tasks = {t.name for t in model.tasks}
    towers = {t.task for t in model.towers}
    into: dict[str, Transfer] = {}
    chain = nx.DiGraph()
    for tr in model.transfers:
        src_span, dst_span = at.transfer_ends(tr)
        if tr.source == tr.target:
            out.error(f"task '{tr.source}' transfers to itself", dst_span, "a transfer connects two different tasks")
            continue
        for end, span in ((tr.source, src_span), (tr.target, dst_span)):
            if end in tasks and end not in towers:
                out.error(f"transfer {'from' if end == tr.source else 'to'} task '{end}', which has no tower", span,
                          f"add `tower {end} {{ ... }}` or `tower per task`")
        if tr.target in tasks and tr.source in tasks:
            prev = into.setdefault(tr.target, tr)
            if prev is not tr and prev.source != tr.source:
                out.error(f"task '{tr.target}' already receives a transfer from '{prev.source}'", dst_span,
                          f"a task receives from one task (AITM's chain); see {_line(prev.span)}")
            chain.add_edge(tr.source, tr.target, transfer=tr)
    try:
        cycle = nx.find_cycle(chain)
    except nx.NetworkXNoCycle:
        cycle = []
    if cycle:
        closing = max((chain.edges[e]["transfer"] for e in cycle), key=lambda t: (t.span.line, t.span.column))
        names = " -> ".join(f"'{a}'" for a, _ in cycle) + f" -> '{cycle[0][0]}'"
        out.error(f"transfer cycle: {names}", at.keyword(closing.span), "transfers must form a chain, e.g. ctr -> cvr")
    return out.items


# --------------------------------------------------------------------------------------------
# 8. Widths


def check_dimensions(model: Model, graph: nx.DiGraph, at: Locator | None = None) -> list[Diagnostic]:
    """Widths agree (docs/language.md, Widths): the parts of `sum(...)`; the groups one gate mixes; the
    tower inputs at both ends of a transfer. A table with `copies N` is read by an expert group with
    `count N` (one copy per expert) or `count 1` (the copies summed), nothing in between."""
    at = _at(model, at)
    out = _out(at)

    def width(name: str) -> int | None:
        p = _producer(model, name)
        if p is None:
            return None
        nid = node_id({EmbeddingTable: "emb", ExpertGroup: "experts", Gate: "gate"}[type(p)], name)
        return graph.nodes[nid].get("width") if nid in graph else None

    for e in model.embeddings:
        if e.width == 0 and _selects_nothing(at.decl(e)):
            out.error(f"{_what(e, at)} yields no features", at.node_name_span(e),
                      "select fields, e.g. `fields all`, or `dense all`")
    for node in _consumers(model):
        inp = node.input
        if inp.op is Combine.sum and len(inp.refs) > 1 and node.name not in inp.refs:  # else check_cycles
            widths = [(at.ref(inp, i)[0], width(r)) for i, r in enumerate(inp.refs)]
            known = [(n, w) for n, w in widths if w]  # unknown, or an empty table (reported above or by lower())
            if len({w for _, w in known}) > 1:
                first = known[0]
                other = next((n, w) for n, w in known if w != first[1])
                out.error(f"sum() of inputs with different widths: '{first[0]}' has {first[1]}, '{other[0]}' has {other[1]}",
                          inp.span, "use concat(...) to join them, or give them equal widths")
        if isinstance(node, ExpertGroup):
            for i, ref in enumerate(inp.refs):
                e = _producer(model, ref)
                if isinstance(e, EmbeddingTable) and e.copies > 1 and node.count not in (1, e.copies):
                    out.error(f"{_what(e, at)} has {e.copies} copies but {_what(node, at)} has {node.count} experts",
                              at.ref(inp, i)[1], f"a table with `copies {e.copies}` gives one copy to each of "
                              f"{e.copies} experts; use `count {e.copies}`, or `copies 1`")
    for gate in model.gates:
        first: tuple[str, int] | None = None
        for r in gate.routes:
            w = width(r.group) if isinstance(model.block(r.group), ExpertGroup) else None
            if w is None:
                continue
            name = at.decl_name(model.block(r.group))  # type: ignore[arg-type]
            if first is None:
                first = (name, w)
            elif w != first[1]:
                out.error(f"{_what(gate, at)} mixes expert groups of different widths: '{first[0]}' yields {first[1]}, "
                          f"'{name}' yields {w}", r.span, "the last `mlp` layer of every mixed group must be equal")
                break
    towers = {t.task: t for t in model.towers}
    for tr in model.transfers:
        a, b = towers.get(tr.source), towers.get(tr.target)
        if a is None or b is None or a is b:
            continue
        wa, wb = input_width(graph, model, a.input), input_width(graph, model, b.input)
        if wa is not None and wb is not None and wa != wb:
            out.error(f"transfer '{tr.source}' -> '{tr.target}' joins towers whose inputs differ in width: "
                      f"'{tr.source}' reads {wa}, '{tr.target}' reads {wb}", at.keyword(tr.span),
                      "AITM's attention mixes the two towers' inputs, so they need one width")
    return out.items


def _selects_nothing(decl: object) -> bool:
    """`fields none`, `fields []`, `dense none`: the spec asks for nothing (lower() reports what it cannot
    resolve, and a missing `fields`). Without the syntax, any empty table."""
    if not isinstance(decl, s.EmbeddingDecl):
        return decl is None
    sels = [p.value for p in decl.props if p.key in ("fields", "dense")]
    return bool(sels) and all(isinstance(f, s.FieldSel) and (f.group == "none" or (f.group is None and not f.fields))
                              for f in sels)


# --------------------------------------------------------------------------------------------
# 9. Gradient reachability


def check_gradients(model: Model, graph: nx.DiGraph, at: Locator | None = None) -> list[Diagnostic]:
    """Warnings for parameters no loss trains (graph.grad_reach from every loss node): a block with no
    path to any loss is unused; a block whose every path to a loss is detached is left unreachable
    by stop-gradient (Note [Gate visibility]). Skipped while a reference is unresolved: the graph is
    then incomplete and every warning would be a consequence of the error."""
    at = _at(model, at)
    out = _out(at)
    for node in _consumers(model):
        if any(_producer(model, r) is None for r in node.input.refs):
            return []
    if any(_producer(model, r.group) is None for g in model.gates for r in g.routes):
        return []
    losses = [n for n, k in graph.nodes(data="kind") if k == "loss"]
    if not losses:
        return []
    reached: set[str] = set()
    used: set[str] = set()
    for lo in losses:
        reached |= grad_reach(graph, lo)
        used |= nx.ancestors(graph, lo) | {lo}
    for n, data in graph.nodes(data=True):
        if data["kind"] not in ("emb", "experts", "gate") or n in reached:
            continue
        node = data["block"]
        what = _what(node, at, instance=True)
        span = at.node_name_span(node)
        if n not in used:
            out.warning(f"{what} is unused: no loss depends on it", span, "read it from a block, or remove it")
            continue
        detached = sorted(graph.nodes[v]["name"] for _, v, d in graph.out_edges(n, data=True) if not d["backward"])
        if detached:
            hint = f"{_quoted(detached)} mix{'es' if len(detached) == 1 else ''} it `forward` only; " \
                   "add `backward` to one of those routes if it should learn"
        else:
            readers = sorted(graph.nodes[v]["name"] for v in graph.successors(n) if v in used)
            hint = f"it feeds only blocks that get no gradient: {_quoted(readers)}"
        out.warning(f"stop-gradient leaves {what} unreachable by any loss", span, hint)
    return out.items


# --------------------------------------------------------------------------------------------
# 10. Training settings


def check_train(model: Model, graph: nx.DiGraph, at: Locator | None = None) -> list[Diagnostic]:
    """The `monitor` as the trainer will read it (vocab.parse_monitor): `<output>.<metric>` or `mean.<metric>`
    with a metric the output has. The default, mean.auc, is not the user's choice and is not checked: the
    trainer averages over the outputs that have the metric. lower() checks the other settings."""
    at = _at(model, at)
    out = _out(at)
    span = model.train.monitor_span
    if span is None:
        return []
    found = parse_monitor(model.train.monitor, {o.name: o.kind for o in model.outputs})
    if isinstance(found, MonitorProblem):
        out.error(found.message, span, found.hint)
    return out.items


# --------------------------------------------------------------------------------------------

CHECKS = (check_names, check_duplicates, check_references, check_kinds, check_structure, check_cycles,
          check_transfers, check_dimensions, check_train)


def validate(model: Model, graph: nx.DiGraph, src: SourceFile | None = None) -> list[Diagnostic]:
    """Every check's findings, without repeats, in source order. Gradient warnings only when the rest is error-free."""
    at = Locator(model, src)
    found: list[Diagnostic] = []
    for check in CHECKS:
        found.extend(check(model, graph, at))
    if not any(d.is_error for d in found):
        found.extend(check_gradients(model, graph, at))
    return _unique(found)


def _unique(diagnostics: Sequence[Diagnostic]) -> list[Diagnostic]:
    seen: set[tuple[object, ...]] = set()
    unique = []
    for d in diagnostics:
        key = (d.severity, d.message, d.span, d.hint)
        if key not in seen:
            seen.add(key)
            unique.append(d)
    return sorted(unique, key=sort_key)
