"""ir.Model + graph -> view objects -> Jinja (templates/model.py.j2) -> Python source text.

Python makes every decision here (names, widths, expressions, order); the templates only lay the
file out. The building blocks between the `mtldsl:standalone` markers of runtime/layers.py are
copied verbatim, so the generated file imports only torch. Same spec, same bytes: no timestamps,
no absolute paths, declarations in spec order, floats via repr.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import jinja2
import networkx as nx

from . import __version__, names
from .graph import input_width, producer_id
from .ir import Combine, EmbeddingTable, ExpertGroup, Gate, Input, Model
from .resources import template_text
from .vocab import TaskKind

LAYERS = Path(__file__).resolve().parent / "runtime" / "layers.py"
BEGIN = "# mtldsl:standalone begin (from mtldsl/runtime/layers.py)"
END = "# mtldsl:standalone end"


class CodegenError(Exception):
    """A name or value that must never reach generated code (validate.py should have caught it)."""


def ident(name: str, local: bool = False) -> str:
    """The one template filter: re-check every name placed into code with names.name_problem (Note [Safe names]).

    The template sees final names, generated ones included (`h_ctr`, `tower_ctr`), so it checks them as
    attributes; the builder below passes `local=True` for the spec's names that forward() binds.
    """
    if not isinstance(name, str) or names.name_problem(name, local) is not None:
        raise CodegenError(f"refusing to emit {name!r} as a Python identifier")
    return name


def class_name(model_name: str) -> str:
    """The generated class: names.class_name's spelling (one rule, so the collision check sees it) of a checked name."""
    if names.class_problem(ident(model_name)) is not None:
        raise CodegenError(f"refusing to emit class {names.class_name(model_name)!r}")
    return names.class_name(model_name)


def standalone_layers() -> str:
    text = LAYERS.read_text(encoding="utf-8")
    start, end = text.index(BEGIN), text.index(END)
    return text[start: end + len(END)]


# ---- views -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stmt:
    """One line of forward(): `target = expr  # comment`."""

    target: str
    expr: str
    comment: str
    pad: str = ""  # spaces that align the comments of consecutive lines


@dataclass(frozen=True)
class Attr:
    """One line of __init__: `self.name = ctor  # comment`."""

    name: str
    ctor: str
    comment: str


@dataclass(frozen=True)
class View:
    header: str
    docstring: str
    class_name: str
    sparse_fields: str
    dense_fields: str
    list_fields: str  # "" when the model reads no list field: LIST_FIELDS is not declared
    weighted_fields: str
    outputs: str
    uses_sparse: bool
    uses_dense: bool
    attrs: list[Attr]
    stmts: list[Stmt]
    returns: str
    layers: str


def _tuple(values: tuple | list) -> str:
    items = [repr(v) for v in values]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


