"""Check how embedding tables read list fields: check_pooling(model, graph) -> list[Diagnostic].

validate.py runs it with its other checks. A list field holds a list of ids per row (Note [List fields]
in runtime/layers.py); the table that selects it must say how to pool it (`pool sum|mean|max`), and a
table that pools must select one. lower() reports an unknown pool mode (and reads it as sum, so nothing
more is said here). Spans come from the IR (Note [Spans in the IR]); no torch, no source.
"""

from __future__ import annotations

import networkx as nx

from .diagnostics import Diagnostic, error, quoted, warning
from .ir import EmbeddingTable, Model
from .vocab import Pooling

POOL_HINT = "add `pool sum`, `pool mean` or `pool max`"


def check_pooling(model: Model, graph: nx.DiGraph) -> list[Diagnostic]:
    """A table selecting list fields pools them; a table with `pool` selects a list field (known only with the
    dataset's schema); `pool max` over a weighted field is a warning, since max ignores weights. Per-task
    tables are reported once, by their declared name."""
    out: list[Diagnostic] = []
    for e in model.embeddings:
        name = e.decl_name
        if e.lists and e.pool is None:
            out.append(error(_unpooled(e), e.list_spans[0] if e.list_spans else e.name_span, POOL_HINT))
        if e.pool is not None and not e.lists and model.data_lists is not None:
            hint = "list fields of the data: " + quoted(model.data_lists) if model.data_lists \
                else f"dataset '{model.data}' has no list fields"
            out.append(error(f"table '{name}' pools, but none of its fields holds a list", e.pool_span, hint))
        if e.pool is Pooling.max and e.weighted:
            fields = quoted(e.weighted)
            out.append(warning(f"table '{name}' pools weighted field{'s' if len(e.weighted) > 1 else ''} {fields} "
                               "with max, which ignores weights", e.pool_span,
                               "use `pool sum` or `pool mean` to weigh the ids"))
    return out


def _unpooled(e: EmbeddingTable) -> str:
    if len(e.lists) == 1:
        return f"field '{e.lists[0]}' holds a list of ids; table '{e.decl_name}' must pool it"
    fields = quoted(e.lists)
    return f"fields {fields} hold lists of ids; table '{e.decl_name}' must pool them"
