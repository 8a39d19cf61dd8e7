"""Print a syntax.Spec as canonical .mtl text: the exact inverse of parser.py.

`parse_text(print_spec(tree)) == tree` for every tree the parser produces (spans are not compared).
The AST records no comments and no layout, so both are dropped: formatting a file removes its comments.
Things the AST cannot tell apart are printed one canonical way: a train value that is a name, a dotted
name or a string is printed bare when it lexes as a name (`optimizer adam`, `monitor cvr.auc`), quoted
otherwise; the interleaving of a gate's properties and routes is not recorded, so the leading `input`
properties come first, then the routes, then the remaining properties (property order is kept).

Canonical layout, deterministic:
- one statement per line, and a blank line wherever the kind of statement changes
  (model/data, task/output, embedding, experts, gate, tower/transfer, loss, train, levels);
- a block on one line, `embedding emb shared { dim 16  fields all }`, when it has no routes and fits in
  100 columns; otherwise one property or route per line, indented by two spaces; `{}` when empty;
- `levels N {` with its blocks indented one step, always multi-line;
- ints with `str`, floats with `repr` (which re-lexes as FLOAT), infinity as `1e999`;
- strings with only the escapes the grammar knows: \\" \\\\ \\n \\t.
A tree the parser cannot produce (a name that is not an identifier, a negative or NaN number, a `ref` input
with two names, ...) raises ValueError instead of printing text that would not parse back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import assert_never

from . import syntax as s
from .diagnostics import SpecError
from .parser import parse_file
from .vocab import TaskKind, names

INDENT = "  "
MAX_WIDTH = 100

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # grammars/mtl.lark: NAME
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")  # DOTTED
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t"}
_Printer = Callable[[object], str]  # a property value → its text


def print_spec(spec: s.Spec) -> str:
    """Canonical text of `spec`, ending in a newline ("" for an empty spec)."""
    lines: list[str] = []
    previous: str | None = None
    for item in spec.items:
        group = _group(item)
        if previous is not None and group != previous:
            lines.append("")
        lines.extend(_item(item, 0))
        previous = group
    return "\n".join(lines) + "\n" if lines else ""


def format_file(path: str | Path) -> str:
    """The canonical text of the spec at `path`; raises SpecError if it does not parse."""
    _, result = parse_file(path)
    if isinstance(result, list):
        raise SpecError(result)
    return print_spec(result)


# ---- statements -------------------------------------------------------------------------------


def _group(item: s.Item) -> str:
    match item:
        case s.ModelDecl() | s.DataDecl():
            return "header"
        case s.TaskDecl() | s.OutputDecl():
            return "tasks"
        case s.TowerDecl() | s.TransferDecl():
            return "towers"
        case _:
            return type(item).__name__


def _item(item: s.Item, depth: int) -> list[str]:
    indent = INDENT * depth
    match item:
        case s.ModelDecl(name=name, doc=doc):
            return [f"{indent}model {_name(name)}" + ("" if doc is None else f" {_string(doc)}")]
        case s.DataDecl(source=source, is_path=is_path):
            return [f"{indent}data {_string(source) if is_path else _name(source)}"]
        case s.TaskDecl(name=name, kind=kind, label=label, where=where):
            if not isinstance(kind, TaskKind):
                raise ValueError(f"task kind must be a TaskKind ({' or '.join(names(TaskKind))}), not {kind!r}")
            return [f"{indent}task {_name(name)} {kind.value} label {_label(label)}{_where(where)}"]
        case s.OutputDecl(name=name, factors=factors, label=label, where=where):
            if len(factors) < 2:
                raise ValueError(f"output {name!r} needs at least two factors")
            text = f"{indent}output {_name(name)} = {' * '.join(_ref(f) for f in factors)}"
            return [text + ("" if label is None else f" label {_label(label)}") + _where(where)]
        case s.LossDecl(output=output, weight=weight, label=label, where=where):
            text = f"{indent}loss {_ref(output)}" + ("" if weight is None else f" weight {_number(weight)}")
            return [text + ("" if label is None else f" label {_label(label)}") + _where(where)]
        case s.EmbeddingDecl(name=name, owner=owner, props=props):
            return _block(f"embedding {_name(name)}{_owner(owner)}", _props(props, _EMBEDDING), depth)
        case s.ExpertsDecl(name=name, owner=owner, props=props):
            return _block(f"experts {_name(name)}{_owner(owner)}", _props(props, _EXPERTS), depth)
        case s.GateDecl(name=name, owner=owner, props=props, routes=routes):
            n_inputs = next((i for i, p in enumerate(props) if p.key != "input"), len(props))
            parts = _props(props[:n_inputs], _GATE) + [_route(r) for r in routes] + _props(props[n_inputs:], _GATE)
            return _block(f"gate {_name(name)}{_owner(owner)}", parts, depth, one_line=not routes)
        case s.TowerDecl(task=task, props=props):
            head = "tower per task" if task is None else f"tower {_ref(task)}"
            return _block(head, _props(props, _TOWER), depth)
        case s.TransferDecl(source=source, target=target, props=props):
            head = f"transfer {_ref(source)} -> {_ref(target)}"
            return _block(head, _props(props, _TRANSFER), depth) if props else [indent + head]
        case s.TrainDecl(props=props):
            return _block("train", [f"{_name(p.key)} {_value(p.value)}" for p in props], depth)
        case s.LevelsDecl(count=count, blocks=blocks):
            if not blocks:
                return [f"{indent}levels {_int(count)} {{}}"]
            lines = [f"{indent}levels {_int(count)} {{"]
            for block in blocks:
                if not isinstance(block, s.ExpertsDecl | s.GateDecl):
                    raise ValueError(f"a levels block holds only experts and gates, not {type(block).__name__}")
                lines.extend(_item(block, depth + 1))
            return [*lines, indent + "}"]
        case _:
            assert_never(item)


def _block(head: str, parts: Sequence[str], depth: int, *, one_line: bool = True) -> list[str]:
    indent = INDENT * depth
    if not parts:
        return [f"{indent}{head} {{}}"]
    line = f"{indent}{head} {{ {'  '.join(parts)} }}"
    if one_line and len(line) <= MAX_WIDTH:
        return [line]
    return [f"{indent}{head} {{", *(indent + INDENT + part for part in parts), indent + "}"]


# ---- tokens -----------------------------------------------------------------------------------


def _name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"not a name: {name!r}")
    return name


def _ref(ref: s.NameRef) -> str:
    return _name(ref.name)


def _int(value: object) -> str:
    if type(value) is not int or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return str(value)


def _number(value: object) -> str:
    if type(value) is int:
        return _int(value)
    if type(value) is not float or math.isnan(value) or math.copysign(1.0, value) < 0:
        raise ValueError(f"expected a non-negative number, got {value!r}")
    return "1e999" if math.isinf(value) else repr(value)  # the parser reads a too-large FLOAT as inf


def _string(text: str) -> str:
    return '"' + "".join(_ESCAPES.get(ch, ch) for ch in text) + '"'


def _column(column: s.Column) -> str:
    return _string(column.name) if column.quoted else _name(column.name)


def _label(label: s.LabelExpr) -> str:
    if not label.columns:
        raise ValueError("a label expression needs at least one column")
    return " * ".join(_column(c) for c in label.columns)


def _where(where: s.LabelExpr | None) -> str:
    return "" if where is None else f" where {_label(where)}"


def _owner(owner: s.Owner | None) -> str:
    match owner:
        case None:
            return ""
        case s.Owner(kind=s.OwnerKind.shared, task=None):
            return " shared"
        case s.Owner(kind=s.OwnerKind.per_task, task=None):
            return " per task"
        case s.Owner(kind=s.OwnerKind.task, task=s.NameRef() as task):
            return f" for {_ref(task)}"
        case _:
            raise ValueError(f"not an owner the parser produces: {owner!r}")


def _route(route: s.RouteDecl) -> str:
    match route.selector, route.task:
        case s.Selector.all, None:
            selector = ""
        case (s.Selector.own | s.Selector.other) as sel, None:
            selector = f"[{sel.value}]"
        case s.Selector.task, s.NameRef() as task:
            selector = f"[{_ref(task)}]"
        case _:
            raise ValueError(f"selector {route.selector} does not match task {route.task!r}")
    for flag in route.flags:
        if flag not in ("forward", "backward"):
            raise ValueError(f"route flags are forward or backward, not {flag!r}")
    return " ".join(["mix " + _ref(route.group) + selector, *route.flags])


# ---- properties -------------------------------------------------------------------------------


def _props(props: Sequence[s.Prop], table: dict[str, _Printer]) -> list[str]:
    out = []
    for prop in props:
        if prop.key not in table:
            raise ValueError(f"unknown property {prop.key!r} here; expected one of {', '.join(table)}")
        out.append(f"{prop.key} {table[prop.key](prop.value)}")
    return out


def _int_list(value: object) -> str:
    if not isinstance(value, tuple):
        raise ValueError(f"expected a tuple of integers, got {value!r}")
    return "[" + ", ".join(_int(x) for x in value) + "]"


def _field_sel(value: object) -> str:
    match value:
        case s.FieldSel(group=str() as group, fields=()):
            return _name(group)
        case s.FieldSel(group=None, fields=fields):
            return "[" + ", ".join(_column(c) for c in fields) + "]"
        case _:
            raise ValueError(f"expected a field group or a field list, got {value!r}")


def _input(value: object) -> str:
    match value:
        case s.InputExpr(op=s.InputOp.ref, refs=(ref,)):
            return _ref(ref)
        case s.InputExpr(op=s.InputOp.sum | s.InputOp.concat as op, refs=refs) if refs:
            return f"{op.value}({', '.join(_ref(r) for r in refs)})"
        case _:
            raise ValueError(f"expected `name`, `sum(...)` or `concat(...)`, got {value!r}")


def _bool(value: object) -> str:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return "true" if value else "false"


_MLP: dict[str, _Printer] = {"mlp": _int_list, "activation": _name, "dropout": _number, "batch_norm": _bool}
_EMBEDDING: dict[str, _Printer] = {"dim": _int, "fields": _field_sel, "dense": _field_sel, "copies": _int,
                                   "pool": _name}
_EXPERTS: dict[str, _Printer] = {"count": _int, "input": _input, **_MLP}
_GATE: dict[str, _Printer] = {"input": _input, **_MLP}
_TOWER = _GATE
_TRANSFER: dict[str, _Printer] = {"calibration": _number}


def _value(value: object) -> str:
    """A train value: the AST keeps a name, a dotted name and a string alike, as str."""
    if isinstance(value, bool):
        return _bool(value)
    if isinstance(value, int | float):
        return _number(value)
    if isinstance(value, str):
        bare = (_NAME.fullmatch(value) or _DOTTED.fullmatch(value)) and value not in ("true", "false")
        return value if bare else _string(value)
    raise ValueError(f"a train value is a number, a name, a string or a boolean, not {value!r}")
