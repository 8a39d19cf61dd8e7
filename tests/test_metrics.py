"""runtime/metrics.py against hand-computed values and brute-force definitions."""

from __future__ import annotations

import math

import pytest
import torch

from mtldsl.runtime.metrics import Accumulator, auc, gauc, logloss, mae, mse


def brute_auc(scores: list[float], labels: list[float]) -> float:
    """P(score of a positive > score of a negative), ties counting one half: O(n^2)."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    if not pos or not neg:
        return math.nan
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def brute_gauc(scores: list[float], labels: list[float], groups: list[int]) -> float:
    total = weight = 0.0
    for g in set(groups):
        rows = [i for i, x in enumerate(groups) if x == g]
        a = brute_auc([scores[i] for i in rows], [labels[i] for i in rows])
        if not math.isnan(a):
            total += a * len(rows)
            weight += len(rows)
    return total / weight if weight else math.nan


def random_case(seed: int, n: int, *, ties: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, generator=g)
    if ties:
        scores = (scores * 5).round() / 5  # six distinct values: many ties, within and across classes
    labels = (torch.rand(n, generator=g) < 0.3).float()
    groups = torch.randint(-3, 12, (n,), generator=g) * 1000  # arbitrary ids, some groups single-class
    return scores, labels, groups


def test_auc_by_hand() -> None:
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auc(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0, 1, 1])) == pytest.approx(0.5)
    assert auc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1, 0, 0])) == 1.0
    assert auc(torch.tensor([0.2, 0.6, 0.6, 0.9]), torch.tensor([1.0, 0.0, 1.0, 0.0])) == pytest.approx(0.125)
    assert math.isnan(auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))
    assert math.isnan(auc(torch.tensor([]), torch.tensor([])))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_auc_matches_brute_force(seed: int, ties: bool) -> None:
    scores, labels, _ = random_case(seed, 60 + 37 * seed, ties=ties)
    assert auc(scores, labels) == pytest.approx(brute_auc(scores.tolist(), labels.tolist()), abs=1e-12)
    assert auc(scores[:, None].half(), labels[:, None]) == pytest.approx(
        brute_auc(scores.half().tolist(), labels.tolist()), abs=1e-12
    )  # any shape and float dtype


def test_gauc_by_hand() -> None:
    scores = torch.tensor([0.9, 0.1, 0.5, 0.2, 0.3, 0.7, 0.4])
    labels = torch.tensor([1, 0, 0, 1, 1, 0, 1])
    groups = torch.tensor([7, 7, 3, 3, 3, 9, 9])
    # group 7: auc 1 (2 rows); group 3: positives 0.2, 0.3 vs negative 0.5 -> 0 (3 rows); group 9: 0 (2 rows)
    assert gauc(scores, labels, groups) == pytest.approx((1 * 2 + 0 * 3 + 0 * 2) / 7)
    assert math.isnan(gauc(scores, torch.ones(7), groups))  # no group has both classes


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_gauc_matches_brute_force(seed: int, ties: bool) -> None:
    scores, labels, groups = random_case(seed, 80 + 41 * seed, ties=ties)
    expected = brute_gauc(scores.tolist(), labels.tolist(), groups.tolist())
    assert gauc(scores, labels, groups) == pytest.approx(expected, abs=1e-12)


def test_gauc_with_one_group_is_auc() -> None:
    scores, labels, _ = random_case(11, 300, ties=True)
    assert gauc(scores, labels, torch.zeros(300, dtype=torch.int64)) == pytest.approx(auc(scores, labels), abs=1e-12)


def test_logloss_mse_mae() -> None:
    p = torch.tensor([0.9, 0.2, 0.6, 0.0, 1.0])
    y = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
    eps = 1e-7
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(1 - eps) + math.log(eps)) / 5
    assert logloss(p, y) == pytest.approx(expected, rel=1e-6)  # float32 inputs
    assert math.isfinite(logloss(torch.tensor([1.0]), torch.tensor([0.0])))  # clamped
    pred, target = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([2.0, 2.0, 1.0])
    assert mse(pred, target) == pytest.approx((1 + 0 + 9) / 3)
    assert mae(pred, target) == pytest.approx((1 + 0 + 3) / 3)
    with pytest.raises(ValueError, match="differ in size"):
        mse(pred, target[:2])


def test_accumulator_matches_direct_metrics() -> None:
    g = torch.Generator().manual_seed(0)
    n = 1000
    ctr, cvr, watch = torch.rand(n, generator=g), torch.rand(n, generator=g), torch.rand(n, generator=g) * 10
    click = (torch.rand(n, generator=g) < 0.3).float()
    buy = click * (torch.rand(n, generator=g) < 0.4).float()
    seconds = watch + torch.randn(n, generator=g)
    users = torch.randint(0, 40, (n,), generator=g)
    acc = Accumulator({"ctr": "binary", "cvr@click": "binary", "watch": "regression"})
    for s in range(0, n, 128):  # uneven last batch; (B, 1) predictions as towers return them
        b = slice(s, s + 128)
        acc.update(
            {"ctr": ctr[b, None], "cvr@click": cvr[b, None], "watch": watch[b]},
            {"ctr": click[b], "cvr@click": buy[b], "watch": seconds[b]},
            groups=users[b],
            masks={"cvr@click": click[b]},
        )
    out = acc.compute()
    assert out["ctr"] == pytest.approx(
        {"auc": auc(ctr, click), "logloss": logloss(ctr, click), "gauc": gauc(ctr, click, users), "n": n}
    )
    on = click == 1
    assert out["cvr@click"] == pytest.approx(
        {
            "auc": auc(cvr[on], buy[on]),
            "logloss": logloss(cvr[on], buy[on]),
            "gauc": gauc(cvr[on], buy[on], users[on]),
            "n": float(on.sum()),
        }
    )
    assert out["watch"] == pytest.approx({"mse": mse(watch, seconds), "mae": mae(watch, seconds), "n": n})
    acc.reset()
    assert acc.compute() == {"ctr": {"n": 0.0}, "cvr@click": {"n": 0.0}, "watch": {"n": 0.0}}


def test_accumulator_keeps_tensors_until_compute() -> None:
    acc = Accumulator({"ctr": "binary"})
    p = torch.tensor([0.2, 0.8], requires_grad=True)
    acc.update({"ctr": p * 1}, {"ctr": torch.tensor([0, 1])})
    assert not acc._preds["ctr"].tensor().requires_grad  # detached: no graph kept alive
    out = acc.compute()
    assert set(out["ctr"]) == {"auc", "logloss", "n"}  # no groups given: no gauc
    assert out["ctr"]["auc"] == 1.0


def test_accumulator_columns_cross_chunks_widen_and_backfill(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny chunks (Note [Evaluation buffers]): batches cut across chunk ends and doublings give the same
    rows; group ids widen from int32 to int64 when a batch's do not fit; a mask first given at the third
    batch counts the rows before it in; a batch without groups drops gauc."""
    import mtldsl.runtime.metrics as metrics

    monkeypatch.setattr(metrics, "CHUNK_BYTES", 28)  # 7 float32 rows, 28 uint8/bool rows
    monkeypatch.setattr(metrics, "FIRST_ROWS", 2)
    g = torch.Generator().manual_seed(1)
    n = 103
    ctr, cvr = torch.rand(n, generator=g), torch.rand(n, generator=g)
    click = (torch.rand(n, generator=g) < 0.5).float()
    buy = click * (torch.rand(n, generator=g) < 0.5).float()
    users = torch.randint(0, 9, (n,), generator=g)
    users[60:] += 2**40  # a later batch's ids do not fit int32
    acc = Accumulator({"ctr": "binary", "cvr@click": "binary"})
    cuts = [0, 5, 6, 30, 31, 60, 88, n]
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        acc.update({"ctr": ctr[a:b], "cvr@click": cvr[a:b]}, {"ctr": click[a:b], "cvr@click": buy[a:b]},
                   groups=users[a:b], masks={"cvr@click": click[a:b]} if i >= 2 else None)
    assert len(acc._preds["ctr"]) == n and len(acc._preds["ctr"].full) > 1
    out = acc.compute()
    assert acc._groups is not None and acc._groups.dtype == torch.int64
    assert out["ctr"] == pytest.approx(
        {"auc": auc(ctr, click), "logloss": logloss(ctr, click), "gauc": gauc(ctr, click, users), "n": n})
    on = torch.ones(n, dtype=torch.bool)
    on[cuts[2]:] = click[cuts[2]:] == 1
    assert out["cvr@click"] == pytest.approx(
        {"auc": auc(cvr[on], buy[on]), "logloss": logloss(cvr[on], buy[on]), "gauc": gauc(cvr[on], buy[on], users[on]),
         "n": float(on.sum())})
    assert acc.compute() == out  # the concatenated columns are kept: compute() again gives the same
    acc.update({"ctr": ctr[:4], "cvr@click": cvr[:4]}, {"ctr": click[:4], "cvr@click": buy[:4]})
    assert "gauc" not in acc.compute()["ctr"] and acc.compute()["ctr"]["n"] == n + 4


