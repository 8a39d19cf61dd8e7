"""analyze's files: analysis.md, analysis.json and the plots (subsets.png, gate_mass.png), from an Analysis.

Takes an analyze.Analysis and a folder; gives the files, written atomically (runtime/runs.py). Plots use
matplotlib, as the trainer's curve.png does; without it the tables are still written.
"""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path
from typing import Any

from .analyze import Analysis

__all__ = ["analysis_markdown", "write_analysis"]


def _f(value: Any) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _subset_tables(a: Analysis) -> list[str]:
    lines: list[str] = []
    for pair in dict.fromkeys(r["pair"] for r in a.subsets):
        rows = [r for r in a.subsets if r["pair"] == pair]
        subsets = list(dict.fromkeys(r["subset"] for r in rows))
        lines += ["", f"## STEM subsets of {pair} (k = {a.k}; Note [STEM subsets])", ""]
        sizes = {s: next(r["n"] for r in rows if r["subset"] == s and r["output"] == pair.split("/")[0])
                 for s in subsets}
        lines.append("Rows per subset: " + ", ".join(f"{s} {sizes[s]}" for s in subsets) + ".")
        for output in dict.fromkeys(r["output"] for r in rows):
            lines += ["", f"### {output}: AUC / gAUC (positives)", "",
                      "| run | " + " | ".join(subsets) + " |", "|---|" + "---|" * len(subsets)]
            for run in dict.fromkeys(r["run"] for r in rows):
                cells = []
                for s in subsets:
                    r = next((x for x in rows if (x["run"], x["subset"], x["output"]) == (run, s, output)), None)
                    cells.append("" if r is None else f"{_f(r['auc'])} / {_f(r['gauc'])} ({r['positives']})")
                lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return lines


def _gate_tables(a: Analysis) -> list[str]:
    lines: list[str] = []
    if not a.gate_mass:
        return lines
    lines += ["", "## Gate mass (mean softmax weight per expert group; Note [Gate mass])", "",
              "| run | gate | subset | mass per group | per expert |", "|---|---|---|---|---|"]
    for r in a.gate_mass:
        subset = r["subset"] if r["pair"] is None else f"{r['pair']} {r['subset']}"
        groups = ", ".join(f"{g} {_f(v)}" for g, v in r["groups"].items())
        experts = ", ".join(f"{e} {_f(v)}" for e, v in r["experts"].items())
        lines.append(f"| {r['run']} | {r['gate']} | {subset} | {groups} | {experts} |")
    return lines


def _other_tables(a: Analysis) -> list[str]:
    lines: list[str] = []
    if a.conflict:
        lines += ["", "## Gradient conflict (cosine of per-task gradients on the shared parameters)", "",
                  "| run | pair | mean | min | max | last | records |", "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['run']} | {r['pair']} | {_f(r['mean'])} | {_f(r['min'])} | {_f(r['max'])} | {_f(r['last'])} | "
                  f"{r['records']} |" for r in a.conflict]
    if a.embeddings:
        lines += ["", "## Task-specific embeddings: user-item distance per table (Note [Embedding distances])", "",
                  "| run | table | fields | rows with | mean cosine distance | rows |", "|---|---|---|---|---:|---:|"]
        lines += [f"| {r['run']} | {r['table']} | {r['fields']} | {r['rows_with']} | {_f(r['distance'])} | {r['rows']} |"
                  for r in a.embeddings]
    return lines


def analysis_markdown(a: Analysis) -> str:
    lines = ["# Analysis", "", "Runs: " + ", ".join(f"{r['name']} ({r['run_dir']})" for r in a.runs) + "."]
    if a.singles:
        lines.append("Single-task runs: " + ", ".join(f"{t} ({d})" for t, d in a.singles.items()) + ".")
    lines += _subset_tables(a) + _gate_tables(a) + _other_tables(a)
    return "\n".join(lines) + "\n"


def _figure() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def _save(fig: Any, path: Path) -> None:
    from ..runtime.runs import atomic_write_bytes

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _plot_subsets(a: Analysis, path: Path, figure: Any) -> bool:
    panels = [(p, o) for p, o in dict.fromkeys((r["pair"], r["output"]) for r in a.subsets) if "@" not in o]
    if not panels:
        return False
    fig = figure(figsize=(4.2 * len(panels), 3.6), dpi=100)
    for ax, (pair, output) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        rows = [r for r in a.subsets if (r["pair"], r["output"]) == (pair, output)]
        subsets = list(dict.fromkeys(r["subset"] for r in rows))
        runs = list(dict.fromkeys(r["run"] for r in rows))
        width = 0.8 / len(runs)
        for j, run in enumerate(runs):
            vals = [next((r["auc"] for r in rows if (r["run"], r["subset"]) == (run, s)), math.nan) for s in subsets]
            ax.bar([i + j * width for i in range(len(subsets))], vals, width, label=run)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(subsets))])
        ax.set_xticklabels(subsets, fontsize="small")
        low = min([v for r in rows if not math.isnan(v := r["auc"])] or [0.5])
        ax.set_ylim(min(0.4, low - 0.05), 1.0)
        ax.set_title(f"{output} AUC per subset ({pair})")
        ax.legend(fontsize="x-small")
        ax.grid(alpha=0.3, axis="y")
    _save(fig, path)
    return True


def _plot_gates(a: Analysis, path: Path, figure: Any) -> bool:
    rows = [r for r in a.gate_mass if r["pair"] is None]
    if not rows:
        return False
    fig = figure(figsize=(max(5.0, 0.9 * len(rows) + 2), 3.8), dpi=100)
    ax = fig.subplots()
    groups = list(dict.fromkeys(g for r in rows for g in r["groups"]))
    bottom = [0.0] * len(rows)
    for g in groups:
        vals = [r["groups"].get(g, 0.0) for r in rows]
        ax.bar(range(len(rows)), vals, bottom=bottom, label=g)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['run']}\n{r['gate']}" for r in rows], rotation=30, ha="right", fontsize="x-small")
    ax.set_ylabel("mean gate weight")
    ax.set_title("gate mass per expert group (test rows)")
    ax.legend(fontsize="x-small", bbox_to_anchor=(1.0, 1.0), loc="upper left")
    _save(fig, path)
    return True


def write_analysis(a: Analysis, out: Path) -> list[Path]:
    """analysis.md, analysis.json, and subsets.png / gate_mass.png when there is something to draw."""
    from ..runtime.runs import atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "analysis.md", out / "analysis.json"]
    atomic_write_text(written[0], analysis_markdown(a))
    atomic_write_json(written[1], dataclasses.asdict(a))
    figure = _figure()
    if figure is not None:
        for name, plot in (("subsets.png", _plot_subsets), ("gate_mass.png", _plot_gates)):
            if plot(a, out / name, figure):
                written.append(out / name)
    return written
