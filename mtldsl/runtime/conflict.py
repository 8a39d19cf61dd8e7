"""Gradient conflict between tasks (`mtldsl train --log-conflict N`, Note [Gradient conflict]).

Takes one step's per-loss losses and the shared parameters (optim.shared_parameters: the graph's blocks
that two or more losses reach); gives the cosine between every pair of per-loss gradients on them. The
loop records them every N steps; this module also averages them per epoch (history.csv columns
`conflict_<a>/<b>`) and writes conflict.csv and conflict.png at the end of a run.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["CONFLICT_CSV", "CONFLICT_PNG", "epoch_means", "gradient_cosines", "write_conflict"]

CONFLICT_CSV = "conflict.csv"
CONFLICT_PNG = "conflict.png"

# Note [Gradient conflict]
# ~~~~~~~~~~~~~~~~~~~~~~~~
# With --log-conflict N, every N-th training step computes, before the step's own backward, the gradient of
# each loss term alone on the shared parameter set (torch.autograd.grad with the graph retained; sparse
# embedding gradients made dense) and the cosine between every pair: below 0 the tasks pull the shared
# parameters apart (the conflict PCGrad projects away), near 1 they agree. It costs one extra backward per
# loss on those steps only; with N = 0 (the default) the step is unchanged. The records live in the
# checkpoint's training state, so a resumed run keeps them (Note [Resume]); history.csv gets each epoch's
# mean per pair, conflict.csv every record (step, epoch, one column per pair), conflict.png the curves.


def _flat(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    parts = []
    for g, p in zip(grads, params):
        if g is None:
            parts.append(torch.zeros(p.numel(), device=p.device))
        else:
            parts.append((g.to_dense() if g.is_sparse else g).reshape(-1).float())
    return torch.cat(parts) if parts else torch.zeros(0)


def gradient_cosines(losses: Mapping[str, Tensor], params: Sequence[Tensor]) -> dict[str, float]:
    """Cosine between the gradients of every pair of losses on `params`; key `a/b`, nan for a zero gradient."""
    if not params:
        return {}
    flat = {k: _flat(torch.autograd.grad(v, params, retain_graph=True, allow_unused=True), params)
            for k, v in losses.items() if v.requires_grad}
    out = {}
    for a, b in itertools.combinations(flat, 2):
        na, nb = flat[a].norm(), flat[b].norm()
        out[f"{a}/{b}"] = float((flat[a] @ flat[b]) / (na * nb)) if na > 0 and nb > 0 else math.nan
    return out


def epoch_means(records: Sequence[Mapping[str, Any]], epoch: int) -> dict[str, float]:
    """history.csv's `conflict_<pair>` columns: the mean of epoch `epoch`'s records per pair."""
    rows = [r for r in records if r["epoch"] == epoch]
    pairs = dict.fromkeys(k for r in rows for k in r if k not in ("step", "epoch"))
    out = {}
    for pair in pairs:
        vals = [float(r[pair]) for r in rows if pair in r and not math.isnan(float(r[pair]))]
        out[f"conflict_{pair}"] = sum(vals) / len(vals) if vals else math.nan
    return out


def write_conflict(run_dir: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """conflict.csv (every record) and conflict.png (cosine per pair over steps)."""
    from .runs import atomic_write_bytes, atomic_write_text

    pairs = list(dict.fromkeys(k for r in records for k in r if k not in ("step", "epoch")))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["step", "epoch", *pairs])
    for r in records:
        writer.writerow([r["step"], r["epoch"], *(r.get(p, math.nan) for p in pairs)])
    atomic_write_text(run_dir / CONFLICT_CSV, buf.getvalue())
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(6, 3.2), dpi=100)
    ax = fig.subplots()
    for p in pairs:
        ax.plot([r["step"] for r in records], [r.get(p, math.nan) for r in records], marker=".", label=p)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("cosine of task gradients")
    ax.set_title("gradient conflict on the shared parameters")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    atomic_write_bytes(run_dir / CONFLICT_PNG, png.getvalue())
