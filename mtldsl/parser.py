"""Parse .mtl text into a positioned syntax.Spec, or into Diagnostics for a syntax error.

The grammar is grammars/mtl.lark (LALR, contextual lexer). Lark's exceptions never escape:
`parse_text` returns a Spec or a list of Diagnostics with the expected tokens as the hint. The LALR
parser reports the end of the text as an UnexpectedToken `$END` (only Earley raises UnexpectedEOF).
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedInput, VisitError

from . import syntax as s
from .diagnostics import Diagnostic, SourceFile, Span, error
from .resources import grammar_text
from .size import MAX_DIGITS
from .sources import decode, locate
from .syntax_errors import explain
from .vocab import TaskKind



@functools.cache
def _lark() -> Lark:
    return Lark(
        grammar_text(),
        start="spec",
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        maybe_placeholders=False,
        cache=True,
    )


def _span(meta_or_token: object) -> Span:
    m = meta_or_token
    if getattr(m, "empty", False):
        return Span(1, 1, 1, 1)
    return Span(m.line, m.column, m.end_line, m.end_column)  # type: ignore[attr-defined]


_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t"}


def _unquote(token: Token) -> str:
    # The grammar allows only \" \\ \n \t escapes; any other character stands for itself
    # (ast.literal_eval would reject a raw NUL or carriage return that the grammar accepts).
    return re.sub(r"\\(.)", lambda m: _ESCAPES[m[1]], str(token)[1:-1], flags=re.S)


class _BadLiteral(Exception):
    """A number the grammar accepts but no size or weight can be (Note [Size limits]); parse_text reports it."""

    def __init__(self, token: Token, message: str, hint: str) -> None:
        super().__init__(message)
        self.span, self.hint = _span(token), hint


def _number(token: Token) -> int | float:
    if token.type == "INT":
        if len(token.lstrip("0")) > MAX_DIGITS:
            raise _BadLiteral(token, f"integer with more than {MAX_DIGITS} digits",
                              "sizes have limits (docs/language.md, Limits)")
        return int(token)
    value = float(token)
    if not math.isfinite(value):
        raise _BadLiteral(token, f"number {_clip(str(token))} is too large: it is infinite as a float",
                          "write a finite number")
    return value


def _clip(text: str, limit: int = 24) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@v_args(meta=True)
class _ToSyntax(Transformer):
    """One method per grammar alias; each returns a syntax node (or a typed value for props)."""

    def spec(self, meta, items):
        return s.Spec(tuple(items), _span(meta))

    def model_decl(self, meta, c):
        return s.ModelDecl(str(c[0]), _unquote(c[1]) if len(c) > 1 else None, _span(meta), _span(c[0]))

    def data_decl(self, meta, c):
        return c[0]

    def source_name(self, meta, c):
        return s.DataDecl(str(c[0]), False, _span(c[0]))

    def source_path(self, meta, c):
        return s.DataDecl(_unquote(c[0]), True, _span(c[0]))

    def name_ref(self, meta, c):
        return s.NameRef(str(c[0]), _span(c[0]))

    def column_name(self, meta, c):
        return s.Column(str(c[0]), False, _span(c[0]))

    def column_string(self, meta, c):
        return s.Column(_unquote(c[0]), True, _span(c[0]))

    field_name = column_name
    field_string = column_string

    def label_expr(self, meta, c):
        return s.LabelExpr(tuple(c), _span(meta))

    def where(self, meta, c):
        return ("where", c[0])

    def binary(self, meta, c):
        return TaskKind.binary

    def regression(self, meta, c):
        return TaskKind.regression

    def task_decl(self, meta, c):
        where = c[3][1] if len(c) > 3 else None
        return s.TaskDecl(str(c[0]), c[1], c[2], where, _span(meta), _span(c[0]))

    def output_decl(self, meta, c):
        factors = tuple(x for x in c[1:] if isinstance(x, s.NameRef))
        label = next((x for x in c[1:] if isinstance(x, s.LabelExpr)), None)
        where = next((x[1] for x in c[1:] if isinstance(x, tuple)), None)
        return s.OutputDecl(str(c[0]), factors, label, where, _span(meta), _span(c[0]))

    def loss_weight(self, meta, c):
        return ("weight", _number(c[0]))

    def loss_label(self, meta, c):
        return ("label", c[0])

    def loss_where(self, meta, c):
        return c[0]

    def loss_decl(self, meta, c):
        props: dict[str, object] = {}
        for key, value in c[1:]:
            props[key] = value  # a repeated property keeps the last (nothing reports the repeat yet)
        weight = props.get("weight")
        return s.LossDecl(
            c[0],
            weight,  # type: ignore[arg-type]
            props.get("label"),  # type: ignore[arg-type]
            props.get("where"),  # type: ignore[arg-type]
            _span(meta),
        )

    def owner_shared(self, meta, c):
        return s.Owner(s.OwnerKind.shared, None, _span(meta))

    def owner_per_task(self, meta, c):
        return s.Owner(s.OwnerKind.per_task, None, _span(meta))

    def owner_task(self, meta, c):
        return s.Owner(s.OwnerKind.task, c[0], _span(meta))

    def field_group(self, meta, c):
        return s.FieldSel(str(c[0]), (), _span(meta))

    def field_list(self, meta, c):
        return s.FieldSel(None, tuple(x for x in c if x is not None), _span(meta))

    def int_list(self, meta, c):
        return tuple(int(_number(x)) for x in c if x is not None)

    def _prop(key):  # noqa: N805 - a factory used in the class body
        def method(self, meta, c):
            value = c[0]
            if isinstance(value, Token):
                value = {"INT": _number, "FLOAT": _number, "BOOL": lambda t: t == "true", "NAME": str}[value.type](value)
            return s.Prop(key, value, _span(meta))

        return method

    emb_dim = _prop("dim")
    emb_fields = _prop("fields")
    emb_dense = _prop("dense")
    emb_copies = _prop("copies")
    emb_pool = _prop("pool")
    experts_count = _prop("count")
    block_input = _prop("input")
    mlp_dims = _prop("mlp")
    mlp_activation = _prop("activation")
    mlp_dropout = _prop("dropout")
    mlp_batch_norm = _prop("batch_norm")
    transfer_calibration = _prop("calibration")

    def input_ref(self, meta, c):
        return s.InputExpr(s.InputOp.ref, tuple(c), _span(meta))

    def input_sum(self, meta, c):
        return s.InputExpr(s.InputOp.sum, tuple(c), _span(meta))

    def input_concat(self, meta, c):
        return s.InputExpr(s.InputOp.concat, tuple(c), _span(meta))

    def _block(cls):  # noqa: N805
        def method(self, meta, c):
            owner = c[1] if len(c) > 1 and isinstance(c[1], s.Owner) else None
            rest = c[2:] if owner is not None else c[1:]
            props = tuple(x for x in rest if isinstance(x, s.Prop))
            if cls is s.GateDecl:
                routes = tuple(x for x in rest if isinstance(x, s.RouteDecl))
                return s.GateDecl(str(c[0]), owner, props, routes, _span(meta), _span(c[0]))
            return cls(str(c[0]), owner, props, _span(meta), _span(c[0]))

        return method

    embedding_decl = _block(s.EmbeddingDecl)
    experts_decl = _block(s.ExpertsDecl)
    gate_decl = _block(s.GateDecl)

    def select_own(self, meta, c):
        return (s.Selector.own, None)

    def select_other(self, meta, c):
        return (s.Selector.other, None)

    def select_task(self, meta, c):
        return (s.Selector.task, c[0])

    def route_target(self, meta, c):
        selector, task = c[1] if len(c) > 1 else (s.Selector.all, None)
        return (c[0], selector, task)

    def route(self, meta, c):
        group, selector, task = c[0]
        return s.RouteDecl(group, selector, task, tuple(str(f) for f in c[1:]), _span(meta))

    def tower_per_task(self, meta, c):
        return None

    def tower_for(self, meta, c):
        return c[0]

    def tower_decl(self, meta, c):
        return s.TowerDecl(c[0], tuple(c[1:]), _span(meta))

    def transfer_decl(self, meta, c):
        return s.TransferDecl(c[0], c[1], tuple(c[2:]), _span(meta))

    def levels_decl(self, meta, c):
        return s.LevelsDecl(int(_number(c[0])), tuple(c[1:]), _span(meta))

    def train_decl(self, meta, c):
        return s.TrainDecl(tuple(c), _span(meta))

    def train_prop(self, meta, c):
        value, value_span = c[1]
        return s.Prop(str(c[0]), value, _span(meta), value_span)

    # A train value comes with its own span: validate.py points at the monitor's value.
    def value_number(self, meta, c):
        return _number(c[0]), _span(c[0])

    def value_name(self, meta, c):
        return str(c[0]), _span(c[0])

    def value_string(self, meta, c):
        return _unquote(c[0]), _span(c[0])

    def value_bool(self, meta, c):
        return str(c[0]) == "true", _span(c[0])


def parse_text(text: str, path: str = "<spec>") -> s.Spec | list[Diagnostic]:
    """A Spec, or a one-element list with the first syntax error (LALR stops there)."""
    src = SourceFile(path, text)
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as exc:
        return [explain(exc, src, _lark())]
    try:
        return _ToSyntax().transform(tree)
    except VisitError as exc:  # a literal the grammar let through but no value can be
        if isinstance(exc.orig_exc, _BadLiteral):
            return [error(str(exc.orig_exc), exc.orig_exc.span, exc.orig_exc.hint, src)]
        return [error(f"cannot read this value: {exc.orig_exc}", _span(exc.obj.meta), None, src)]


def parse_file(path: str | Path) -> tuple[SourceFile, s.Spec | list[Diagnostic]]:
    """Parse a spec file (or a packaged spec by bare name); bytes that are not UTF-8 give their Diagnostic."""
    spec = locate(path)
    src, problem = decode(spec.data, spec.path)
    return src, ([problem] if problem else parse_text(src.text, spec.path))
