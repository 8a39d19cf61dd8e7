"""The front half of the compiler as one call: text -> syntax -> IR -> graph -> diagnostics.

No torch here: `mtldsl check` and `mtldsl compile` go through this module only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from .catalog import Schema
from .diagnostics import Diagnostic, SourceFile, SpecError, sort_key
from .graph import build_graph
from .ir import Model, lower
from .parser import parse_text
from .syntax import Spec
from .validate import validate


@dataclass(frozen=True)
class Checked:
    """Everything the front end learned about one spec. `model` is None only after a syntax error."""

    source: SourceFile
    syntax: Spec | None
    model: Model | None
    graph: nx.DiGraph | None
    diagnostics: tuple[Diagnostic, ...]

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.is_error)

    @property
    def ok(self) -> bool:
        return not self.errors


def _attach(diags: list[Diagnostic], src: SourceFile) -> tuple[Diagnostic, ...]:
    fixed = [d if d.source is not None else Diagnostic(d.severity, d.message, d.span, d.hint, src) for d in diags]
    return tuple(sorted(fixed, key=sort_key))


def check_text(text: str, path: str = "<spec>", schema: Schema | None = None, data_dir: str | None = None) -> Checked:
    src = SourceFile(path, text)
    parsed = parse_text(text, path)
    if not isinstance(parsed, Spec):
        return Checked(src, None, None, None, _attach(list(parsed), src))
    model, diags = lower(parsed, src, schema=schema, data_dir=data_dir)
    graph = build_graph(model)
    diags = diags + validate(model, graph, src)
    return Checked(src, parsed, model, graph, _attach(diags, src))


def check_file(path: str | Path, schema: Schema | None = None, data_dir: str | None = None) -> Checked:
    return check_text(Path(path).read_text(encoding="utf-8"), str(path), schema=schema, data_dir=data_dir)


def load_spec(path: str | Path, schema: Schema | None = None, data_dir: str | None = None) -> Checked:
    """Check a spec; raise SpecError with every diagnostic when it has errors."""
    checked = check_file(path, schema=schema, data_dir=data_dir)
    if not checked.ok:
        raise SpecError(checked.diagnostics)
    return checked