class _Builder:
    def __init__(self, model: Model, graph: nx.DiGraph) -> None:
        self.m = model
        self.g = graph
        self.col = {f: i for i, f in enumerate(model.sparse_fields)}
        self.dcol = {f: i for i, f in enumerate(model.dense_fields)}
        self.lcol = {f: i for i, f in enumerate(model.list_fields)}
        self.attrs: list[Attr] = []
        self.stmts: list[Stmt] = []

    def width(self, name: str) -> int:
        return int(self.g.nodes[producer_id(self.m, name)]["width"])

    def ref(self, name: str, reader_count: int | None = None) -> str:
        """How a reader sees block `name`: (B, d), except a copied table read by a matching group."""
        block = self.m.block(name)
        if isinstance(block, EmbeddingTable) and block.copies > 1:
            return ident(name, True) if reader_count == block.copies else f"{ident(name, True)}.sum(dim=1)"
        if isinstance(block, ExpertGroup):
            return f"{ident(name, True)}.squeeze(1)"
        return ident(name, True)

    def input(self, inp: Input, reader_count: int | None = None) -> str:
        parts = [self.ref(r, reader_count) for r in inp.refs]
        if len(parts) == 1:
            return parts[0]
        if inp.op is Combine.concat:
            return "torch.cat([" + ", ".join(parts) + "], dim=1)"
        return " + ".join(parts)

    def input_width(self, inp: Input) -> int:
        w = input_width(self.g, self.m, inp)
        if w is None:
            raise CodegenError(f"input {inp.refs} has no single width")
        return w

    def embedding(self, e: EmbeddingTable) -> None:
        cols = tuple(self.col[f] for f in e.fields)
        all_cols = cols == tuple(range(len(self.m.sparse_fields)))
        dcols = tuple(self.dcol[f] for f in e.dense)
        vocab = "v" if all_cols else "[v[i] for i in " + _tuple(cols) + "]" if cols else "()"
        lists, bags = self.bags(e)
        parts = [f"{len(e.fields)} fields x {e.dim}"] if e.fields or not lists else []
        if lists:
            parts.append(f"{len(e.lists)} list{'s' if len(e.lists) > 1 else ''} x {e.dim} ({e.pool.value})")  # type: ignore[union-attr]
        self.attrs.append(Attr(
            ident(e.name, True),
            f"FusedEmbedding(vocab_sizes={vocab}, dim={e.dim}, sparse_columns={None if all_cols else _tuple(cols)}, "
            f"dense_columns={_tuple(dcols) if dcols else None}, copies={e.copies}, sparse_grad=sparse_grad{lists})",
            " + ".join(parts) + (f" + {len(e.dense)} dense" if e.dense else "")
            + (f", {e.copies} copies" if e.copies > 1 else ""),
        ))
        shape = f"(B, {e.copies}, {e.width})" if e.copies > 1 else f"(B, {e.width})"
        dense = "dense" if dcols else "None"
        sparse = "sparse" if e.fields else "None"
        self.stmts.append(Stmt(ident(e.name, True), f"self.{ident(e.name, True)}({sparse}, {dense}{bags})", shape))

    def bags(self, e: EmbeddingTable) -> tuple[str, str]:
        """The constructor's list arguments and the call's batch tensors (Note [List fields]); "" without lists."""
        if not e.lists or e.pool is None:
            return "", ""
        lcols = tuple(self.lcol[f] for f in e.lists)
        vocab = "lv" if lcols == tuple(range(len(self.m.list_fields))) else "[lv[i] for i in " + _tuple(lcols) + "]"
        weighted = tuple(f in e.weighted for f in e.lists)
        keys = [f"{f}.{part}" for f in e.lists for part in ("ids", "offsets", *(("weights",) if f in e.weighted else ()))]
        tensors = ", ".join(f"batch[{k!r}]" for k in keys)
        return (f", list_vocab_sizes={vocab}, pool={e.pool.value!r}, weighted={_tuple(weighted)}",
                f", ({tensors}{',' if len(keys) == 1 else ''})")

    def experts(self, x: ExpertGroup) -> None:
        ref = self.m.block(x.input.refs[0]) if len(x.input.refs) == 1 else None
        per_copy = isinstance(ref, EmbeddingTable) and ref.copies > 1 and ref.copies == x.count
        d_in = self.input_width(x.input)
        self.attrs.append(Attr(
            ident(x.name, True),
            f"BatchedExperts(n={x.count}, d_in={d_in}, dims={_tuple(x.mlp.dims)}, activation={x.mlp.activation!r}, "
            f"dropout={x.mlp.dropout!r}, batch_norm={x.mlp.batch_norm})",
            f"{x.count} x MLP {d_in} -> " + " -> ".join(map(str, x.mlp.dims)) + (", one copy each" if per_copy else ""),
        ))
        self.stmts.append(Stmt(ident(x.name, True), f"self.{ident(x.name, True)}({self.input(x.input, x.count)})",
                               f"(B, {x.count}, {x.mlp.dims[-1]})"))

    def gate(self, gate: Gate) -> None:
        parts, notes, n = [], [], 0
        for r in gate.routes:
            group = self.m.block(r.group)
            assert isinstance(group, ExpertGroup)
            n += group.count
            parts.append(ident(r.group, True) + ("" if r.backward else ".detach()"))
            if not r.backward:
                notes.append(f"{r.group} forward only")
        d_in = self.input_width(gate.input)
        d_out = self.width(gate.name)
        self.attrs.append(Attr(
            ident(gate.name, True),
            f"Gate(d_in={d_in}, n_experts={n}, dims={_tuple(gate.mlp.dims)}, activation={gate.mlp.activation!r}, "
            f"dropout={gate.mlp.dropout!r}, batch_norm={gate.mlp.batch_norm})",
            f"softmax over {n} experts",
        ))
        mixed = parts[0] if len(parts) == 1 else "torch.cat([" + ", ".join(parts) + "], dim=1)"
        comment = f"(B, {d_out})" + (f"  {gate.name}: " + ", ".join(notes) if notes else "")
        self.stmts.append(Stmt(ident(gate.name, True), f"mix(self.{ident(gate.name, True)}({self.input(gate.input)}), {mixed})",
                               comment))

    def build(self) -> None:
        order = {n: i for i, n in enumerate(self.g.nodes)}
        for nid in nx.lexicographical_topological_sort(self.g, key=lambda n: order[n]):
            data = self.g.nodes[nid]
            kind, block = data["kind"], data["block"]
            if kind == "emb":
                self.embedding(block)
            elif kind == "experts":
                self.experts(block)
            elif kind == "gate":
                self.gate(block)
        self.heads()

    def heads(self) -> None:
        # Tower inputs first (h_<task>), then AITM transfers in chain order, then the towers.
        towers = {t.task: t for t in self.m.towers}
        transferred = {x for tr in self.m.transfers for x in (tr.source, tr.target)}
        h = {}  # the expression each tower reads
        for t in self.m.towers:
            expr = self.input(t.input)
            if t.task in transferred or not expr.isidentifier():
                self.stmts.append(Stmt(f"h_{ident(t.task, True)}", expr, f"(B, {self.input_width(t.input)})"))
                expr = f"h_{ident(t.task, True)}"
            h[t.task] = expr
        for tr in self.m.transfers:
            name = f"transfer_{ident(tr.source, True)}_{ident(tr.target, True)}"
            w = self.input_width(towers[tr.target].input)
            self.attrs.append(Attr(name, f"InfoTransfer(dim={w})", f"{tr.source} -> {tr.target} attention"))
            self.stmts.append(Stmt(f"h_{ident(tr.target, True)}",
                                   f"self.{name}(h_{ident(tr.target, True)}, h_{ident(tr.source, True)})", f"(B, {w})"))
        kinds = {t.name: t.kind for t in self.m.tasks}
        for t in self.m.towers:
            w = self.input_width(t.input)
            self.attrs.append(Attr(
                ident(t.name),
                f"Tower(d_in={w}, dims={_tuple(t.mlp.dims)}, activation={t.mlp.activation!r}, "
                f"dropout={t.mlp.dropout!r}, batch_norm={t.mlp.batch_norm})",
                f"{t.task}: " + " -> ".join(map(str, (w, *t.mlp.dims, 1))),
            ))
            logit = f"self.{ident(t.name)}({h[t.task]})"
            binary = kinds.get(t.task) is TaskKind.binary
            self.stmts.append(Stmt(ident(t.task, True), f"torch.sigmoid({logit})" if binary else logit, "(B,)"))
        for o in self.m.outputs:
            if o.factors:
                self.stmts.append(Stmt(ident(o.name, True), " * ".join(ident(f, True) for f in o.factors), "(B,)"))


