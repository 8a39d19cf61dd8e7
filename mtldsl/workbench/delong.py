"""DeLong's test for two correlated ROC curves (two models scored on the same rows).

Takes labels (0/1) and two score vectors of the same rows; gives both AUCs, their difference, its standard
error and a two-sided p-value (Note [DeLong]). NumPy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["DeLong", "delong", "midranks", "structural_components"]

# Note [DeLong]
# ~~~~~~~~~~~~~
# DeLong, DeLong & Clarke-Pearson (Biometrics 1988) write the AUC of a score as the mean of
# psi(X_i, Y_j) over the m positive scores X and the n negative scores Y (psi = 1 when X > Y, 1/2 on a
# tie, 0 otherwise), and its variance through the structural components V10_i = mean_j psi(X_i, Y_j) and
# V01_j = mean_i psi(X_i, Y_j): for k scores of the same rows, Cov(AUC) = S10 / m + S01 / n, with S10 and
# S01 the k x k sample covariances of the components. The difference of two AUCs has variance
# S[0,0] + S[1,1] - 2 S[0,1]; z = difference / its SE is compared with the standard normal.
# Sun & Xu (IEEE Signal Processing Letters 2014) compute the components from midranks in O((m+n) log(m+n))
# instead of O(mn): with Tz the midranks of all m + n scores, Tx those of the positives among themselves
# and Ty of the negatives among themselves, V10 = (Tz[pos] - Tx) / n and V01 = 1 - (Tz[neg] - Ty) / m.
# tests/test_delong.py checks both against the O(mn) definition and a bootstrap.


@dataclass(frozen=True)
class DeLong:
    auc_a: float
    auc_b: float
    diff: float  # auc_a - auc_b
    se: float
    z: float
    p: float  # two-sided
    positives: int
    negatives: int


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x`, ties sharing the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    n = len(x)
    ranks = np.empty(n, dtype=np.float64)
    # starts of runs of equal values
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], n]  # exclusive
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def structural_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For scores (k, N) of rows with labels y (N,): AUCs (k,), V10 (k, m) and V01 (k, n) (Sun & Xu)."""
    pos = y.astype(bool)
    m, n = int(pos.sum()), int((~pos).sum())
    k = scores.shape[0]
    v10, v01 = np.empty((k, m)), np.empty((k, n))
    aucs = np.empty(k)
    for r in range(k):
        tz = midranks(scores[r])
        tx = midranks(scores[r][pos])
        ty = midranks(scores[r][~pos])
        aucs[r] = (tz[pos].sum() - m * (m + 1) / 2.0) / (m * n)
        v10[r] = (tz[pos] - tx) / n
        v01[r] = 1.0 - (tz[~pos] - ty) / m
    return aucs, v10, v01


def delong(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> DeLong | None:
    """DeLong's test of AUC(a) = AUC(b) on rows labelled y; None when y lacks positives or negatives."""
    y = np.asarray(y).reshape(-1)
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if not len(a) == len(b) == len(y):
        raise ValueError(f"labels and scores differ in length ({len(y)}, {len(a)}, {len(b)})")
    scores = np.stack([a, b])
    m = int((y > 0.5).sum())
    n = len(y) - m
    if m < 2 or n < 2:
        return None
    aucs, v10, v01 = structural_components(y > 0.5, scores)
    s = np.cov(v10) / m + np.cov(v01) / n
    var = float(s[0, 0] + s[1, 1] - 2 * s[0, 1])
    diff = float(aucs[0] - aucs[1])
    se = math.sqrt(max(var, 0.0))
    if se == 0.0:
        z, p = 0.0, 1.0 if diff == 0.0 else 0.0
    else:
        z = diff / se
        p = math.erfc(abs(z) / math.sqrt(2.0))
    return DeLong(float(aucs[0]), float(aucs[1]), diff, se, z, p, m, n)
