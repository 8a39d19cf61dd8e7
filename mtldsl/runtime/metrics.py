"""Per-task metrics on tensors: AUC, gAUC, logloss (binary tasks); MSE, MAE (regression tasks).

Pure torch, no sklearn. Each metric takes 1-D tensors (any device, any float dtype; computed in float64)
and returns a Python float; AUC-like metrics return nan when only one class is present. `Accumulator`
keeps per-batch predictions on their device and computes everything once at the end of an epoch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ..vocab import TaskKind

__all__ = ["Accumulator", "auc", "gauc", "logloss", "mae", "mse"]


def _flat(x: Tensor) -> Tensor:
    return x.detach().reshape(-1).to(torch.float64)


def _check(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    s, y = _flat(scores), _flat(labels)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {tuple(s.shape)} vs {tuple(y.shape)}")
    return s, y


def _tie_average_ranks(sorted_keys: list[Tensor]) -> Tensor:
    """1-based ranks of rows already sorted by the keys, ties (equal on every key) sharing their mean rank."""
    n = sorted_keys[0].numel()
    change = torch.zeros(n, dtype=torch.bool, device=sorted_keys[0].device)
    if n:
        change[0] = True
    for k in sorted_keys:
        change[1:] |= k[1:] != k[:-1]
    run = torch.cumsum(change.to(torch.int64), 0) - 1  # run id of each row
    n_runs = int(run[-1].item()) + 1 if n else 0
    pos = torch.arange(1, n + 1, dtype=torch.float64, device=run.device)
    rank_sum = torch.zeros(n_runs, dtype=torch.float64, device=run.device).index_add_(0, run, pos)
    count = torch.zeros(n_runs, dtype=torch.float64, device=run.device).index_add_(0, run, torch.ones_like(pos))
    return (rank_sum / count)[run]


def auc(scores: Tensor, labels: Tensor) -> float:
    """ROC AUC (Mann-Whitney U with average ranks for ties; equals sklearn.roc_auc_score). nan for one class."""
    s, y = _check(scores, labels)
    pos = y > 0.5
    n_pos = int(pos.sum().item())
    n_neg = s.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    s_sorted, order = torch.sort(s)
    ranks = _tie_average_ranks([s_sorted])
    r_pos = ranks[pos[order]].sum().item()
    return (r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def gauc(scores: Tensor, labels: Tensor, groups: Tensor) -> float:
    """Group AUC: per-group AUC averaged with impression weights over groups that have both classes.

    Vectorised: one stable sort by (group, score) and segment sums; no Python loop over groups.
    nan when no group has both classes.
    """
    s, y = _check(scores, labels)
    g = groups.detach().reshape(-1)
    if g.numel() != s.numel():
        raise ValueError(f"groups and scores differ in size: {g.numel()} vs {s.numel()}")
    if s.numel() == 0:
        return math.nan
    _, gid = torch.unique(g, return_inverse=True)  # dense group index 0..G-1
    gid = gid.to(s.device)
    n_groups = int(gid.max().item()) + 1
    order = torch.sort(s, stable=True).indices
    order = order[torch.sort(gid[order], stable=True).indices]  # by group, then score
    gs, ss, pos = gid[order], s[order], (y[order] > 0.5).to(torch.float64)
    ranks_global = _tie_average_ranks([gs, ss])  # ties only within a group
    ones = torch.ones_like(ss)
    size = torch.zeros(n_groups, dtype=torch.float64, device=s.device).index_add_(0, gs, ones)
    start = torch.cumsum(size, 0) - size  # rows before each group
    ranks = ranks_global - start[gs]  # 1-based rank within the group
    n_pos = torch.zeros_like(size).index_add_(0, gs, pos)
    r_pos = torch.zeros_like(size).index_add_(0, gs, ranks * pos)
    n_neg = size - n_pos
    valid = (n_pos > 0) & (n_neg > 0)
    if not bool(valid.any()):
        return math.nan
    per_group = (r_pos[valid] - n_pos[valid] * (n_pos[valid] + 1) / 2) / (n_pos[valid] * n_neg[valid])
    weight = size[valid]
    return float((per_group * weight).sum().item() / weight.sum().item())


def logloss(p: Tensor, y: Tensor, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities p (clamped to [eps, 1 - eps]) against labels y."""
    pp, yy = _check(p, y)
    if pp.numel() == 0:
        return math.nan
    pp = pp.clamp(eps, 1 - eps)
    return float((-(yy * torch.log(pp) + (1 - yy) * torch.log1p(-pp))).mean().item())


