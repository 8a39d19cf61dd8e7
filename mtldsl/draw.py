"""Pictures of a block graph: DOT text, or SVG/PNG through Graphviz when installed, else matplotlib.

Rows are block kinds (embeddings at the bottom, losses on top); stop-gradient edges are dashed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import networkx as nx

from .graph import KIND_ORDER, to_dot

_COLORS = {"emb": "#cfe2f3", "experts": "#d9ead3", "gate": "#fff2cc", "transfer": "#f4cccc", "tower": "#ead1dc",
           "output": "#ffffff", "loss": "#eeeeee"}


def positions(graph: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """Layered layout: one row per kind (and per level for experts and gates), spread evenly."""
    rows: dict[tuple[int, int], list[str]] = {}
    for n, data in graph.nodes(data=True):
        level = getattr(data["block"], "level", 0) if data["kind"] in ("experts", "gate") else 0
        key = (KIND_ORDER.index(data["kind"]) + (2 * (level - 1) if level > 1 else 0), KIND_ORDER.index(data["kind"]))
        rows.setdefault(key, []).append(n)
    pos = {}
    for y, key in enumerate(sorted(rows)):
        row = rows[key]
        for i, n in enumerate(row):
            pos[n] = ((i + 1) / (len(row) + 1), float(y))
    return pos


def _matplotlib(graph: nx.DiGraph, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = positions(graph)
    height = max(y for _, y in pos.values()) + 1
    fig, ax = plt.subplots(figsize=(max(8, graph.number_of_nodes() * 0.7), 1.3 * height + 1))
    solid = [(u, v) for u, v, d in graph.edges(data=True) if d["backward"]]
    dashed = [(u, v) for u, v, d in graph.edges(data=True) if not d["backward"]]
    nx.draw_networkx_edges(graph, pos, edgelist=solid, ax=ax, arrows=True, edge_color="#555555")
    nx.draw_networkx_edges(graph, pos, edgelist=dashed, ax=ax, arrows=True, style="dashed", edge_color="#cc0000")
    for n, (x, y) in pos.items():
        data = graph.nodes[n]
        label = ("loss " if data["kind"] == "loss" else "") + data["name"]
        label += f"\n{data['width']}" if data.get("width") and data["kind"] in ("emb", "experts", "gate") else ""
        ax.text(x, y, label, ha="center", va="center", fontsize=8,
                bbox={"boxstyle": "round", "facecolor": _COLORS[data["kind"]], "edgecolor": "#333333"})
    ax.set_title(f"{graph.graph.get('model', '')}  (dashed: forward only, detached)", fontsize=10)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(out, format=out.suffix.lstrip("."), metadata={"Date": None} if out.suffix == ".svg" else None)
    plt.close(fig)


def draw(graph: nx.DiGraph, out: Path) -> None:
    dot = to_dot(graph)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".dot":
        out.write_text(dot, encoding="utf-8")
        return
    exe = shutil.which("dot")
    if exe:
        subprocess.run([exe, f"-T{out.suffix.lower().lstrip('.')}", "-o", str(out)], input=dot.encode(), check=True)
    else:
        _matplotlib(graph, out)
