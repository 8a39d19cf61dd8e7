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


# Note [Evaluation buffers]
# ~~~~~~~~~~~~~~~~~~~~~~~~~
# An ESMM evaluation over Ali-CCP's 43M test rows keeps ~25 bytes per row (four outputs' float32
# predictions and uint8 labels, one bool mask, an int32 group id): ~1.1 GB, which is the floor. Kept
# as ~13 small tensors per batch, it cost ~140 bytes per row inside `train`: training has raised
# glibc's dynamic mmap threshold, so each batch's large temporaries (the batch read from the maps, the
# activations) came from the heap too, between the kept tensors, and the freed gaps did not fit the
# next ones (an 8.15 GiB peak at full size, against ~0.8 GB while training). So `_Column` copies each
# batch into preallocated chunks instead: capacity doubles from 64k rows up to CHUNK_BYTES (64 MiB),
# then further chunks of that size, above glibc's largest mmap threshold (32 MiB), so the kept rows
# do not interleave with a batch's temporaries, and untouched capacity is never resident (full-size
# ESMM epoch and test evaluation: 2.37 GiB peak). The copies are device-side `copy_`/`fill_` of known
# sizes: no host sync on CUDA.

CHUNK_BYTES = 64 << 20  # the largest chunk of an evaluation column (Note [Evaluation buffers])
FIRST_ROWS = 1 << 16  # a column's first chunk, doubled while below CHUNK_BYTES


