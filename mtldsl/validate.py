"""Check an ir.Model and its graph: check_*(model, graph) -> list[Diagnostic]; never raises on a bad spec.

`validate` runs every check and returns what they found, warnings included, without repeats and in
source order. lower() has already reported what it could not make sense of in the syntax (block
properties, selectors, labels, fields, level wiring, a shared block reading a per-task one); the
checks here cover names, references, kinds, structure, widths and gradient flow, and stay quiet about
what lower() reported, so that one mistake gives one error.

Spans come from the IR only (Note [Spans in the IR]): the declaration a node came from, and where
each name is written (the name in `gate g_ctr for ctr {`, one reference inside `sum(a, b)`, one factor
of an output). Validation never reads the source; `validate` only attaches it for rendering.

Messages name per-task blocks by their declared name when the problem is the declaration's (every
instance shares it: `gate 'g' mixes nothing`), and by the instance name when it is the instance's
(`stop-gradient leaves expert group 'experts_cvr' unreachable by any loss`).

Identifiers: every name that reaches generated code is safe (Note [Safe names] in names.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import networkx as nx

from .diagnostics import NOWHERE, Diagnostic, SourceFile, Span, did_you_mean, error, quoted, sort_key, warning
from .graph import grad_reach, input_width, node_id
from .ir import BlockKind, Combine, EmbeddingTable, ExpertGroup, Gate, Input, Model, Output, Tower, Transfer
from .names import class_name, class_problem, name_problem
from .validate_lists import check_pooling
from .vocab import MonitorProblem, TaskKind, parse_monitor

Block = EmbeddingTable | ExpertGroup | Gate | Tower


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


def _what(node: object, instance: bool = False) -> str:
    """`gate 'g'` (declared name) or `gate 'g_ctr'` (instance name) for messages."""
    match node:
        case EmbeddingTable():
            return f"embedding '{node.name if instance else _decl_name(node)}'"
        case ExpertGroup():
            return f"expert group '{node.name if instance else _decl_name(node)}'"
        case Gate():
            return f"gate '{node.name if instance else _decl_name(node)}'"
        case Tower():
            if not instance and node.per_task:
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


def _decl_name(node: Block) -> str:
    """The name as declared: 'experts' for the instance 'experts_ctr_l2' (a tower: its own name)."""
    return node.name if isinstance(node, Tower) else node.decl_name


def _written(inp: Input, i: int) -> tuple[str, Span]:
    ref = inp.written_ref(i)
    return ref.name, ref.span


def _factor_span(out: Output, i: int) -> Span:
    return out.factor_spans[i] if i < len(out.factor_spans) else out.name_span


def _declared(model: Model, *kinds: BlockKind) -> set[str]:
    """Names declared with `embedding`, `experts` or `gate` (per-task ones have no instance of that name)."""
    return {d.name for d in model.declarations if d.kind in kinds}


@dataclass
class _Out:
    """Collects one check's diagnostics (validate() attaches the source)."""

    items: list[Diagnostic]

    def error(self, message: str, span: Span, hint: str | None = None) -> None:
        self.items.append(error(message, span, hint))

    def warning(self, message: str, span: Span, hint: str | None = None) -> None:
        self.items.append(warning(message, span, hint))


# --------------------------------------------------------------------------------------------
# 1. Names


