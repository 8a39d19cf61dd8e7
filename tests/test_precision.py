"""Mixed precision (precision.py Note [Mixed precision]): when `auto` picks bf16, that logits stay float32 under
bf16 autocast (layers Note [Float32 logits]), that a table casts its output once, and that bf16 runs
train, record their choice, predict without ties and resume."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from mtldsl.runtime import trainer
from mtldsl.runtime.layers import BatchedExperts, Tower
from mtldsl.runtime.trainer import BF16_AUTO_MACS, ConfigError, dense_macs, evaluate, predict, resolve_precision, train

ROOT = Path(__file__).resolve().parents[1]
SHARED_BOTTOM = ROOT / "specs" / "shared_bottom.mtl"
CPU = torch.device("cpu")
PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
BIG = BF16_AUTO_MACS  # a model just large enough for bf16 under `auto`


@pytest.mark.parametrize("native", [(False, False), (True, False), (False, True)], ids=["none", "avx512", "amx"])
def test_auto_is_bf16_exactly_where_the_cpu_has_bf16_instructions(native: tuple[bool, bool],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in zip(PROBES, native):
        monkeypatch.setattr(torch.cpu, name, lambda value=value: value, raising=False)
    assert trainer.native_bf16(CPU) is any(native)
    assert resolve_precision("auto", CPU, BIG) == ("bf16" if any(native) else "fp32")
    assert resolve_precision("auto", CPU, BIG - 1) == "fp32"  # too small: the casts would cost more
    assert resolve_precision("fp32", CPU, BIG) == "fp32" and resolve_precision("bf16", CPU, 1) == "bf16"


def test_a_torch_without_the_probes_means_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROBES:
        monkeypatch.delattr(torch.cpu, name, raising=False)
    assert resolve_precision("auto", CPU, BIG) == "fp32"


def test_unknown_precision_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown precision 'fp16'"):
        resolve_precision("fp16", CPU, BIG)
    with pytest.raises(ConfigError, match="unknown precision 'bf61'.*bf16"):
        train(SHARED_BOTTOM, rows=300, precision="bf61", progress=False)


def test_dense_macs_counts_layer_weights_not_tables_or_vectors() -> None:
    model = nn.ModuleDict({"emb": nn.Embedding(1000, 16), "a": nn.Linear(16, 8), "b": nn.BatchNorm1d(8),
                           "c": nn.Linear(8, 1), "d": BatchedExperts(n=3, d_in=16, dims=(4, 2))})
    assert dense_macs(model) == 16 * 8 + 8 * 1 + 3 * (16 * 4 + 4 * 2)  # no tables, biases or norms
    from mtldsl import build_model

    mmoe = build_model(ROOT / "specs" / "mmoe.mtl", vocab_sizes=10)  # 8 experts 376 -> 256 -> 128, gates, towers
    assert dense_macs(mmoe) == 8 * (376 * 256 + 256 * 128) + 2 * 376 * 8 + 2 * (128 * 8 + 8)


def test_a_table_output_is_cast_once_for_all_its_readers() -> None:
    """Note [One cast per table]: under autocast the lookup is handed out in bf16 (one cast, one cast back)."""
    from mtldsl.runtime.layers import FusedEmbedding

    emb = FusedEmbedding(vocab_sizes=(5, 6), dim=4, sparse_columns=None, dense_columns=(0,))
    ids, dense = torch.tensor([[1, 2], [4, 5]]), torch.tensor([[0.5], [2.0]])
    assert emb(ids, dense).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = emb(ids, dense)
        readers = nn.Linear(9, 3)(x).sum() + nn.Linear(9, 2)(x).sum()
    assert x.dtype == torch.bfloat16
    casts = [f for f in _graph(readers.grad_fn) if f.name() == "ToCopyBackward0"
             and f.next_functions[0][0].name() != "torch::autograd::AccumulateGrad"]  # not the weights' casts
    assert len(casts) == 1  # of the activations: one, not one per reader
    readers.backward()
    assert emb.embedding.weight.grad.dtype == torch.float32


def _graph(fn: object) -> list:
    seen, todo = [], [fn]
    while todo:
        f = todo.pop()
        if f is None or any(f is g for g in seen):
            continue
        seen.append(f)
        todo.extend(g for g, _ in f.next_functions)  # type: ignore[attr-defined]
    return seen


def test_the_logit_stays_float32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    tower = Tower(d_in=16, dims=(8,), batch_norm=True).eval()
    h = torch.randn(64, 8) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert nn.Linear(8, 1)(h).dtype == torch.bfloat16  # autocast is on: a plain Linear would round
        logit = tower.head(h)
        full = tower(torch.randn(64, 16))
    assert logit.dtype == torch.float32 and full.dtype == torch.float32
    assert torch.equal(logit, tower.head(h))  # the same float32 arithmetic as without autocast


def test_bf16_run_records_it_predicts_without_ties_and_resumes_in_fp32(tmp_path: Path) -> None:
    kw = dict(rows=3000, batch_size=256, seed=1, patience=5, progress=False)
    run = train(SHARED_BOTTOM, out=tmp_path / "run", epochs=1, precision="bf16", **kw)
    assert run.metrics["train"]["precision"] == "bf16" and run.metrics["config"]["precision"] == "bf16"
    assert all(0.0 <= run.metrics["tasks"][k]["logloss"] < 1.0 for k in ("ctr", "cvr"))
    assert all(p.dtype == torch.float32 for p in run.model.parameters())  # weights stay float32
    assert evaluate(run.run_dir, split="test", device="cpu").metrics == run.metrics["tasks"]  # evaluated in bf16 too
    preds = pd.read_parquet(predict(run.run_dir, tmp_path / "p.parquet", split="test", device="cpu"))
    # bf16 logits would leave at most a few hundred distinct probabilities (a step of 1/32 near logit -4)
    assert preds["ctr"].nunique() > 0.9 * len(preds), preds["ctr"].nunique()
    resumed = train(SHARED_BOTTOM, out=tmp_path / "run", resume=True, epochs=2, precision="fp32", progress=False)
    assert resumed.metrics["train"]["precision"] == "fp32" and resumed.metrics["train"]["epochs"] == 2


def test_a_cpu_checkpoint_from_before_the_setting_resumes_in_fp32(tmp_path: Path) -> None:
    train(SHARED_BOTTOM, out=tmp_path, rows=600, epochs=1, batch_size=256, progress=False, patience=5,
          device="cpu", precision="bf16")
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    del state["config"]["precision"]
    torch.save(state, tmp_path / "last.pt")
    resumed = train(SHARED_BOTTOM, out=tmp_path, resume=True, epochs=2, progress=False)
    assert resumed.metrics["train"]["precision"] == "fp32" and resumed.metrics["config"]["precision"] == "fp32"
