"""The front half of the compiler as one call: text -> syntax -> IR -> graph -> diagnostics.

Takes a spec's text (or path) and optionally its dataset's schema; gives a Checked. The one disk read
besides the spec is here: the schema of the spec's `data` when none is given (lower.py does no I/O).
No torch here: `mtldsl check` and `mtldsl compile` go through this module only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from .catalog import Schema, schema_for
from .diagnostics import NOWHERE, Diagnostic, SourceFile, SpecError, collapse, error
from .graph import build_graph
from .ir import Model
from .lower import DEFAULT_DATA, lower
from .parser import parse_text
from .size import Estimate, check_size, estimate
from .sources import decode, locate
from .syntax import DataDecl, LossDecl, OutputDecl, Spec, TaskDecl
from .validate import validate


@dataclass(frozen=True)
class Checked:
    """Everything the front end learned about one spec. `model` is None only after a syntax error."""

    source: SourceFile
    syntax: Spec | None
    model: Model | None
    graph: nx.DiGraph | None
    diagnostics: tuple[Diagnostic, ...]
    size: Estimate | None = None  # the parameters it allocates, once it is valid (Note [Size limits])

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.is_error)

    @property
    def ok(self) -> bool:
        return not self.errors


def _attach(diags: list[Diagnostic], src: SourceFile) -> tuple[Diagnostic, ...]:
    fixed = [d if d.source is not None else Diagnostic(d.severity, d.message, d.span, d.hint, src) for d in diags]
    return tuple(collapse(fixed))  # sorted, repeats once (Note [Cascades])


def label_columns(spec: Spec) -> tuple[str, ...]:
    """Every column the spec names in a label or `where` expression (tasks, outputs, losses), in spec order."""
    exprs = [e for i in spec.items if isinstance(i, (TaskDecl, OutputDecl, LossDecl)) for e in (i.label, i.where) if e]
    return tuple(dict.fromkeys(c.name for e in exprs for c in e.columns))


def spec_labels(text: str, path: str = "<spec>") -> tuple[str, ...]:
    """label_columns of a spec's text; () when it does not parse (checking it reports that)."""
    parsed = parse_text(text, path)
    return label_columns(parsed) if isinstance(parsed, Spec) else ()


def resolve_schema(spec: Spec, data_dir: str | None = None,
                   data: str | None = None) -> tuple[Schema | None, list[Diagnostic]]:
    """The schema of `data` (default: the spec's first `data` source), or None and why not, said at the `data`
    line. The spec's label columns are labels of an inferred schema (Note [Inferred labels] in catalog.py)."""
    decl = next((i for i in spec.items if isinstance(i, DataDecl)), None)
    source = data or (decl.source if decl else DEFAULT_DATA)
    try:
        return schema_for(source, data_dir, spec_labels=label_columns(spec)), []
    except Exception as exc:  # unknown dataset or unreadable folder
        return None, [error(f"cannot read the schema of dataset '{source}': {exc}", decl.span if decl else NOWHERE)]


def check_text(text: str, path: str = "<spec>", schema: Schema | None = None, data_dir: str | None = None,
               data: str | None = None) -> Checked:
    src = SourceFile(path, text)
    parsed = parse_text(text, path)
    if not isinstance(parsed, Spec):
        return Checked(src, None, None, None, _attach(list(parsed), src))
    diags: list[Diagnostic] = []
    if schema is None:
        schema, diags = resolve_schema(parsed, data_dir, data)
    model, lowered = lower(parsed, schema, path)
    diags += lowered
    graph = build_graph(model)
    diags = diags + validate(model, graph, src)
    size = None
    if not any(d.is_error for d in diags):
        size = estimate(model, graph, schema.vocab_sizes if schema is not None else None)
        diags += check_size(size)
    return Checked(src, parsed, model, graph, _attach(diags, src), size)


def check_bytes(data: bytes, path: str = "<spec>", schema: Schema | None = None, data_dir: str | None = None,
                dataset: str | None = None) -> Checked:
    """check_text of a file's bytes: bytes that are not UTF-8 give one positioned error (sources.decode)."""
    src, problem = decode(data, path)
    if problem is not None:
        return Checked(src, None, None, None, (problem,))
    return check_text(src.text, path, schema=schema, data_dir=data_dir, data=dataset)


def check_file(path: str | Path, schema: Schema | None = None, data_dir: str | None = None,
               data: str | None = None) -> Checked:
    """Check a spec file, or a packaged spec by bare name; sources.SpecNotFound when there is neither. `data`:
    the dataset to check it against (default: the spec's `data`)."""
    spec = locate(path)
    return check_bytes(spec.data, spec.path, schema=schema, data_dir=data_dir, dataset=data)


def load_spec(path: str | Path, schema: Schema | None = None, data_dir: str | None = None) -> Checked:
    """Check a spec; raise SpecError with every diagnostic when it has errors."""
    checked = check_file(path, schema=schema, data_dir=data_dir)
    if not checked.ok:
        raise SpecError(checked.diagnostics)
    return checked