def check_names(model: Model, graph: nx.DiGraph) -> list[Diagnostic]:
    """Every name that reaches generated code is safe (Note [Safe names]).

    Checked: the model name (also as a class name), tasks, derived outputs, declared block names and
    the instance names they make (`state` per task with a task `dict` makes `state_dict`), tower names and
    transfer module names (`transfer_<src>_<dst>`): codegen's `ident` refuses what is not checked here.
    An instance is checked only when its parts are valid, so one bad name gives one error. The model's
    doc may be any text: codegen writes it with repr() (tests/test_codegen.py checks escapes).
    """
    out = _Out([])

    def report(kind: str, name: str, span: Span, local: bool = True) -> bool:
        problem = name_problem(name, local)
        if problem is not None:
            out.error(f"{kind} name '{name}' {problem[0]}", span, problem[1])
        return problem is None

    span = model.name_span
    if span is not None:
        if report("model", model.name, span, local=False) and (reason := class_problem(model.name)) is not None:
            out.error(f"model name '{model.name}' makes the class '{class_name(model.name)}', which {reason}", span,
                      f"rename it, e.g. '{model.name}_model'")
    else:
        problem = name_problem(model.name, local=False)
        reason = problem[0] if problem is not None else class_problem(model.name)
        if reason is not None:
            made = "" if problem is not None else f" makes the class '{class_name(model.name)}', which"
            out.error(f"model name '{model.name}', taken from the file name,{made} {reason}", NOWHERE,
                      "name the model with `model <name>` at the top of the spec")

    tasks_ok = {t.name for t in model.tasks if report("task", t.name, t.name_span)}
    for o in model.outputs:
        if o.factors:
            report("output", o.name, o.name_span)

    for tr in model.transfers:
        module = f"transfer_{tr.source}_{tr.target}"
        problem = name_problem(module, local=False)
        if tr.source in tasks_ok and tr.target in tasks_ok and problem is not None:
            out.error(f"transfer '{tr.source}' -> '{tr.target}' would be named '{module}', which {problem[0]}",
                      tr.keyword_span, "the generated module names it after both tasks; shorten the task names")

    reported: set[Span] = set()
    instance_reported: set[Span] = set()
    for node in _blocks(model):
        if isinstance(node, Tower):
            if node.task in tasks_ok:
                problem = name_problem(node.name, local=False)
                if problem is not None:
                    out.error(f"the tower of task '{node.task}' would be named '{node.name}', which {problem[0]}",
                              node.name_span, "shorten the task name")
            continue
        kind = _kind(node)
        decl_name = _decl_name(node)
        span = node.name_span
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


