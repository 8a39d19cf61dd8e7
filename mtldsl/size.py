"""How big a model is before it exists: ir.Model + graph + vocabulary sizes -> parameters and bytes.

`estimate` counts the parameters the generated module will allocate, block by block, from the
widths graph.py computes and the layer shapes of runtime/layers.py (tests/test_models.py holds the
count equal to the built module's); `check_size` turns the limits of docs/language.md (Limits) into
Diagnostics, so `mtldsl check` fails fast instead of the allocation failing later (Note [Size limits]).
No torch here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import networkx as nx

from .diagnostics import Diagnostic, Span, error
from .graph import input_width
from .ir import ExpertGroup, Mlp, Model

# Note [Size limits]
# ~~~~~~~~~~~~~~~~~~
# A spec says sizes with integers of any length, and the model is allocated only when it trains, so
# a typo (`count 1000000000000`) used to pass `check` and fail much later, and `levels 100000000`
# hung the unrolling. Three layers stop that, each documented in docs/language.md (Limits):
# parser.py reads no integer of more than MAX_DIGITS digits and no float that overflows to infinity;
# lower.py bounds each size (LIMITS) before it unrolls or multiplies anything; here the parameter
# count of the whole model is bounded by MAX_PARAMETERS, and `check` prints it with its memory.

MAX_DIGITS = 18  # any integer literal
LIMITS = {"levels": 32, "count": 1024, "copies": 1024, "dim": 16384, "width": 65536}
MAX_PARAMETERS = 1_000_000_000  # 4 GB of float32 weights; Adam training needs about 4x that
BYTES_PER_PARAMETER = 4  # float32 weights (bf16 autocast keeps float32 weights, README)


@dataclass(frozen=True)
class Estimate:
    parameters: int
    embedding_rows_known: bool  # False: the vocabulary sizes are unknown, embedding tables are not counted
    largest: tuple[str, int, Span] | None  # the block holding the most parameters: name, count, where declared

    @property
    def bytes(self) -> int:
        return self.parameters * BYTES_PER_PARAMETER

    def describe(self) -> str:
        """`1.2M parameters, 4.6 MiB of float32 weights`."""
        rows = "" if self.embedding_rows_known else " besides the embedding tables (vocabulary sizes unknown)"
        return f"{_count(self.parameters)} parameters{rows}, {_bytes(self.bytes)} of float32 weights"


def _count(n: int) -> str:
    if n >= 10**15:
        return f"{n:.2e}"
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    if n >= 2**50:
        return f"{n:.2e} bytes"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _mlp(d_in: int, mlp: Mlp, n: int = 1) -> tuple[int, int]:
    """Parameters of n parallel MLPs (layers.MLP, or layers.BatchedExperts when n > 1), and their output width."""
    total, d = 0, d_in
    for width in mlp.dims:
        total += n * (d * width + width) + (2 * n * width if mlp.batch_norm else 0)
        total += n if mlp.activation == "prelu" else 0
        d = width
    return total, d


def estimate(model: Model, graph: nx.DiGraph, vocab_sizes: Mapping[str, int] | None) -> Estimate:
    """The parameters of `model` as generated (for a model that passed validation: every width is known)."""
    sizes: dict[str, tuple[int, Span]] = {}
    known = vocab_sizes is not None
    for e in model.embeddings:
        rows = sum(vocab_sizes.get(f, 0) for f in (*e.fields, *e.lists)) if vocab_sizes is not None else 0
        sizes[e.name] = (e.copies * rows * e.dim, e.name_span)
    for x in model.experts:
        d_in = input_width(graph, model, x.input) or 0
        sizes[x.name] = (_mlp(d_in, x.mlp, x.count)[0], x.name_span)
    for g in model.gates:
        n = sum(b.count for r in g.routes if isinstance(b := model.block(r.group), ExpertGroup))
        hidden, d = _mlp(input_width(graph, model, g.input) or 0, g.mlp)
        sizes[g.name] = (hidden + d * n + n + (2 * n if g.mlp.batch_norm else 0), g.name_span)
    towers = {t.task: t for t in model.towers}
    for t in model.towers:
        hidden, d = _mlp(input_width(graph, model, t.input) or 0, t.mlp)
        sizes[t.name] = (hidden + d + 1, t.name_span)
    for tr in model.transfers:
        target = towers.get(tr.target)
        w = (input_width(graph, model, target.input) or 0) if target is not None else 0
        sizes[f"transfer_{tr.source}_{tr.target}"] = (w * w + w + 2 * w + 3 * w * w, tr.keyword_span)
    largest = max(sizes.items(), key=lambda kv: kv[1][0], default=None)
    return Estimate(sum(n for n, _ in sizes.values()), known,
                    (largest[0], largest[1][0], largest[1][1]) if largest else None)


def check_size(found: Estimate) -> list[Diagnostic]:
    """An error at the largest block when the model is above MAX_PARAMETERS (Note [Size limits])."""
    if found.parameters <= MAX_PARAMETERS or found.largest is None:
        return []
    name, n, span = found.largest
    return [error(f"the model has {found.describe()}, above the limit of {_count(MAX_PARAMETERS)} parameters", span,
                  f"'{name}' alone has {_count(n)}; shrink its sizes (docs/language.md, Limits)")]
