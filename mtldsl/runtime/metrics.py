"""Per-task metrics on tensors: AUC, gAUC, logloss (binary tasks); MSE, MAE (regression tasks).

Pure torch, no sklearn. Each metric takes 1-D tensors (any device, any float dtype) and returns a Python
float, exact: AUC and gAUC sort the scores in their own dtype and count per run of tied scores (float64
per run), the means sum float64 chunks; no float64 copy of a whole split is made. AUC-like metrics
return nan when only one class is present. `Accumulator` keeps per-batch predictions (float32), labels
(uint8 for binary outputs) and one copy of the group ids, and computes everything once at the end.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ..vocab import TaskKind

__all__ = ["Accumulator", "auc", "gauc", "logloss", "mae", "mse"]


CHUNK = 1 << 20  # rows per float64 chunk of the mean-type metrics (no float64 copy of a whole split)


def _flat(x: Tensor) -> Tensor:
    """1-D, detached, in its own dtype (integer and bool inputs as float32); float64 only per chunk or per run."""
    x = x.detach().reshape(-1)
    return x if x.is_floating_point() else x.to(torch.float32)


def _check(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    s, y = _flat(scores), _flat(labels)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {tuple(s.shape)} vs {tuple(y.shape)}")
    return s, y


def _runs(*sorted_keys: Tensor) -> tuple[Tensor, int]:
    """Run id of each row of rows sorted by the keys (a run: rows equal on every key), and the number of runs."""
    n = sorted_keys[0].numel()
    change = torch.zeros(n, dtype=torch.bool, device=sorted_keys[0].device)
    if n:
        change[0] = True
    for k in sorted_keys:
        change[1:] |= k[1:] != k[:-1]
    run = torch.cumsum(change, 0) - 1
    return run, (int(run[-1].item()) + 1 if n else 0)


def _wins(run: Tensor, n_runs: int, pos: Tensor) -> tuple[Tensor, Tensor]:
    """Per run of tied scores (in score order): its positives and negatives, as float64 (one value per run)."""
    total = torch.bincount(run, minlength=n_runs).to(torch.float64)
    n_pos = torch.bincount(run[pos], minlength=n_runs).to(torch.float64)
    return n_pos, total - n_pos


def auc(scores: Tensor, labels: Tensor) -> float:
    """ROC AUC (Mann-Whitney U, a tie counting one half; equals sklearn.roc_auc_score). nan for one class.

    Exact and lean: one sort of the scores in their own dtype, then counts per run of tied scores; each
    positive wins over the negatives of lower runs and half of its own run's.
    """
    s, y = _check(scores, labels)
    pos = y > 0.5
    n_pos = int(pos.sum().item())
    n_neg = s.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    s_sorted, order = torch.sort(s)
    pos = pos[order]
    del order
    run, n_runs = _runs(s_sorted)
    del s_sorted
    p, q = _wins(run, n_runs, pos)
    below = torch.cumsum(q, 0) - q  # negatives in lower runs
    return float((p * (below + 0.5 * q)).sum().item()) / (n_pos * n_neg)


def gauc(scores: Tensor, labels: Tensor, groups: Tensor) -> float:
    """Group AUC: per-group AUC averaged with impression weights over groups that have both classes.

    Vectorised: one stable sort by (group, score) and counts per run of tied scores within a group; no
    Python loop over groups. nan when no group has both classes.
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
    gs, ss, pos = gid[order], s[order], y[order] > 0.5
    del order, gid
    run, n_runs = _runs(gs, ss)
    del ss
    run_group = torch.zeros(n_runs, dtype=gs.dtype, device=gs.device).index_copy_(0, run, gs)  # the group of each run
    del gs
    p, q = _wins(run, n_runs, pos)
    del run, pos
    neg_before = torch.cumsum(q, 0) - q  # negatives in lower runs, over all groups so far
    group_neg = torch.zeros(n_groups, dtype=torch.float64, device=q.device).index_add_(0, run_group, q)
    neg_before -= (torch.cumsum(group_neg, 0) - group_neg)[run_group]  # ... of this group only
    wins = torch.zeros_like(group_neg).index_add_(0, run_group, p * (neg_before + 0.5 * q))
    n_pos = torch.zeros_like(group_neg).index_add_(0, run_group, p)
    n_neg = group_neg
    valid = (n_pos > 0) & (n_neg > 0)
    if not bool(valid.any()):
        return math.nan
    per_group = wins[valid] / (n_pos[valid] * n_neg[valid])
    weight = n_pos[valid] + n_neg[valid]
    return float((per_group * weight).sum().item() / weight.sum().item())


