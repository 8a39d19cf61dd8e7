"""compare's files: comparison.md, comparison.csv, comparison.json and comparison.png, from a Comparison.

Takes a compare.Comparison and a folder; gives the four files (written atomically, runtime/runs.py). The
plot uses matplotlib, as the trainer's curve.png does: per output, each entry's AUC (or first metric) per
seed as dots and its mean as a bar.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .compare import Comparison

__all__ = ["write_comparison"]


def _f(value: float, digits: int = 4) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _p(value: float) -> str:
    if value is None or math.isnan(value):
        return "nan"
    return f"{value:.2e}" if value < 1e-3 else f"{value:.3f}"


def markdown(comp: Comparison) -> str:
    seeds = ", ".join(map(str, comp.seeds))
    lines = [f"# Comparison on {comp.dataset}", "",
             f"Seeds {seeds}; baseline **{comp.baseline}**. Verdict: Note [Verdict] in mtldsl/workbench/compare.py "
             "(ahead = the entry's worst seed beats the baseline's best).", "",
             "| entry | params | train samples/s |", "|---|---:|---:|"]
    lines += [f"| {e['label']} | {e['params']:,} | {e['samples_per_second']:,.0f} |" for e in comp.entries]
    outputs = list(dict.fromkeys((r["output"], r["metric"]) for r in comp.metrics))
    for output, metric in outputs:
        lines += ["", f"## {output} {metric}", "",
                  "| entry | mean ± std | per seed | spread | diff vs baseline | verdict |",
                  "|---|---|---|---:|---|---|"]
        for r in comp.metrics:
            if (r["output"], r["metric"]) != (output, metric):
                continue
            per = " ".join(_f(v) for v in r["seeds"])
            diff = "" if r["verdict"] == "baseline" else f"{_f(r['diff_mean'], 4)} ± {_f(r['diff_std'], 4)}"
            lines.append(f"| {r['entry']} | {_f(r['mean'])} ± {_f(r['std'])} | {per} | {_f(r['spread'])} | "
                         f"{diff} | {r['verdict']} |")
    if comp.delong:
        lines += ["", "## DeLong's test against the baseline (per seed, same test rows)", "",
                  "| entry | output | seed | AUC | baseline AUC | diff | SE | p |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in comp.delong:
            lines.append(f"| {r['entry']} | {r['output']} | {r['seed']} | {_f(r['auc'])} | {_f(r['baseline_auc'])} | "
                         f"{_f(r['diff'])} | {_f(r['se'])} | {_p(r['p'])} |")
    return "\n".join(lines) + "\n"


def _csv(comp: Comparison) -> str:
    buf = io.StringIO()
    entries = {e["label"]: e for e in comp.entries}
    cols = ["entry", "output", "metric", "mean", "std", "min", "max", "spread", "per_seed", "diff_mean", "diff_std",
            "verdict", "params", "samples_per_second"]
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for r in comp.metrics:
        e = entries[r["entry"]]
        writer.writerow([r["entry"], r["output"], r["metric"], *(r[k] for k in ("mean", "std", "min", "max", "spread")),
                         ";".join(repr(v) for v in r["seeds"]), r["diff_mean"], r["diff_std"], r["verdict"],
                         e["params"], e["samples_per_second"]])
    return buf.getvalue()


def _plot(comp: Comparison, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        from matplotlib.figure import Figure
    except ImportError:
        return False
    from ..runtime.runs import atomic_write_bytes

    panels = [(o, m) for o, m in dict.fromkeys((r["output"], r["metric"]) for r in comp.metrics) if m == "auc"]
    if not panels:
        panels = list(dict.fromkeys((r["output"], r["metric"]) for r in comp.metrics))[:3]
    labels = [e["label"] for e in comp.entries]
    fig = Figure(figsize=(max(4.0, 3.2 * len(panels)), 3.2 + 0.12 * max(len(s) for s in labels)), dpi=100)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (output, metric) in zip(axes, panels):
        rows = [r for r in comp.metrics if (r["output"], r["metric"]) == (output, metric)]
        for i, r in enumerate(rows):
            ax.bar(i, r["mean"], color="tab:blue" if r["verdict"] != "baseline" else "tab:gray", alpha=0.35)
            ax.plot([i] * len(r["seeds"]), r["seeds"], "o", color="black", markersize=4)
        finite = [v for r in rows for v in r["seeds"] if not math.isnan(v)]
        if finite:
            pad = max(1e-3, (max(finite) - min(finite)) * 0.5)
            ax.set_ylim(min(finite) - pad, max(finite) + pad)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["entry"] for r in rows], rotation=30, ha="right", fontsize="small")
        ax.set_title(f"{output} {metric} (dots: seeds)")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return True


def write_comparison(comp: Comparison, out: Path) -> Sequence[Path]:
    """The four files in `out` (the plot only when matplotlib is installed); the paths written."""
    from ..runtime.runs import atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "comparison.md", out / "comparison.csv", out / "comparison.json"]
    atomic_write_text(written[0], markdown(comp))
    atomic_write_text(written[1], _csv(comp))
    data: dict[str, Any] = dataclasses.asdict(comp)
    atomic_write_json(written[2], data)
    if _plot(comp, out / "comparison.png"):
        written.append(out / "comparison.png")
    return written
