"""DeLong's test (workbench/delong.py, Note [DeLong]) against the O(mn) definition and a bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from mtldsl.workbench.delong import delong, midranks, structural_components


def _brute(y: np.ndarray, s: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and structural components straight from psi(X_i, Y_j) over every positive/negative pair."""
    x, z = s[y == 1], s[y == 0]
    psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
    return float(psi.mean()), psi.mean(1), psi.mean(0)


def _data(n: int, seed: int, ties: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.int64)
    a = y * 0.8 + rng.normal(size=n)
    b = 0.7 * a + y * 0.2 + rng.normal(size=n) * 0.8  # correlated with a
    if ties:
        a, b = np.round(a, 1), np.round(b, 1)
    return y, a, b


def test_midranks_share_ties() -> None:
    assert midranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


@pytest.mark.parametrize("ties", [False, True])
def test_fast_components_equal_the_pairwise_definition(ties: bool) -> None:
    y, a, b = _data(300, 1, ties)
    aucs, v10, v01 = structural_components(y.astype(bool), np.stack([a, b]))
    for r, s in enumerate((a, b)):
        auc, b10, b01 = _brute(y, s)
        assert aucs[r] == pytest.approx(auc, abs=1e-12)
        np.testing.assert_allclose(v10[r], b10, atol=1e-12)
        np.testing.assert_allclose(v01[r], b01, atol=1e-12)


def test_standard_error_matches_the_pairwise_formula_and_a_bootstrap() -> None:
    y, a, b = _data(400, 2)
    res = delong(y, a, b)
    assert res is not None
    _, a10, a01 = _brute(y, a)
    _, b10, b01 = _brute(y, b)
    m, n = len(a10), len(a01)
    s10, s01 = np.cov(np.stack([a10, b10])), np.cov(np.stack([a01, b01]))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    assert res.se == pytest.approx(np.sqrt(var), rel=1e-9)
    rng = np.random.default_rng(0)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    diffs = []
    for _ in range(400):  # stratified bootstrap of the AUC difference
        idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        diffs.append(_brute(y[idx], a[idx])[0] - _brute(y[idx], b[idx])[0])
    assert res.se == pytest.approx(np.std(diffs, ddof=1), rel=0.15)
    assert res.diff == pytest.approx(res.auc_a - res.auc_b)


def test_p_value_is_small_for_a_real_gap_and_one_for_identical_scores() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(2000) < 0.5).astype(np.int64)
    good = y + rng.normal(size=2000) * 0.5
    poor = y + rng.normal(size=2000) * 3.0
    res = delong(y, good, poor)
    assert res is not None and res.diff > 0 and res.p < 1e-6
    same = delong(y, good, good)
    assert same is not None and same.diff == 0 and same.p == 1.0


def test_no_positives_gives_none_and_length_mismatch_is_an_error() -> None:
    assert delong(np.zeros(10), np.arange(10.0), np.arange(10.0)) is None
    with pytest.raises(ValueError, match="differ in length"):
        delong(np.array([0, 1, 0]), np.arange(3.0), np.arange(4.0))
