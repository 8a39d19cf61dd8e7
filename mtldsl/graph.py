"""ir.Model -> networkx.DiGraph, and DOT text for pictures.

Nodes are blocks, named `<kind>:<name>` (`emb:emb_ctr`, `experts:experts_shared`, `gate:g_ctr`,
`tower:tower_ctr`, `transfer:ctr_cvr`, `output:ctcvr`, `loss:ctcvr`); each carries `kind`, `name`,
`block` (the IR object) and `width` (features per sample it yields; 1 for towers and outputs).
Edges are tensors: `forward` (always True: an edge exists because a value flows), `backward`
(False where the consumer detaches it, Note [Gate visibility]) and `dim` (the producer's width).
Nothing here imports torch.
"""

from __future__ import annotations

import networkx as nx

from .ir import Combine, EmbeddingTable, ExpertGroup, Gate, Input, Model

KIND_ORDER = ("emb", "experts", "gate", "transfer", "tower", "output", "loss")


def node_id(kind: str, name: str) -> str:
    return f"{kind}:{name}"


def producer_id(model: Model, name: str) -> str | None:
    """The node id of the block an input may name (table, expert group or gate), or None."""
    block = model.block(name)
    if isinstance(block, EmbeddingTable):
        return node_id("emb", name)
    if isinstance(block, ExpertGroup):
        return node_id("experts", name)
    if isinstance(block, Gate):
        return node_id("gate", name)
    return None


def input_width(graph: nx.DiGraph, model: Model, inp: Input) -> int | None:
    """Width of an `input` expression, or None when a part is unknown or sum() widths disagree."""
    widths = []
    for ref in inp.refs:
        nid = producer_id(model, ref)
        if nid is None or graph.nodes[nid].get("width") is None:
            return None
        widths.append(graph.nodes[nid]["width"])
    if not widths:
        return None
    if inp.op is Combine.concat:
        return sum(widths)
    return widths[0] if len(set(widths)) == 1 else None


def build_graph(model: Model) -> nx.DiGraph:
    """The block graph of `model`. Unknown references are skipped (validate.py reports them)."""
    g = nx.DiGraph(model=model.name)
    for e in model.embeddings:
        g.add_node(node_id("emb", e.name), kind="emb", name=e.name, block=e, width=e.width)
    for x in model.experts:
        g.add_node(node_id("experts", x.name), kind="experts", name=x.name, block=x,
                   width=x.mlp.dims[-1] if x.mlp.dims else None)
    for gate in model.gates:
        g.add_node(node_id("gate", gate.name), kind="gate", name=gate.name, block=gate, width=None)
    for t in model.towers:
        g.add_node(node_id("tower", t.name), kind="tower", name=t.name, block=t, width=1)
    for tr in model.transfers:
        g.add_node(node_id("transfer", f"{tr.source}_{tr.target}"), kind="transfer", name=f"{tr.source}_{tr.target}",
                   block=tr, width=None)
    for o in model.outputs:
        g.add_node(node_id("output", o.name), kind="output", name=o.name, block=o, width=1)
    for lo in model.losses:
        g.add_node(node_id("loss", lo.output), kind="loss", name=lo.output, block=lo, width=1)

    def connect_input(consumer: str, inp: Input) -> None:
        for ref in inp.refs:
            src = producer_id(model, ref)
            if src is not None and src != consumer:
                g.add_edge(src, consumer, forward=True, backward=True, dim=g.nodes[src].get("width"), role="input")

    for x in model.experts:
        connect_input(node_id("experts", x.name), x.input)
    for gate in model.gates:
        gid = node_id("gate", gate.name)
        connect_input(gid, gate.input)
        for r in gate.routes:
            src = node_id("experts", r.group)
            if src in g:
                g.add_edge(src, gid, forward=r.forward, backward=r.backward, dim=g.nodes[src].get("width"), role="mix")
    # A gate yields the common width of what it mixes (validate.py reports a mismatch).
    for gate in model.gates:
        gid = node_id("gate", gate.name)
        widths = {g.nodes[u].get("width") for u, _, d in g.in_edges(gid, data=True) if d["role"] == "mix"}
        g.nodes[gid]["width"] = widths.pop() if len(widths) == 1 else None
    for t in model.towers:
        tid = node_id("tower", t.name)
        connect_input(tid, t.input)
        out = node_id("output", t.task)
        if out in g:
            g.add_edge(tid, out, forward=True, backward=True, dim=1, role="predict")
    # A transfer src -> dst reads what src's tower reads (after src's own incoming transfer, if any)
    # and replaces what dst's tower reads; the towers themselves are not on the path.
    towers = {t.task: t for t in model.towers}
    into = {tr.target: node_id("transfer", f"{tr.source}_{tr.target}") for tr in model.transfers}
    for tr in model.transfers:
        nid = node_id("transfer", f"{tr.source}_{tr.target}")
        if tr.source in towers and tr.target in towers:
            src, dst = towers[tr.source], towers[tr.target]
            width = input_width(g, model, src.input)
            g.nodes[nid]["width"] = width
            if tr.source in into and into[tr.source] != nid:
                g.add_edge(into[tr.source], nid, forward=True, backward=True, dim=width, role="transfer")
            else:
                connect_input(nid, src.input)
            g.add_edge(nid, node_id("tower", dst.name), forward=True, backward=True, dim=width, role="transfer")
    for o in model.outputs:
        for f in o.factors:
            src = node_id("output", f)
            if src in g:
                g.add_edge(src, node_id("output", o.name), forward=True, backward=True, dim=1, role="factor")
    for lo in model.losses:
        src = node_id("output", lo.output)
        if src in g:
            g.add_edge(src, node_id("loss", lo.output), forward=True, backward=True, dim=1, role="loss")
    return g