def _describe(model: Model) -> str:
    tasks = ", ".join(f"{t.name}" for t in model.tasks)
    kinds = sorted({t.kind.value for t in model.tasks})
    shared = sum(1 for e in model.embeddings if e.owner is None)
    per_task = len(model.embeddings) - shared
    emb = f"{shared} shared" + (f" + {per_task} per task" if per_task else "")
    levels = f", {model.levels} levels" if model.levels > 1 else ""
    return (f"{model.doc}{levels}. Tasks: {tasks} ({', '.join(kinds)}). Embedding tables: {emb}. "
            f"Outputs: {', '.join(o.name for o in model.outputs)}.")


def _display_path(path: str) -> str:
    p = Path(path)
    if p.is_absolute():
        try:
            return p.relative_to(Path.cwd()).as_posix()
        except ValueError:
            return p.name
    return p.as_posix()


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(template_text),  # the packaged templates (Note [Packaged resources])
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["ident"] = ident
    return env


def view(model: Model, graph: nx.DiGraph, spec_text: str) -> View:
    b = _Builder(model, graph)
    b.build()
    digest = hashlib.sha256(spec_text.encode("utf-8")).hexdigest()[:12]
    header = (f"# @generated by mtldsl {__version__} from {_display_path(model.path)} (spec sha256 {digest}). "
              "Do not edit: change the spec and recompile.")
    col = max((n for s in b.stmts if (n := len(s.target) + len(s.expr) + 3) <= 72), default=0)
    stmts = [Stmt(s.target, s.expr, s.comment, " " * max(col - len(s.target) - len(s.expr) - 3, 0)) for s in b.stmts]
    returns = "{" + ", ".join(f"{o.name!r}: {ident(o.name, True)}" for o in model.outputs) + "}"
    return View(
        header="".join(c if c.isprintable() else "?" for c in header),  # a path cannot break out of the comment
        docstring=repr(_describe(model)),
        class_name=class_name(model.name),
        sparse_fields=_tuple(model.sparse_fields),
        dense_fields=_tuple(model.dense_fields),
        list_fields=_tuple(model.list_fields) if model.list_fields else "",
        weighted_fields=_tuple(model.weighted_fields),
        outputs=_tuple(tuple(o.name for o in model.outputs)),
        uses_sparse=bool(model.sparse_fields),
        uses_dense=bool(model.dense_fields),
        attrs=b.attrs,
        stmts=stmts,
        returns=returns,
        layers=standalone_layers(),
    )


def render(model: Model, graph: nx.DiGraph, spec_text: str) -> str:
    return _env().get_template("model.py.j2").render(v=view(model, graph, spec_text))


def write_if_changed(path: Path, text: str) -> bool:
    """Atomically write `text` unless the file already holds it; True when written."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return True