def test_accumulator_errors() -> None:
    with pytest.raises(ValueError, match="unknown task kind 'ranking'"):
        Accumulator({"ctr": "ranking"})
    acc = Accumulator({"ctr": "binary", "cvr": "binary"})
    with pytest.raises(KeyError, match="batch predictions lack cvr"):
        acc.update({"ctr": torch.rand(3)}, {"ctr": torch.ones(3), "cvr": torch.ones(3)})
    with pytest.raises(KeyError, match="masks for unregistered outputs: ctcvr"):
        acc.update({"ctr": torch.rand(3), "cvr": torch.rand(3)}, {"ctr": torch.ones(3), "cvr": torch.ones(3)}, masks={"ctcvr": torch.ones(3)})
    with pytest.raises(ValueError, match="output 'ctr': 3 predictions but 2 labels"):
        acc.update({"ctr": torch.rand(3), "cvr": torch.rand(3)}, {"ctr": torch.ones(2), "cvr": torch.ones(3)})
    with pytest.raises(ValueError, match="outputs differ in rows: ctr 3, cvr 2"):
        acc.update({"ctr": torch.rand(3), "cvr": torch.rand(2)}, {"ctr": torch.ones(3), "cvr": torch.ones(2)})
    with pytest.raises(ValueError, match="3 predictions but 4 group ids"):
        acc.update({"ctr": torch.rand(3), "cvr": torch.rand(3)}, {"ctr": torch.ones(3), "cvr": torch.ones(3)},
                   groups=torch.arange(4))
    assert acc.rows == 0 and len(acc._preds["ctr"]) == 0  # a rejected batch copies nothing


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_auc_and_gauc_in_other_dtypes(dtype: torch.dtype) -> None:
    """float64 takes the argsort path, bfloat16 the packed keys (Note [Packed sort keys]); both exact."""
    scores, labels, groups = random_case(5, 257, ties=True)
    s = scores.to(dtype)
    as_list = s.float().tolist()  # bfloat16 -> float32 is exact, as is float32 -> float64
    assert auc(s, labels) == pytest.approx(brute_auc(as_list, labels.tolist()), abs=1e-12)
    assert gauc(s, labels, groups) == pytest.approx(brute_gauc(as_list, labels.tolist(), groups.tolist()), abs=1e-12)


def test_packed_keys_order_signed_scores_and_zero() -> None:
    """Negative scores, -0.0 against +0.0 (a tie), and chunks cut inside a long run of ties."""
    import mtldsl.runtime.metrics as metrics

    scores = torch.tensor([-3.5, -0.0, 0.0, 2.0, -1e-30, 1e30, -0.0, 0.0])
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0])
    assert auc(scores, labels) == pytest.approx(brute_auc(scores.tolist(), labels.tolist()), abs=1e-12)
    old, metrics.CHUNK = metrics.CHUNK, 3  # chunk boundaries fall inside runs and groups
    try:
        for seed in range(4):
            s, y, g = random_case(seed, 200, ties=True)
            assert auc(s, y) == pytest.approx(brute_auc(s.tolist(), y.tolist()), abs=1e-12)
            expected = brute_gauc(s.tolist(), y.tolist(), g.tolist())
            assert gauc(s, y, g) == pytest.approx(expected, abs=1e-12)  # negative ids: relabelled
            assert gauc(s, y, g + 3000) == pytest.approx(expected, abs=1e-12)  # ids packed as they are
    finally:
        metrics.CHUNK = old