def check_duplicates(model: Model, graph: nx.DiGraph) -> list[Diagnostic]:
    """Each name is declared once: the model and data lines, tasks, outputs (a derived output may not take a
    task's name), block instances across kinds (a `per task` declaration's instances and the towers'
    `tower_<task>` included), losses and transfers. The later declaration is reported."""
    out = _Out([])
    for kind, spans in (("model", model.model_spans), ("data", model.data_spans)):
        for extra in spans[1:]:
            out.error(f"`{kind}` is declared twice", extra, f"keep the one at {_line(spans[0])}")

    first_output: dict[str, Output] = {}
    for o in model.outputs:
        prev = first_output.setdefault(o.name, o)
        if prev is o:
            continue
        what = "output" if o.factors else "task"
        if bool(prev.factors) == bool(o.factors):
            out.error(f"{what} '{o.name}' is declared twice", o.name_span, f"first declared at {_line(prev.span)}")
        else:
            out.error(f"{what} '{o.name}' has the same name as {'task' if not prev.factors else 'output'} '{o.name}'",
                      o.name_span, f"first declared at {_line(prev.span)}; rename one")

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
            if not isinstance(a, Tower) and _decl_name(a) == _decl_name(b):
                first_kind = "" if _kind(a) == _kind(b) else f" as {_kind(a)}"
                out.error(f"{_kind(b)} '{_decl_name(b)}' is declared twice", b.name_span,
                          f"first declared{first_kind} at {_line(a.span)}")
            else:
                where = f"the tower of task '{a.task}' is implied at" if isinstance(a, Tower) else \
                    f"{_kind(a)} '{_decl_name(a)}' is declared at"
                out.error(f"{_describe(b)} has the same name as {_describe(a)}", b.name_span,
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
            out.error(f"{what} has the same name as {_describe(b)}", o.name_span, hint)
        else:
            out.error(f"{_describe(b)} has the same name as {what}", b.name_span, hint)
    for tr in model.transfers:
        b = local_blocks.get(f"transfer_{tr.source}_{tr.target}")
        if b is not None:
            out.error(f"{_describe(b)} has the same name as the module of transfer '{tr.source}' -> '{tr.target}'",
                      b.name_span, f"the generated code names it 'transfer_{tr.source}_{tr.target}'; rename the block")

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
            out.error(f"transfer '{tr.source}' -> '{tr.target}' is declared twice", tr.keyword_span,
                      f"keep the one at {_line(prev.span)}")
        else:
            out.error(f"transfer '{tr.source}' -> '{tr.target}' has the same name '{key}' as transfer "
                      f"'{prev.source}' -> '{prev.target}'", tr.keyword_span, "rename one of the tasks")
    return out.items


def _describe(node: Block) -> str:
    """`embedding 'emb_ctr'`, `the 'ctr' instance of per-task embedding 'emb'`, `the tower of task 'ctr'`."""
    if isinstance(node, Tower):
        return f"the tower of task '{node.task}'"
    decl = _decl_name(node)
    kind = _kind(node)
    if decl == node.name:
        return f"{kind} '{decl}'"
    level = f"level-{node.level}" if getattr(node, "level", 0) else ""
    which = " ".join(w for w in (level, f"'{node.owner}'" if node.per_task else "") if w)
    return f"the {which} instance of {'per-task ' if node.per_task else ''}{kind} '{decl}'"


# --------------------------------------------------------------------------------------------
# 3. References to unknown names


def check_references(model: Model, graph: nx.DiGraph) -> list[Diagnostic]:
    """Every name used is declared: the task in `for TASK` and `tower TASK`, loss and factor outputs,
    transfer ends, block inputs, gate routes. Names that exist but are of the wrong kind are left to
    check_kinds; a shared block reading a per-task declaration is lower()'s to report."""
    out = _Out([])
    tasks = [t.name for t in model.tasks]
    outputs = [o.name for o in model.outputs]
    blocks = {b.name for b in _blocks(model)}
    declared = _declared(model, *BlockKind)
    experts = {x.name for x in model.experts} | _declared(model, BlockKind.experts)

    for node in [*model.embeddings, *model.experts, *model.gates]:
        if node.owner is not None and node.owner not in tasks:
            out.error(f"{_what(node)} is owned by unknown task '{node.owner}'", node.owner_span,
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
                out.error(f"output '{o.name}' multiplies unknown output '{f}'", _factor_span(o, i), did_you_mean(f, outputs))
    for tr in model.transfers:
        for end, span, word in zip((tr.source, tr.target), (tr.source_span, tr.target_span), ("from", "to")):
            if end not in outputs and model.block(end) is None:
                out.error(f"transfer {word} unknown task '{end}'", span, did_you_mean(end, tasks))

    names_of_things = set(tasks) | set(outputs)
    for node in _consumers(model):
        if not _owner_ok(model, node):
            continue
        for i, ref in enumerate(node.input.refs):
            written, span = _written(node.input, i)
            if ref in blocks or written in declared or ref in names_of_things or written in names_of_things:
                continue
            out.error(f"{_what(node)} reads unknown block '{written}'", span,
                      did_you_mean(written, blocks | declared))
    for gate in model.gates:
        if not _owner_ok(model, gate):
            continue
        for r in gate.routes:
            if r.group in blocks or r.group in declared or r.group in names_of_things:
                continue
            out.error(f"{_what(gate)} mixes unknown expert group '{r.group}'", r.span, did_you_mean(r.group, experts))
    return out.items


# --------------------------------------------------------------------------------------------
# 4. Kinds


def check_kinds(model: Model, graph: nx.DiGraph) -> list[Diagnostic]:
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
    out = _Out([])
    kinds = {t.name: t.kind for t in model.tasks}
    derived = {o.name for o in model.outputs if o.factors}
    tower_names = {t.name: t for t in model.towers}
    declared_kind: dict[str, str] = {}
    for d in model.declarations:
        declared_kind.setdefault(d.name, "expert group" if d.kind is BlockKind.experts else d.kind.value)

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
            written, span = _written(node.input, i)
            producer = _producer(model, ref)
            if producer is None:
                what = thing(ref) if written not in declared_kind else None  # else: lower() reported it
                if what is not None:
                    out.error(f"{_what(node)} reads {what}, which is not a block", span,
                              "inputs are embeddings, gates or expert groups; one task's tower feeds another "
                              "through `transfer`")
                continue
            if producer.name == node.name:
                continue  # check_cycles
            if _same_level_read(node, producer):
                out.error(f"{_what(node)} reads {_what(producer)} of its own `levels` block", span,
                          "inside `levels`, `input` is what level 1 reads (an embedding); later levels read "
                          "the previous level's gates on their own")
            elif isinstance(producer, ExpertGroup) and producer.count > 1:
                out.error(f"{_what(node)} reads {_what(producer)} of {producer.count} experts: put a gate "
                          "in between", span, "only a group with `count 1` feeds a block directly")
    for gate in model.gates:
        for r in gate.routes:
            b = model.block(r.group)
            if isinstance(b, ExpertGroup):
                continue
            if isinstance(b, (EmbeddingTable, Gate)):
                what: str | None = _what(b, instance=True)
            elif r.group in declared_kind:
                what = f"{declared_kind[r.group]} '{r.group}'"
            else:
                what = thing(r.group)
            if what is not None:
                out.error(f"{_what(gate)} mixes {what}, which is not an expert group", r.span,
                          "`mix` takes expert groups; read embeddings and gates with `input`")
    for t in model.towers:
        if t.task in derived and t.task not in kinds:
            out.error(f"tower for output '{t.task}', which is not a task", t.span,
                      "towers belong to tasks; a derived output is computed from its factors")
    for tr in model.transfers:
        for end, span, word in zip((tr.source, tr.target), (tr.source_span, tr.target_span), ("from", "to")):
            what = thing(end) if end not in kinds else None
            if what is None and model.block(end) is not None and end not in kinds:
                what = _what(model.block(end), instance=True)
            if what is not None:
                out.error(f"transfer {word} {what}, which is not a task", span, "transfers connect two tasks' towers")
    for o in model.outputs:
        for i, f in enumerate(o.factors):
            if kinds.get(f) is TaskKind.regression:
                out.error(f"output '{o.name}' multiplies regression task '{f}'", _factor_span(o, i),
                          "a derived output is a product of probabilities: its factors are binary tasks")
    return out.items


def _same_level_read(node: Block, producer: Block) -> bool:
    """A block inside `levels` reading a block of the same level (see check_kinds)."""
    level = getattr(node, "level", 0)
    return level >= 1 and getattr(producer, "level", 0) == level


# --------------------------------------------------------------------------------------------
# 5. Structure


def check_structure(model: Model, graph: nx.DiGraph) -> list[Diagnostic]:
    """The model is complete: at least one task; every task has a tower; every task reaches a loss,
    directly or through a derived output (ESMM's cvr); a derived output without a loss, and a loss of
    weight 0, are warnings; every gate mixes something, and no group twice."""
    out = _Out([])
    if not model.tasks:
        out.error("the spec declares no task", model.name_span or NOWHERE,
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
        span = t.name_span
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
            out.warning(f"output '{o.name}' has no loss: it is computed but not trained", o.name_span,
                        f"add `loss {o.name}`, or drop the output")

    twice: set[Span] = set()
    for gate in model.gates:
        if not gate.routes and gate.written_routes == 0:
            out.error(f"{_what(gate)} mixes nothing", gate.name_span,
                      "add `mix <expert group>`; a gate is a softmax over experts")
        seen: dict[str, Span] = {}
        for r in gate.routes:
            if r.group in seen and r.span not in twice:
                twice.add(r.span)
                hint = "the route at " + _line(seen[r.group]) + " already mixes it" if seen[r.group] != r.span \
                    else "this route names the group twice"
                out.error(f"{_what(gate, instance=True)} mixes expert group '{r.group}' twice", r.span, hint)
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


def check_cycles(model: Model, graph: nx.DiGraph) -> list[Diagnostic]:
    """No block depends on its own output: a block reading itself, a cycle of inputs and routes
    (reported once per cycle, at the input that closes it), a derived output that is its own factor.
    Cycles of transfers are check_transfers'."""
    out = _Out([])
    for node in _consumers(model):
        for i, ref in enumerate(node.input.refs):
            if ref == node.name and model.block(ref) is node:  # a tower reading a tower: check_kinds
                out.error(f"{_what(node)} reads itself", node.input.written_ref(i).span,
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
                    closing.append((consumer.input.written_ref(i).span, u, v))
        if not closing:
            continue
        span, u, v = min(closing, key=lambda c: (c[0].line, c[0].column))
        order = [a for a, _ in cycle]
        k = order.index(u)
        order = order[k:] + order[:k] + [u]
        names = " -> ".join(f"'{_decl_name(graph.nodes[n]['block'])}'" for n in order)
        out.error(f"cycle: {names}", span,
                  f"{_what(graph.nodes[v]['block'])} reads {_what(graph.nodes[u]['block'])}, which is "
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
            out.error(f"output '{o.name}' multiplies itself", _factor_span(o, i), "a derived output is a product of other outputs")
        else:
            names = " -> ".join(f"'{graph.nodes[a]['name']}'" for a, _ in cycle) + f" -> '{graph.nodes[u]['name']}'"
            out.error(f"cycle of derived outputs: {names}", _factor_span(o, i), "a derived output cannot depend on itself")
    return out.items


# --------------------------------------------------------------------------------------------
# 7. Transfers


def check_transfers(model: Model, graph: nx.DiGraph) -> list[Diagnostic]:
    """AITM transfers connect two different tasks that both have towers, along a chain: no task
    transfers to itself, no cycle, and each task receives from at most one task."""
    out = _Out([])
    tasks = {t.name for t in model.tasks}
    towers = {t.task for t in model.towers}
    into: dict[str, Transfer] = {}
    chain = nx.DiGraph()
    for tr in model.transfers:
        src_span, dst_span = (tr.source_span, tr.target_span)
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
        out.error(f"transfer cycle: {names}", closing.keyword_span, "transfers must form a chain, e.g. ctr -> cvr")
    return out.items


# --------------------------------------------------------------------------------------------
# 8. Widths


def check_dimensions(model: Model, graph: nx.DiGraph) -> list[Diagnostic]:
    """Widths agree (docs/language.md, Widths): the parts of `sum(...)`; the groups one gate mixes; the
    tower inputs at both ends of a transfer. A table with `copies N` is read by an expert group with
    `count N` (one copy per expert) or `count 1` (the copies summed), nothing in between."""
    out = _Out([])

    def width(name: str) -> int | None:
        p = _producer(model, name)
        if p is None:
            return None
        nid = node_id({EmbeddingTable: "emb", ExpertGroup: "experts", Gate: "gate"}[type(p)], name)
        return graph.nodes[nid].get("width") if nid in graph else None

    for e in model.embeddings:
        if e.width == 0 and e.selects_nothing:  # else lower() reported what it could not resolve
            out.error(f"{_what(e)} yields no features", e.name_span,
                      "select fields, e.g. `fields all`, or `dense all`")
    for node in _consumers(model):
        inp = node.input
        if inp.op is Combine.sum and len(inp.refs) > 1 and node.name not in inp.refs:  # else check_cycles
            widths = [(inp.written_ref(i).name, width(r)) for i, r in enumerate(inp.refs)]
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
                    out.error(f"{_what(e)} has {e.copies} copies but {_what(node)} has {node.count} experts",
                              inp.written_ref(i).span, f"a table with `copies {e.copies}` gives one copy to each of "
                              f"{e.copies} experts; use `count {e.copies}`, or `copies 1`")
    for gate in model.gates:
        first: tuple[str, int] | None = None
        for r in gate.routes:
            w = width(r.group) if isinstance(model.block(r.group), ExpertGroup) else None
            if w is None:
                continue
            name = _decl_name(model.block(r.group))  # type: ignore[arg-type]
            if first is None:
                first = (name, w)
            elif w != first[1]:
                out.error(f"{_what(gate)} mixes expert groups of different widths: '{first[0]}' yields {first[1]}, "
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
                      f"'{tr.source}' reads {wa}, '{tr.target}' reads {wb}", tr.keyword_span,
                      "AITM's attention mixes the two towers' inputs, so they need one width")
    return out.items


# --------------------------------------------------------------------------------------------
# 9. Gradient reachability


def check_gradients(model: Model, graph: nx.DiGraph) -> list[Diagnostic]:
    """Warnings for parameters no loss trains (graph.grad_reach from every loss node): a block with no
    path to any loss is unused; a block whose every path to a loss is detached is left unreachable
    by stop-gradient (Note [Gate visibility]). Skipped while a reference is unresolved: the graph is
    then incomplete and every warning would be a consequence of the error."""
    out = _Out([])
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
        what = _what(node, instance=True)
        span = node.name_span
        if n not in used:
            out.warning(f"{what} is unused: no loss depends on it", span, "read it from a block, or remove it")
            continue
        detached = sorted(graph.nodes[v]["name"] for _, v, d in graph.out_edges(n, data=True) if not d["backward"])
        if detached:
            hint = f"{quoted(detached)} mix{'es' if len(detached) == 1 else ''} it `forward` only; " \
                   "add `backward` to one of those routes if it should learn"
        else:
            readers = sorted(graph.nodes[v]["name"] for v in graph.successors(n) if v in used)
            hint = f"it feeds only blocks that get no gradient: {quoted(readers)}"
        out.warning(f"stop-gradient leaves {what} unreachable by any loss", span, hint)
    return out.items


# --------------------------------------------------------------------------------------------
# 10. Training settings


def check_train(model: Model, graph: nx.DiGraph) -> list[Diagnostic]:
    """The `monitor` as the trainer will read it (vocab.parse_monitor): `<output>.<metric>` or `mean.<metric>`
    with a metric the output has. The default, mean.auc, is not the user's choice and is not checked: the
    trainer averages over the outputs that have the metric. lower() checks the other settings."""
    out = _Out([])
    span = model.train.monitor_span
    if span is None:
        return []
    found = parse_monitor(model.train.monitor, {o.name: o.kind for o in model.outputs})
    if isinstance(found, MonitorProblem):
        out.error(found.message, span, found.hint)
    return out.items


# --------------------------------------------------------------------------------------------

CHECKS = (check_names, check_duplicates, check_references, check_kinds, check_structure, check_cycles,
          check_transfers, check_dimensions, check_train, check_pooling)


def validate(model: Model, graph: nx.DiGraph, src: SourceFile | None = None) -> list[Diagnostic]:
    """Every check's findings, without repeats, in source order, with `src` attached for rendering.
    Gradient warnings only when the rest is error-free."""
    found: list[Diagnostic] = []
    for check in CHECKS:
        found.extend(check(model, graph))
    if not any(d.is_error for d in found):
        found.extend(check_gradients(model, graph))
    return [replace(d, source=src) for d in _unique(found)]


def _unique(diagnostics: Sequence[Diagnostic]) -> list[Diagnostic]:
    seen: set[tuple[object, ...]] = set()
    unique = []
    for d in diagnostics:
        key = (d.severity, d.message, d.span, d.hint)
        if key not in seen:
            seen.add(key)
            unique.append(d)
    return sorted(unique, key=sort_key)