def grad_reach(graph: nx.DiGraph, loss_node: str) -> set[str]:
    """Nodes whose parameters receive gradient from `loss_node`: backward-enabled paths only."""
    seen = {loss_node}
    stack = [loss_node]
    while stack:
        v = stack.pop()
        for u, _, d in graph.in_edges(v, data=True):
            if d["backward"] and u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def shared_nodes(graph: nx.DiGraph) -> list[str]:
    """Parameterised nodes that receive gradient from two or more losses (for gradient weighting)."""
    losses = [n for n, k in graph.nodes(data="kind") if k == "loss"]
    counts: dict[str, int] = {}
    for lo in losses:
        for n in grad_reach(graph, lo):
            counts[n] = counts.get(n, 0) + 1
    return [n for n in graph.nodes if counts.get(n, 0) >= 2 and graph.nodes[n]["kind"] in ("emb", "experts", "gate", "transfer", "tower")]


_SHAPES = {"emb": "box3d", "experts": "box", "gate": "diamond", "transfer": "hexagon", "tower": "box",
           "output": "ellipse", "loss": "note"}


def to_dot(graph: nx.DiGraph) -> str:
    """Graphviz DOT: one rank per kind, stop-gradient edges dashed and labelled `detach`."""
    lines = [f'digraph "{graph.graph.get("model", "model")}" {{', "  rankdir=BT;", '  node [fontname="Helvetica"];']
    for kind in KIND_ORDER:
        nodes = [n for n, k in graph.nodes(data="kind") if k == kind]
        if nodes:
            lines.append("  { rank=same; " + " ".join(f'"{n}"' for n in nodes) + " }")
        for n in nodes:
            data = graph.nodes[n]
            label = ("loss " if kind == "loss" else "") + data["name"] + (f"\\n{data['width']}" if data.get("width") and kind not in ("output", "loss", "tower") else "")
            lines.append(f'  "{n}" [label="{label}", shape={_SHAPES[kind]}];')
    for u, v, d in graph.edges(data=True):
        style = "" if d["backward"] else ' [style=dashed, label="detach"]'
        lines.append(f'  "{u}" -> "{v}"{style};')
    lines.append("}")
    return "\n".join(lines) + "\n"