def _mean(a: Tensor, b: Tensor, term: object) -> float:
    """mean of term(a_chunk, b_chunk) (float64 chunks of CHUNK rows), summed in float64."""
    total = 0.0
    for i in range(0, a.numel(), CHUNK):
        u, v = a[i:i + CHUNK].to(torch.float64), b[i:i + CHUNK].to(torch.float64)
        total += float(term(u, v).sum().item())  # type: ignore[operator]
    return total / a.numel()


def logloss(p: Tensor, y: Tensor, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities p (clamped to [eps, 1 - eps]) against labels y."""
    pp, yy = _check(p, y)
    if pp.numel() == 0:
        return math.nan

    def term(a: Tensor, b: Tensor) -> Tensor:
        a = a.clamp(eps, 1 - eps)
        return -(b * torch.log(a) + (1 - b) * torch.log1p(-a))

    return _mean(pp, yy, term)


def mse(pred: Tensor, target: Tensor) -> float:
    a, b = _check(pred, target)
    return _mean(a, b, lambda u, v: (u - v) ** 2) if a.numel() else math.nan


def mae(pred: Tensor, target: Tensor) -> float:
    a, b = _check(pred, target)
    return _mean(a, b, lambda u, v: (u - v).abs()) if a.numel() else math.nan


def _kind(kind: object) -> TaskKind:
    value = getattr(kind, "value", kind)  # accepts TaskKind members and plain strings
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
        for n, kind in self.kinds.items():
            p = preds[n].detach().reshape(-1).to(torch.float32, copy=True)  # a copy: an output may view a larger tensor
            y = labels[n].detach().reshape(-1)
            y = y.to(torch.uint8) if kind is TaskKind.binary else y.float()  # binary labels are 0/1 (the loader checks)
            if p.shape != y.shape:
                raise ValueError(f"output '{n}': {p.numel()} predictions but {y.numel()} labels")
            self._preds[n].append(p)
            self._labels[n].append(y)
            m = masks.get(n)
            self._masks[n].append(None if m is None else m.detach().reshape(-1).to(torch.bool))
        self._groups.append(None if groups is None else groups.detach().reshape(-1))

    def _cat(self, name: str) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """One output's predictions, labels, groups and mask, concatenated on the CPU (and kept so, in place of
        its batches: one copy of each column at a time, and compute() may be called again)."""
        p = torch.cat(self._preds[name]).cpu()
        y = torch.cat(self._labels[name]).cpu()
        mask = None
        if any(m is not None for m in self._masks[name]):
            parts = [
                torch.ones(t.numel(), dtype=torch.bool, device=t.device) if m is None else m
                for m, t in zip(self._masks[name], self._preds[name])
            ]
            mask = torch.cat(parts).cpu()
        self._preds[name], self._labels[name], self._masks[name] = [p], [y], [mask]
        return p, y, self._all_groups(), mask

    def _all_groups(self) -> Tensor | None:
        """Every row's group, once for all outputs: its dense index (int32 while the groups fit), which gauc
        reads as it reads the raw ids (a relabelling of the groups), in half the memory of int64 ids."""
        if self._groups and all(t is not None for t in self._groups):
            if len(self._groups) > 1 or self._groups[0].dtype != torch.int32:
                raw = torch.cat([t for t in self._groups if t is not None]).cpu()
                index = torch.unique(raw, return_inverse=True)[1]
                del raw
                self._groups = [index.to(torch.int32) if index.numel() < 2**31 else index]
            return self._groups[0]
        return None

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
