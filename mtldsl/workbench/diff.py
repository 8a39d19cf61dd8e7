"""Structural differences between two checked specs, read from their graphs (graph.py), not their text.

Takes two pipeline.Checked; gives a list of Change lines: blocks added, removed or renamed, properties
changed (dims, counts, fields, domains...), tables that became per task, and edges (routes, inputs, links,
losses) added, removed or whose visibility changed. No torch. Note [Structural diff] says how blocks of
the two graphs are paired.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import networkx as nx

from ..ir import EmbeddingTable, ExpertGroup, Gate, Loss, Model, Output, Tower, Transfer
from ..pipeline import Checked

__all__ = ["Change", "diff_checked", "format_changes"]

# Note [Structural diff]
# ~~~~~~~~~~~~~~~~~~~~~~
# Two specs are equal when their graphs are: the same blocks with the same properties, joined by the same
# edges with the same forward/backward flags, and the same tasks and training settings. The model's name,
# its doc string and the text's layout never count. Blocks are paired in three passes:
# 1. by node id (`<kind>:<instance>`, graph.py);
# 2. by declaration: a declaration whose instances changed shape (a table or group that became `per task`,
#    or stopped being) is one change, and its instances stand for one another in the edge comparison;
# 3. by structure, for renames: a remaining block of A pairs with the one block of B of the same kind whose
#    properties and edge pattern (neighbour kinds, roles, flags) are equal to its own, when exactly one is.
# Edges are then compared through that pairing (B's names), so a rename is one line, not a removed block,
# an added block and every edge around them.


@dataclass(frozen=True)
class Change:
    """One difference: `op` is `-` (only in A), `+` (only in B) or `~` (in both, changed)."""

    op: str
    what: str

    def __str__(self) -> str:
        return f"{self.op} {self.what}"


_KIND_WORD = {"emb": "embedding", "experts": "experts", "gate": "gate", "tower": "tower", "transfer": "transfer",
              "output": "output", "loss": "loss"}


def _mlp(block: Any) -> dict[str, Any]:
    m = block.mlp
    return {"mlp": list(m.dims), "activation": m.activation, "dropout": m.dropout, "batch_norm": m.batch_norm}


def _owner(block: Any) -> str:
    return "per task" if block.per_task else ("shared" if block.owner is None else f"for {block.owner}")


def _props(block: Any) -> dict[str, Any]:
    """The properties of a block that are not references to other blocks (edges carry those)."""
    match block:
        case EmbeddingTable():
            return {"owner": _owner(block), "dim": block.dim, "fields": list(block.fields), "dense": list(block.dense),
                    "lists": list(block.lists), "copies": block.copies, "pool": block.pool and block.pool.value}
        case ExpertGroup():
            return {"owner": _owner(block), "count": block.count, "input": block.input.op.value, **_mlp(block)}
        case Gate():
            return {"owner": _owner(block), "input": block.input.op.value, **_mlp(block)}
        case Tower():
            return {"input": block.input.op.value, **_mlp(block)}
        case Transfer():
            return {"calibration": block.calibration}
        case Output():
            return {"kind": block.kind.value, "label": list(block.label or ()), "where": list(block.where or ())}
        case Loss():
            return {"label": list(block.label), "weight": block.weight, "where": list(block.where or ())}
    return {}


def _edges(graph: nx.DiGraph, node: str) -> tuple[Any, ...]:
    kind = graph.nodes
    ins = sorted((kind[u]["kind"], d["role"], d["backward"]) for u, _, d in graph.in_edges(node, data=True))
    outs = sorted((kind[v]["kind"], d["role"], d["backward"]) for _, v, d in graph.out_edges(node, data=True))
    return tuple(ins), tuple(outs)


def _signature(graph: nx.DiGraph, node: str) -> tuple[Any, ...]:
    data = graph.nodes[node]
    return data["kind"], repr(sorted(_props(data["block"]).items())), _edges(graph, node)


def _label(graph: nx.DiGraph, node: str) -> str:
    data = graph.nodes[node]
    return f"{_KIND_WORD[data['kind']]} {data['name']}"


def _decl(graph: nx.DiGraph, node: str) -> tuple[str, str, int] | None:
    block = graph.nodes[node]["block"]
    if isinstance(block, (EmbeddingTable, ExpertGroup, Gate)):
        return graph.nodes[node]["kind"], block.decl_name, getattr(block, "level", 0)
    return None


def _pair_declarations(a: nx.DiGraph, b: nx.DiGraph, left: set[str], right: set[str],
                       pairing: dict[str, list[str]], changes: list[Change]) -> None:
    """Pass 2 of Note [Structural diff]: declarations whose instances changed (shared <-> per task)."""
    def groups(graph: nx.DiGraph, nodes: set[str]) -> dict[tuple[str, str, int], list[str]]:
        out: dict[tuple[str, str, int], list[str]] = {}
        for n in sorted(nodes):
            key = _decl(graph, n)
            if key is not None:
                out.setdefault(key, []).append(n)
        return out

    ga, gb = groups(a, left), groups(b, right)
    for key in sorted(ga.keys() & gb.keys()):
        na, nb = ga[key], gb[key]
        owner_a, owner_b = _owner(a.nodes[na[0]]["block"]), _owner(b.nodes[nb[0]]["block"])
        names_b = ", ".join(b.nodes[n]["name"] for n in nb)
        names_a = ", ".join(a.nodes[n]["name"] for n in na)
        changes.append(Change("~", f"{_KIND_WORD[key[0]]} {key[1]}: {owner_a} ({names_a}) -> {owner_b} ({names_b})"))
        for n in na:  # each instance of A stands for every instance of B (Note [Structural diff])
            pairing[n] = list(nb)
        left.difference_update(na)
        right.difference_update(nb)


def _pair_by_structure(a: nx.DiGraph, b: nx.DiGraph, left: set[str], right: set[str],
                       pairing: dict[str, list[str]], changes: list[Change]) -> None:
    """Pass 3 of Note [Structural diff]: renames."""
    sig_b: dict[tuple[Any, ...], list[str]] = {}
    for n in sorted(right):
        sig_b.setdefault(_signature(b, n), []).append(n)
    sig_a: dict[tuple[Any, ...], list[str]] = {}
    for n in sorted(left):
        sig_a.setdefault(_signature(a, n), []).append(n)
    for sig, na in sig_a.items():
        nb = sig_b.get(sig, [])
        if len(na) == 1 and len(nb) == 1:
            pairing[na[0]] = [nb[0]]
            left.discard(na[0])
            right.discard(nb[0])
            changes.append(Change("~", f"{_label(a, na[0])} renamed {b.nodes[nb[0]]['name']}"))


def _compare_props(a: nx.DiGraph, b: nx.DiGraph, pairing: Mapping[str, list[str]], changes: list[Change]) -> None:
    for na, nbs in sorted(pairing.items()):
        nb = nbs[0]
        if getattr(a.nodes[na]["block"], "per_task", False) != getattr(
                b.nodes[nb]["block"], "per_task", False):
            continue  # a declaration that became per task (or stopped being) is one line already
        pa, pb = _props(a.nodes[na]["block"]), _props(b.nodes[nb]["block"])
        for key in pa:
            if pa[key] != pb.get(key):
                changes.append(Change("~", f"{_label(b, nb)}: {key} {_show(pa[key])} -> {_show(pb.get(key))}"))


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return "none" if value is None else str(value)


def _visibility(data: Mapping[str, Any]) -> str:
    return "forward+backward" if data["backward"] else "forward only"


def _edge_map(graph: nx.DiGraph, pairing: Mapping[str, list[str]],
              graph_b: nx.DiGraph) -> dict[tuple[str, str, str], set[str]]:
    """Edges by (source, target, role) in B's names; an A block paired with several B blocks (a declaration
    that became per task) stands for each, and an edge between two such blocks joins instances of one task."""
    out: dict[tuple[str, str, str], set[str]] = {}
    owner = {n: graph_b.nodes[n]["block"].owner for nbs in pairing.values() if len(nbs) > 1 for n in nbs}
    for u, v, d in graph.edges(data=True):
        us, vs = pairing.get(u, [u]), pairing.get(v, [v])
        pairs = [(pu, pv) for pu in us for pv in vs
                 if len(us) == 1 or len(vs) == 1 or owner[pu] == owner[pv]]  # per task stays per task
        for pu, pv in pairs:
            out.setdefault((pu, pv, d["role"]), set()).add(_visibility(d))
    return out


def _edge_text(graph: nx.DiGraph, u: str, v: str, role: str) -> str:
    name = lambda n: graph.nodes[n]["name"] if n in graph else n.partition(":")[2]  # noqa: E731
    if role == "mix":
        return f"route {name(u)} -> gate {name(v)}"
    if role == "loss":
        return f"loss on {name(u)}"
    if role == "factor":
        return f"link {name(u)} -> output {name(v)}"
    return f"{role} {name(u)} -> {_label(graph, v) if v in graph else name(v)}"


def _compare_edges(a: nx.DiGraph, b: nx.DiGraph, pairing: Mapping[str, list[str]], changes: list[Change]) -> None:
    ea, eb = _edge_map(a, pairing, b), _edge_map(b, {}, b)
    for key in sorted(ea.keys() | eb.keys()):
        u, v, role = key
        if key not in eb:
            changes.append(Change("-", f"{_edge_text(b, u, v, role)} ({', '.join(sorted(ea[key]))})"))
        elif key not in ea:
            changes.append(Change("+", f"{_edge_text(b, u, v, role)} ({', '.join(sorted(eb[key]))})"))
        elif ea[key] != eb[key]:
            changes.append(Change("~", f"{_edge_text(b, u, v, role)}: {' / '.join(sorted(ea[key]))} -> "
                                       f"{' / '.join(sorted(eb[key]))}"))


def _compare_model(a: Model, b: Model, changes: list[Change]) -> None:
    """Tasks, levels and training settings: what the graph does not hold."""
    tasks_a, tasks_b = {t.name: t for t in a.tasks}, {t.name: t for t in b.tasks}
    for name in tasks_a.keys() - tasks_b.keys():
        changes.append(Change("-", f"task {name}"))
    for name in tasks_b.keys() - tasks_a.keys():
        changes.append(Change("+", f"task {name}"))
    for name in sorted(tasks_a.keys() & tasks_b.keys()):
        ta, tb = tasks_a[name], tasks_b[name]
        for key in ("kind", "label", "where"):
            va, vb = getattr(ta, key), getattr(tb, key)
            if va != vb:
                changes.append(Change("~", f"task {name}: {key} {_task_value(va)} -> {_task_value(vb)}"))
    if a.levels != b.levels:
        changes.append(Change("~", f"levels {a.levels} -> {b.levels}"))
    if a.data != b.data:
        changes.append(Change("~", f"data {a.data} -> {b.data}"))
    for key, info in type(a.train).model_fields.items():
        if not info.exclude and getattr(a.train, key) != getattr(b.train, key):
            changes.append(Change("~", f"train {key} {getattr(a.train, key)} -> {getattr(b.train, key)}"))


def _task_value(value: Any) -> str:
    if isinstance(value, tuple):
        return " * ".join(value)
    return "none" if value is None else getattr(value, "value", str(value))


def diff_checked(a: Checked, b: Checked) -> list[Change]:
    """Every structural difference from spec A to spec B (both valid); [] when their graphs are equal."""
    assert a.graph is not None and b.graph is not None and a.model is not None and b.model is not None
    ga, gb = a.graph, b.graph
    changes: list[Change] = []
    _compare_model(a.model, b.model, changes)
    common = set(ga.nodes) & set(gb.nodes)
    pairing = {n: [n] for n in common}
    left, right = set(ga.nodes) - common, set(gb.nodes) - common
    _pair_declarations(ga, gb, left, right, pairing, changes)
    _pair_by_structure(ga, gb, left, right, pairing, changes)
    for n in sorted(left):
        changes.append(Change("-", _label(ga, n)))
    for n in sorted(right):
        changes.append(Change("+", _label(gb, n)))
    _compare_props(ga, gb, pairing, changes)
    _compare_edges(ga, gb, pairing, changes)
    return changes


def format_changes(a: Checked, b: Checked, changes: list[Change]) -> str:
    """The report `mtldsl diff` prints: a header naming both specs, one line per change, a count."""
    assert a.model is not None and b.model is not None
    lines = [f"--- {a.source.path} ({a.model.name})", f"+++ {b.source.path} ({b.model.name})"]
    lines += [str(c) for c in changes]
    lines.append(f"{len(changes)} difference{'s' if len(changes) != 1 else ''}" if changes
                 else "the graphs are equal")
    return "\n".join(lines)
