"""Sparse embedding updates (optim.py Note [Sparse embedding updates]): when they apply, that they are lazy
Adam on the looked-up rows only, and that runs using them train, resume and weight losses like dense ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mtldsl.runtime import config, optim, trainer
from mtldsl.runtime.optim import RowAdam
from mtldsl.runtime.trainer import ConfigError, TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
MMOE = ROOT / "specs" / "mmoe.mtl"
SHARED_BOTTOM = ROOT / "specs" / "shared_bottom.mtl"


def _cfg(**kw: object) -> TrainConfig:
    base = dict(data="synthetic", data_dir=None, rows=None, data_seed=0, epochs=1, batch_size=256, lr=1e-3,
                weight_decay=0.0, optimizer="adam", weighting="fixed", monitor="mean.auc", patience=1, seed=0,
                device="cpu", checkpoint_every=0, sparse_embeddings="auto")
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_auto_turns_on_for_large_tables_only() -> None:
    big, small = optim.SPARSE_AUTO_BYTES, optim.SPARSE_AUTO_BYTES - 1
    assert optim.use_sparse(_cfg(), big, distributed=False)
    assert not optim.use_sparse(_cfg(), small, distributed=False)
    assert not optim.use_sparse(_cfg(weight_decay=1e-4), big, distributed=False)  # sparse rows take no decay
    assert not optim.use_sparse(_cfg(), big, distributed=True)
    assert optim.use_sparse(_cfg(sparse_embeddings="on"), 0, distributed=False)
    assert not optim.use_sparse(_cfg(sparse_embeddings="off"), big, distributed=False)
    with pytest.raises(ConfigError, match="torchrun"):
        optim.use_sparse(_cfg(sparse_embeddings="on"), 0, distributed=True)


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="weight decay"):
        config.validate_config(_cfg(sparse_embeddings="on", weight_decay=1e-4))
    with pytest.raises(ConfigError, match="unknown --sparse-embeddings setting 'of'"):
        config.validate_config(_cfg(sparse_embeddings="of"))


def test_table_bytes_reads_the_largest_table_without_allocating_it() -> None:
    from mtldsl import compile_spec, load_module, load_spec
    from mtldsl.catalog import SYNTHETIC_VOCAB
    from mtldsl.codegen import class_name

    spec = load_spec(MMOE)
    cls = getattr(load_module(compile_spec(spec), "mmoe_bytes"), class_name(spec.model.name))
    vocab = {f: SYNTHETIC_VOCAB[f] * 1000 for f in cls.SPARSE_FIELDS}
    # one shared table of dim 16 over all 23 fields: 1,530,000 rows x 16 floats (98 MiB), not allocated
    assert optim.table_bytes(cls, vocab) == sum(vocab.values()) * 16 * 4


def _trainer(tmp: Path, spec: Path, sparse: str, **kw: object) -> trainer.Trainer:
    prepared = trainer.prepare(spec.read_text(), str(spec), data="synthetic", data_dir=None, rows=2000, data_seed=0,
                               device=torch.device("cpu"))
    return trainer.Trainer(prepared, _cfg(sparse_embeddings=sparse, **kw), tmp, torch.device("cpu"), progress=False)


def _table(model: nn.Module) -> nn.Embedding:
    (emb,) = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    return emb


def _rows(t: trainer.Trainer, batch: dict) -> torch.Tensor:
    """The table rows a batch looks up (its ids plus each field's offset)."""
    fused = next(m for m in t.model.modules() if hasattr(m, "offsets"))
    return torch.unique(batch["sparse"] + fused.offsets)


def test_sparse_updates_are_lazy_adam_on_the_looked_up_rows(tmp_path: Path) -> None:
    dense, sparse = _trainer(tmp_path / "d", SHARED_BOTTOM, "off"), _trainer(tmp_path / "s", SHARED_BOTTOM, "on")
    assert not dense.sparse and sparse.sparse
    assert isinstance(sparse.optimizer.sparse, RowAdam) and dense.optimizer.sparse is None
    a, b = list(sparse.p.splits["train"].batches(64, shuffle=False))[:2]
    for t in (dense, sparse):
        t.net.train()
        t.train_step(a)
    assert _table(sparse.model).weight.grad.is_sparse and not _table(dense.model).weight.grad.is_sparse
    # Adam's first step is lr * g / (|g| + eps') whether or not the moments are lazy; only where |g| is
    # near eps does it differ (SparseAdam adds eps before the bias correction of the second moment)
    # (its effective eps is 1e-8 / sqrt(1 - beta2) ~ 3e-7): for |g| > 1e-4 the steps agree within 1 % of lr
    grad = _table(dense.model).weight.grad
    for (name, p), q in zip(dense.model.named_parameters(), sparse.model.parameters()):
        if p is _table(dense.model).weight:
            p, q = p[grad.abs() > 1e-4], q[grad.abs() > 1e-4]
            assert p.numel() > 1000
            torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=name)
        else:
            torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=name)
    before = {id(t): _table(t.model).weight.detach().clone() for t in (dense, sparse)}
    for t in (dense, sparse):
        t.train_step(b)
    only_a = torch.tensor(sorted(set(_rows(sparse, a).tolist()) - set(_rows(sparse, b).tolist())))
    assert len(only_a) > 0
    moved = {id(t): (_table(t.model).weight.detach() - before[id(t)])[only_a].abs().amax(1) for t in (dense, sparse)}
    assert torch.all(moved[id(sparse)] == 0)  # lazy: a row outside the batch keeps its value
    assert torch.all(moved[id(dense)] > 0)  # dense Adam's momentum keeps moving it
    assert torch.any((_table(sparse.model).weight.detach() - before[id(sparse)])[_rows(sparse, b)] != 0)


