"""Per-task metrics on tensors: AUC, gAUC, logloss (binary tasks); MSE, MAE (regression tasks).

No sklearn. Each metric takes 1-D tensors (any device, any float dtype) and returns a Python float, exact:
AUC and gAUC sort packed 8-byte keys in place and count per run of tied scores in chunks (Note [Packed
sort keys]); the means sum float64 chunks; no float64 copy of a whole split is made. AUC-like metrics
return nan when only one class is present. `Accumulator` keeps per-batch predictions (float32), labels
(uint8 for binary outputs) and one copy of the group ids, and computes everything once at the end.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
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


# Note [Packed sort keys]
# ~~~~~~~~~~~~~~~~~~~~~~~
# AUC and gAUC need the rows in score order (gAUC: group, then score) and, per run of tied scores, its
# positives and negatives. An argsort costs 8 bytes of indices per row besides the sorted values, and
# gathering labels and groups through it costs more: with the run ids, counts and cumulative sums of
# every row, the old torch version peaked at ~100 bytes per test row (4 GiB on Ali-CCP's 43M rows).
# Float32 scores pack instead into one uint64 per row: the score's bits mapped to an unsigned integer of
# the same order (negative floats inverted, the sign bit set on the others; -0.0 is made +0.0 first, so
# equal scores get equal bits), shifted left by one, with the label in bit 0 and, for gAUC, the group
# index (< 2^30) in bits 33 and up. One in-place sort of these keys orders rows by (group, score, label)
# with no index array, and a run of tied scores is a range of keys equal after `>> 1`. The sorted keys
# are then counted in chunks of ~CHUNK rows cut at run (AUC) or group (gAUC) boundaries, so the peak is
# the keys plus one chunk's temporaries: ~8 bytes per row. Scores of another dtype (float64, which does
# not fit 32 bits) take an argsort instead, through the same counting.

_MAX_GROUP = 1 << 30  # group indices packed into bits 33..62 of the key


def _pack(scores: np.ndarray, pos: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """(group, score, label) packed into sortable uint64 keys (Note [Packed sort keys]), CHUNK rows at a time
    into one array: no whole-split temporaries besides the keys."""
    key = np.empty(scores.size, dtype=np.uint64)
    for i in range(0, scores.size, CHUNK):
        k = key[i:i + CHUNK]
        k[:] = (scores[i:i + CHUNK].astype(np.float32) + np.float32(0)).view(np.uint32)  # -0.0 -> +0.0
        flip = k >> np.uint64(31)  # 1 for negative floats
        flip *= np.uint64(0x7FFFFFFF)
        flip += np.uint64(0x80000000)  # negative: invert all 32 bits; others: set the sign bit
        k ^= flip
        k <<= np.uint64(1)
        k |= pos[i:i + CHUNK]
        if groups is not None:
            k |= groups[i:i + CHUNK].astype(np.uint64) << np.uint64(33)
    return key


def _chunks(key: np.ndarray, shift: int):
    """(start, stop) ranges of the sorted keys of about CHUNK rows, never splitting a range equal after >> shift."""
    i, n = 0, key.size
    while i < n:
        j = min(i + CHUNK, n)
        if j < n:
            bound = ((int(key[j - 1]) >> shift) + 1) << shift  # the first key past that run or group
            j = n if bound >= 1 << 64 else int(np.searchsorted(key, np.uint64(bound), side="left"))
        yield i, j
        i = j


def _runs(run_key: np.ndarray, pos: np.ndarray, group: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Rows sorted by (group, score) -> per run of tied scores within a group: positives, negatives (float64)
    and the run's first row."""
    change = np.empty(run_key.size, dtype=bool)
    change[:1] = True
    np.not_equal(run_key[1:], run_key[:-1], out=change[1:])
    if group is not None:
        change[1:] |= group[1:] != group[:-1]
    starts = np.flatnonzero(change)
    del change
    p = np.add.reduceat(pos.astype(np.float64), starts) if starts.size else np.zeros(0)
    q = np.diff(np.append(starts, run_key.size)).astype(np.float64) - p
    return p, q, starts