class _Column:
    """One 1-D column of rows growing batch by batch in preallocated chunks (Note [Evaluation buffers]).

    A given dtype is kept: batches are cast on copy, as .to() would. dtype None takes the first batch's,
    and a later batch of a wider integer dtype (int64 group ids after int32 ones) widens the rows so far.
    """

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype
        self.widens = dtype is None
        self.full: list[Tensor] = []  # chunks filled to the end
        self.cur: Tensor | None = None  # the chunk being filled, rows [0, fill)
        self.fill = 0

    def __len__(self) -> int:
        return sum(t.numel() for t in self.full) + self.fill

    def append(self, t: Tensor) -> None:
        """Copy a batch's rows to the end."""
        t = t.detach().reshape(-1)
        if self.dtype is None:
            self.dtype = t.dtype
        elif self.widens and torch.promote_types(self.dtype, t.dtype) != self.dtype:
            self._widen(torch.promote_types(self.dtype, t.dtype))
        self._write(t.numel(), t.device, lambda dst, i: dst.copy_(t[i:i + dst.numel()]))

    def pad(self, n: int, value: bool | float, device: torch.device) -> None:
        """Append n rows of one value."""
        self._write(n, device, lambda dst, i: dst.fill_(value))

    def _write(self, n: int, device: torch.device, put) -> None:
        i = 0
        while i < n:
            if self.cur is None or self.fill == self.cur.numel():
                self._grow(n - i, device)
            assert self.cur is not None
            k = min(n - i, self.cur.numel() - self.fill)
            put(self.cur[self.fill:self.fill + k], i)
            self.fill += k
            i += k

    def _grow(self, need: int, device: torch.device) -> None:
        assert self.dtype is not None
        most = max(1, CHUNK_BYTES // self.dtype.itemsize)
        if self.cur is None:
            self.cur, self.fill = torch.empty(min(most, max(need, FIRST_ROWS)), dtype=self.dtype, device=device), 0
        elif self.cur.numel() < most:  # double (at least to hold the batch), copying the rows so far
            bigger = torch.empty(min(most, max(2 * self.cur.numel(), self.fill + need)), dtype=self.dtype, device=device)
            bigger[:self.fill].copy_(self.cur[:self.fill])
            self.cur = bigger
        else:
            self.full.append(self.cur)
            self.cur, self.fill = torch.empty(most, dtype=self.dtype, device=device), 0

    def _widen(self, dtype: torch.dtype) -> None:
        self.full = [t.to(dtype) for t in self.full]
        if self.cur is not None:
            self.cur = self.cur[:self.fill].to(dtype)
        self.dtype = dtype

    def tensor(self, convert=lambda t: t) -> Tensor:
        """All rows as one CPU tensor, through `convert` once, kept in place of the chunks (one copy of the
        column at a time; the next call returns it as it is)."""
        parts = [*self.full, *([] if self.cur is None else [self.cur[:self.fill]])]
        if not parts:
            return torch.empty(0, dtype=self.dtype)
        self.full = []
        self.cur = convert((parts[0] if len(parts) == 1 else torch.cat(parts)).cpu())
        del parts
        self.dtype, self.fill = self.cur.dtype, self.cur.numel()
        return self.cur


class Accumulator:
    """Collects predictions and labels per output across batches, on their device; computes metrics at the end.

    kinds: {output name: "binary" | "regression"} (or a TaskKind). Each `update` copies the batch into
    preallocated chunks (Note [Evaluation buffers]; no `.item()`, no host sync); `compute` concatenates
    once, moves to the CPU and returns {name: {"auc", "logloss", "gauc"?, "n"} | {"mse", "mae", "n"}}.
    Binary labels are kept as uint8, masks as bool, group ids as int32 while they fit. gauc is reported
    when groups were passed to every update. `masks[name]` (0/1 or bool per row) restricts an output to a
    domain, e.g. the CVR evaluation on clicked rows: register it under its own name ("cvr@click") and
    pass the click label as its mask.
    """

    def __init__(self, kinds: Mapping[str, object]) -> None:
        self.kinds = {name: _kind(k) for name, k in kinds.items()}
        self.reset()

    def reset(self) -> None:
        self.rows = 0
        self._preds = {n: _Column(torch.float32) for n in self.kinds}
        self._labels = {n: _Column(torch.uint8 if k is TaskKind.binary else torch.float32) for n, k in self.kinds.items()}
        self._masks: dict[str, _Column | None] = {n: None for n in self.kinds}  # made at the first mask
        self._groups: _Column | None = _Column()  # None once a batch came without groups

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
        sizes = {n: preds[n].numel() for n in self.kinds}
        for n, size in sizes.items():  # every check before any copy: a bad batch leaves the columns aligned
            for what, t in (("labels", labels[n]), ("mask rows", masks.get(n))):
                if t is not None and t.numel() != size:
                    raise ValueError(f"output '{n}': {size} predictions but {t.numel()} {what}")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"outputs differ in rows: {', '.join(f'{n} {k}' for n, k in sizes.items())}")
        batch = next(iter(sizes.values()), 0)
        if groups is not None and groups.numel() != batch:
            raise ValueError(f"{batch} predictions but {groups.numel()} group ids")
        for n in self.kinds:
            self._preds[n].append(preds[n])  # a copy: an output may view a larger tensor
            self._labels[n].append(labels[n])  # binary labels are 0/1 (the loader checks): cast to uint8
            m, col = masks.get(n), self._masks[n]
            if m is not None and col is None:
                col = self._masks[n] = _Column(torch.bool)
                col.pad(self.rows, True, m.device)  # rows before the first mask are all in
            if col is not None:
                if m is None:
                    col.pad(batch, True, preds[n].device)
                else:
                    col.append(m)  # nonzero -> True
        if self._groups is not None:
            if groups is None:
                self._groups = None
            else:
                self._groups.append(_narrow(groups.detach().reshape(-1)))
        self.rows += batch

    def _all_groups(self) -> Tensor | None:
        """Every row's group on the CPU, once for all outputs (int32 while the ids fit: _narrow; gauc reads
        them as they are, Note [Packed sort keys])."""
        if self._groups is None or not self.rows:
            return None
        return self._groups.tensor(_narrow)

    def compute(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for name, kind in self.kinds.items():
            if not self.rows:
                out[name] = {"n": 0.0}
                continue
            p, y, g = self._preds[name].tensor(), self._labels[name].tensor(), self._all_groups()
            col = self._masks[name]
            if col is not None:
                mask = col.tensor()
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