def test_sparse_run_writes_its_choice_and_resumes_exactly(tmp_path: Path) -> None:
    kw = dict(rows=1500, batch_size=256, seed=3, patience=5, progress=False, sparse_embeddings="on")
    full = train(SHARED_BOTTOM, out=tmp_path / "a", epochs=2, **kw)
    assert full.metrics["train"]["sparse_embeddings"] is True
    assert full.metrics["config"]["sparse_embeddings"] == "on"
    assert "sparse" in torch.load(full.run_dir / "last.pt", weights_only=True)["optimizer"]
    train(SHARED_BOTTOM, out=tmp_path / "b", epochs=1, **kw)
    resumed = train(SHARED_BOTTOM, out=tmp_path / "b", resume=True, epochs=2, progress=False)
    a = torch.load(full.run_dir / "last.pt", weights_only=True)["model"]
    b = torch.load(resumed.run_dir / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="sparse_embeddings"):
        train(SHARED_BOTTOM, out=tmp_path / "b", resume=True, epochs=3, progress=False, sparse_embeddings="off")


def test_a_checkpoint_from_before_the_setting_resumes_dense(tmp_path: Path) -> None:
    train(SHARED_BOTTOM, out=tmp_path, rows=600, epochs=1, batch_size=256, progress=False, patience=5)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    del state["config"]["sparse_embeddings"]
    torch.save(state, tmp_path / "last.pt")
    resumed = train(SHARED_BOTTOM, out=tmp_path, resume=True, epochs=2, progress=False)
    assert resumed.metrics["train"]["sparse_embeddings"] is False and resumed.metrics["train"]["epochs"] == 2


@pytest.mark.parametrize("weighting", ["uwl", "gradnorm", "metabalance", "pcgrad"])
def test_every_weighting_trains_with_sparse_tables(weighting: str, tmp_path: Path) -> None:
    t = _trainer(tmp_path, MMOE, "on", weighting=weighting)
    table = _table(t.model).weight
    start = table.detach().clone()
    t.net.train()
    for batch in list(t.p.splits["train"].batches(128, shuffle=False))[:3]:
        losses = t.train_step(batch)
        assert torch.isfinite(losses).all()
        assert table.grad.is_sparse
    assert not torch.equal(table.detach(), start)



@pytest.mark.parametrize("coalesced", [False, True])
def test_row_adam_is_sparse_adam(coalesced: bool) -> None:
    """RowAdam (Note [Row-wise Adam]) against torch's SparseAdam: the same weights and moments over steps
    with duplicate ids in a batch, rows absent from some steps, and an empty gradient."""
    torch.manual_seed(0)
    tables = [nn.Embedding(50, 4, sparse=True) for _ in range(2)]
    tables[1].load_state_dict(tables[0].state_dict())
    ours, ref = RowAdam(tables[0].parameters(), lr=0.05), torch.optim.SparseAdam(tables[1].parameters(), lr=0.05)
    for step in range(6):
        ids = torch.randint(0, 20 if step % 2 else 50, (64,)) if step != 4 else torch.zeros(0, dtype=torch.long)
        target = torch.randn(ids.numel(), 4)
        for table, opt in ((tables[0], ours), (tables[1], ref)):
            opt.zero_grad(set_to_none=True)
            ((table(ids) - target) ** 2).sum().backward()
            if coalesced:
                table.weight.grad = table.weight.grad.coalesce()
            opt.step()
        torch.testing.assert_close(tables[0].weight, tables[1].weight, rtol=1e-6, atol=1e-7)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        a, b = ours.state[tables[0].weight][key], ref.state[tables[1].weight][key]
        assert a == b if key == "step" else torch.allclose(a, b, rtol=1e-5, atol=1e-6), key  # duplicates add up in another order
    ref.load_state_dict(ours.state_dict())  # the same state layout: checkpoints load either way


def test_row_adam_refuses_dense_gradients() -> None:
    table = nn.Embedding(5, 2)
    opt = RowAdam(table.parameters())
    table(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients only"):
        opt.step()