def _sorted(scores: Tensor, labels: Tensor, groups: Tensor | None):
    """Yield (run_key, positive, group or None) for chunks of the rows sorted by (group, score); chunks never
    split a run of ties, nor (with groups) a group."""
    s = (scores.float() if scores.dtype == torch.bfloat16 else scores).cpu().numpy()  # numpy has no bfloat16
    pos = (labels > 0.5).cpu().numpy()
    g = None if groups is None else _group_index(groups.cpu().numpy())
    if s.dtype in (np.float32, np.float16):  # bfloat16 and integers arrive as float32 (_flat)
        key = _pack(s, pos, g)
        del s, pos
        key.sort()
        shift = 1 if g is None else 33
        for i, j in _chunks(key, shift):
            chunk = key[i:j]
            yield chunk >> np.uint64(1), (chunk & np.uint64(1)).astype(bool), None if g is None else chunk >> np.uint64(33)
        return
    order = np.lexsort((s,) if g is None else (s, g))  # float64: no 32-bit packing, an argsort instead
    yield s[order], pos[order], None if g is None else g[order]


def _group_index(groups: np.ndarray) -> np.ndarray:
    """Groups as non-negative integers below 2^30 (the ids themselves when they are, else a dense relabelling:
    gAUC does not depend on the groups' names)."""
    if groups.dtype.kind in "iu" and groups.size and int(groups.min()) >= 0 and int(groups.max()) < _MAX_GROUP:
        return groups
    return np.unique(groups, return_inverse=True)[1].reshape(-1)


def auc(scores: Tensor, labels: Tensor) -> float:
    """ROC AUC (Mann-Whitney U, a tie counting one half; equals sklearn.roc_auc_score). nan for one class.

    Exact and lean (Note [Packed sort keys]): one sort, then counts per run of tied scores; each positive
    wins over the negatives of lower runs and half of its own run's.
    """
    s, y = _check(scores, labels)
    n_pos = int((y > 0.5).sum().item())
    n_neg = s.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    wins = negatives = 0.0
    for run_key, pos, _ in _sorted(s, y, None):
        p, q, _ = _runs(run_key, pos, None)
        below = negatives + np.cumsum(q) - q  # negatives in lower runs
        wins += float(np.dot(p, below + 0.5 * q))
        negatives += float(q.sum())
    return wins / (n_pos * n_neg)


def gauc(scores: Tensor, labels: Tensor, groups: Tensor) -> float:
    """Group AUC: per-group AUC averaged with impression weights over groups that have both classes.

    Vectorised: one sort by (group, score) (Note [Packed sort keys]) and counts per run of tied scores
    within a group; no Python loop over groups. nan when no group has both classes.
    """
    s, y = _check(scores, labels)
    g = groups.detach().reshape(-1)
    if g.numel() != s.numel():
        raise ValueError(f"groups and scores differ in size: {g.numel()} vs {s.numel()}")
    if s.numel() == 0:
        return math.nan
    total = weight = 0.0
    for run_key, pos, group in _sorted(s, y, g):
        p, q, starts = _runs(run_key, pos, group)
        run_group = group[starts]
        first = np.flatnonzero(np.r_[True, run_group[1:] != run_group[:-1]])  # each group's first run
        below = np.cumsum(q) - q  # negatives in lower runs of the chunk ...
        below -= np.repeat(below[first], np.diff(np.append(first, q.size)))  # ... of the same group
        wins = np.add.reduceat(p * (below + 0.5 * q), first)
        n_pos, n_neg = np.add.reduceat(p, first), np.add.reduceat(q, first)
        valid = (n_pos > 0) & (n_neg > 0)
        size = n_pos[valid] + n_neg[valid]
        total += float((wins[valid] / (n_pos[valid] * n_neg[valid]) * size).sum())
        weight += float(size.sum())
    return total / weight if weight else math.nan


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


def _narrow(ids: Tensor) -> Tensor:
    """Host int64 group ids as int32 when they fit (half the memory held per evaluated row); others as they are."""
    if ids.dtype == torch.int64 and ids.device.type == "cpu" and ids.numel() and ids.min() >= 0 and ids.max() < 2**31:
        return ids.to(torch.int32)
    return ids


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
        self._groups.append(None if groups is None else _narrow(groups.detach().reshape(-1)))

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
        """Every row's group, concatenated once for all outputs (int32 while the ids fit: _narrow; gauc reads
        them as they are, Note [Packed sort keys])."""
        if self._groups and all(t is not None for t in self._groups):
            if len(self._groups) > 1 or self._groups[0].device.type != "cpu":
                self._groups = [_narrow(torch.cat(self._groups).cpu())]  # type: ignore[arg-type]
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