def mse(pred: Tensor, target: Tensor) -> float:
    a, b = _check(pred, target)
    return float(((a - b) ** 2).mean().item()) if a.numel() else math.nan


def mae(pred: Tensor, target: Tensor) -> float:
    a, b = _check(pred, target)
    return float((a - b).abs().mean().item()) if a.numel() else math.nan


def _kind(kind: object) -> TaskKind:
    value = getattr(kind, "value", kind)  # accepts TaskKind members (vocab's or ir's) and plain strings
    try:
        return TaskKind(value)
    except ValueError:
        raise ValueError(f"unknown task kind {kind!r} (binary, regression)") from None


class Accumulator:
    """Collects predictions and labels per output across batches, on their device; computes metrics at the end.

    kinds: {output name: "binary" | "regression"} (or a TaskKind). Each `update` appends detached
    tensors (no `.item()`, no host sync); `compute` concatenates once, moves to the CPU and returns
    {name: {"auc", "logloss", "gauc"?, "n"} | {"mse", "mae", "n"}}. gauc is reported when groups were
    passed to every update. `masks[name]` (0/1 or bool per row) restricts an output to a domain, e.g. the
    CVR evaluation on clicked rows: register it under its own name ("cvr@click") and pass the click label
    as its mask.
    """

    def __init__(self, kinds: Mapping[str, object]) -> None:
        self.kinds = {name: _kind(k) for name, k in kinds.items()}
        self.reset()

    def reset(self) -> None:
        self._preds: dict[str, list[Tensor]] = {n: [] for n in self.kinds}
        self._labels: dict[str, list[Tensor]] = {n: [] for n in self.kinds}
        self._masks: dict[str, list[Tensor | None]] = {n: [] for n in self.kinds}
        self._groups: list[Tensor | None] = []

    def update(
        self,
        preds: Mapping[str, Tensor],
        labels: Mapping[str, Tensor],
        *,
        groups: Tensor | None = None,
        masks: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Append one batch. preds/labels must hold every registered name; extra names are an error."""
        masks = masks or {}
        for source, what in ((preds, "predictions"), (labels, "labels")):
            missing = [n for n in self.kinds if n not in source]
            if missing:
                raise KeyError(f"batch {what} lack {', '.join(missing)}")
        unknown = [n for n in masks if n not in self.kinds]
        if unknown:
            raise KeyError(f"masks for unregistered outputs: {', '.join(unknown)}")
        for n in self.kinds:
            p = preds[n].detach().reshape(-1).float()
            y = labels[n].detach().reshape(-1).float()
            if p.shape != y.shape:
                raise ValueError(f"output '{n}': {p.numel()} predictions but {y.numel()} labels")
            self._preds[n].append(p)
            self._labels[n].append(y)
            m = masks.get(n)
            self._masks[n].append(None if m is None else m.detach().reshape(-1).to(torch.bool))
        self._groups.append(None if groups is None else groups.detach().reshape(-1))

    def _cat(self, name: str) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        p = torch.cat(self._preds[name]).cpu()
        y = torch.cat(self._labels[name]).cpu()
        g = None
        if self._groups and all(t is not None for t in self._groups):
            g = torch.cat([t for t in self._groups if t is not None]).cpu()
        mask = None
        if any(m is not None for m in self._masks[name]):
            parts = [
                torch.ones(t.numel(), dtype=torch.bool, device=t.device) if m is None else m
                for m, t in zip(self._masks[name], self._preds[name])
            ]
            mask = torch.cat(parts).cpu()
        return p, y, g, mask

    def compute(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for name, kind in self.kinds.items():
            if not self._preds[name]:
                out[name] = {"n": 0.0}
                continue
            p, y, g, mask = self._cat(name)
            if mask is not None:
                p, y = p[mask], y[mask]
                g = None if g is None else g[mask]
            if kind is TaskKind.binary:
                m = {"auc": auc(p, y), "logloss": logloss(p, y)}
                if g is not None:
                    m["gauc"] = gauc(p, y, g)
            else:
                m = {"mse": mse(p, y), "mae": mae(p, y)}
            m["n"] = float(p.numel())
            out[name] = m
        return out
