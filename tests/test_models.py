"""Semantics of every generated model with random weights: outputs, and gradient visibility.

The graph says which blocks each loss reaches through backward-enabled edges (graph.grad_reach)
and which blocks each output depends on (forward ancestors). The generated module must agree
exactly: a loss leaves every unreached block's parameters with no gradient, and perturbing a
block changes exactly the outputs downstream of it (Note [Gate visibility]).
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest
import torch

import mtldsl
from mtldsl.graph import grad_reach

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.mtl"))
VOCAB = 50


def make_batch(model, n: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "sparse": torch.randint(0, VOCAB, (n, len(model.SPARSE_FIELDS)), generator=g),
        "dense": torch.rand(n, len(model.DENSE_FIELDS), generator=g),
    }


def blocks_with_params(model) -> dict[str, list[torch.nn.Parameter]]:
    return {name: list(m.parameters()) for name, m in model.named_children() if any(True for _ in m.parameters())}


def attr(node: str, graph: nx.DiGraph) -> str:
    data = graph.nodes[node]
    return f"transfer_{data['name']}" if data["kind"] == "transfer" else data["name"]


def randomized(model):
    """Random weights everywhere: tables too (they start near zero, which hides small effects)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Embedding):
                m.weight.normal_(0.0, 1.0)
    return model


@pytest.fixture(params=SPECS, ids=lambda p: p.stem)
def built(request):
    torch.manual_seed(0)
    checked = mtldsl.load_spec(request.param)
    model = randomized(mtldsl.build_model(checked, VOCAB))
    return checked, model


def test_outputs_names_and_shapes(built) -> None:
    checked, model = built
    out = model(make_batch(model))
    assert tuple(out) == tuple(o.name for o in checked.model.outputs) == model.OUTPUTS
    for name, value in out.items():
        assert value.shape == (64,), name
        assert torch.isfinite(value).all()
        kind = next(o.kind.value for o in checked.model.outputs if o.name == name)
        if kind == "binary":
            assert ((value >= 0) & (value <= 1)).all()


def test_each_loss_reaches_exactly_the_graph_reach(built) -> None:
    checked, model = built
    graph = checked.graph
    params = blocks_with_params(model)
    for loss in checked.model.losses:
        model.zero_grad(set_to_none=True)
        model(make_batch(model))[loss.output].sum().backward()
        reach = {attr(n, graph) for n in grad_reach(graph, f"loss:{loss.output}")}
        for name, ps in params.items():
            got = any(p.grad is not None and p.grad.abs().sum() > 0 for p in ps)
            assert got == (name in reach), f"loss {loss.output}: block {name} gradient {got}, graph says {name in reach}"


def test_outputs_depend_exactly_on_forward_ancestors(built) -> None:
    checked, model = built
    graph = checked.graph
    model.eval()
    batch = make_batch(model)
    with torch.no_grad():
        base = model(batch)
        for name, ps in blocks_with_params(model).items():
            saved = [p.detach().clone() for p in ps]
            for p in ps:
                p.add_(torch.randn_like(p) * 0.5)
            out = model(batch)
            for p, s in zip(ps, saved):
                p.copy_(s)
            node = next(n for n in graph.nodes if attr(n, graph) == name)
            downstream = {graph.nodes[n]["name"] for n in nx.descendants(graph, node) if graph.nodes[n]["kind"] == "output"}
            for o in out:
                changed = not torch.allclose(out[o], base[o])
                assert changed == (o in downstream), f"perturbing {name}: output {o} changed={changed}"


def load(name: str):
    torch.manual_seed(0)
    checked = mtldsl.load_spec(ROOT / "specs" / f"{name}.mtl")
    return checked, randomized(mtldsl.build_model(checked, VOCAB))


def grads_from(model, output: str, blocks: list[str]) -> dict[str, bool]:
    model.zero_grad(set_to_none=True)
    model(make_batch(model))[output].sum().backward()
    return {b: any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, b).parameters()) for b in blocks}


def changes(model, output: str, block: str) -> bool:
    model.eval()
    batch = make_batch(model)
    with torch.no_grad():
        before = model(batch)[output].clone()
        for p in getattr(model, block).parameters():
            p.add_(1.0)
        return not torch.allclose(before, model(batch)[output])


def test_stem_detach_blocks_cross_task_gradient_but_not_forward() -> None:
    _, model = load("stem")
    assert grads_from(model, "ctr", ["emb_cvr", "experts_cvr", "emb_ctr", "experts_ctr", "experts_shared", "emb_shared"]) == {
        "emb_cvr": False, "experts_cvr": False, "emb_ctr": True, "experts_ctr": True,
        "experts_shared": True, "emb_shared": True}
    assert changes(model, "ctr", "experts_cvr")


def test_mmoe_every_task_reaches_and_sees_all_experts() -> None:
    _, model = load("mmoe")
    assert grads_from(model, "ctr", ["experts", "emb"]) == {"experts": True, "emb": True}
    assert grads_from(model, "cvr", ["experts", "emb"]) == {"experts": True, "emb": True}
    assert changes(model, "ctr", "experts")


def test_ple_final_level_specific_experts_are_private() -> None:
    _, model = load("ple")
    assert grads_from(model, "ctr", ["specific_cvr_l2", "specific_ctr_l2", "shared_experts_l2"]) == {
        "specific_cvr_l2": False, "specific_ctr_l2": True, "shared_experts_l2": True}
    assert not changes(model, "ctr", "specific_cvr_l2")
    assert changes(model, "ctr", "specific_cvr_l1")  # through the level-1 shared gate


def test_esmm_cvr_is_trained_only_through_ctcvr() -> None:
    checked, model = load("esmm")
    assert [lo.output for lo in checked.model.losses] == ["ctr", "ctcvr"]
    out = model(make_batch(model))
    assert torch.allclose(out["ctcvr"], out["ctr"] * out["cvr"])


# ---- list fields pooled by tables (Note [List fields]) ------------------------------------------

LISTS_SPEC = "tests/golden/shop_lists.mtl"  # relative to ROOT: its `data "tests/data/shop"` is too


def list_batch(model, n: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """A hand-built batch in the shape the data loader produces: every list field's ids and offsets
    (weights for the weighted ones), some lists empty."""
    g = torch.Generator().manual_seed(seed)
    batch = make_batch(model, n, seed)
    for f in model.LIST_FIELDS:
        lengths = torch.randint(0, 5, (n,), generator=g)
        lengths[:3] = 0
        batch[f"{f}.offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
        batch[f"{f}.ids"] = torch.randint(0, VOCAB, (int(lengths.sum()),), generator=g)
        if f in model.WEIGHTED_FIELDS:
            batch[f"{f}.weights"] = torch.rand(int(lengths.sum()), generator=g) + 0.5
    batch["click"] = torch.randint(0, 2, (n,), generator=g).float()
    batch["purchase"] = batch["click"] * torch.randint(0, 2, (n,), generator=g).float()
    return batch


@pytest.fixture
def pooled(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    checked = mtldsl.load_spec(LISTS_SPEC)
    return checked, mtldsl.build_model(checked, VOCAB)


def test_pooled_model_trains(pooled) -> None:
    checked, model = pooled
    assert model.LIST_FIELDS == checked.model.list_fields == ("clicked_items", "tags", "109_14")
    batch = list_batch(model)
    bce = torch.nn.functional.binary_cross_entropy
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(8):
        out = model(batch)
        assert all(v.shape == (32,) and torch.isfinite(v).all() for v in out.values())
        loss = bce(out["ctr"], batch["click"]) + bce(out["ctcvr"], batch["purchase"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_pooled_gradient_reaches_the_rows_of_the_ids_present(pooled, sparse_grad: bool) -> None:
    checked, _ = pooled
    model = randomized(mtldsl.build_model(checked, VOCAB, sparse_grad=sparse_grad))
    batch = list_batch(model, seed=1)
    model(batch)["ctr"].sum().backward()
    present = set(batch["clicked_items.ids"].tolist())
    grad = model.clicks.embedding.weight.grad  # one list field: rows are its ids
    assert grad.is_sparse == sparse_grad
    grad = grad.to_dense() if sparse_grad else grad
    assert set((grad != 0).any(dim=1).nonzero().flatten().tolist()) == present
    beh = model.beh.embedding.weight.grad  # two list fields, two copies: 109_14's rows first, then tags'
    beh = beh.to_dense() if sparse_grad else beh
    rows = {c * 2 * VOCAB + i for c in range(2) for i in batch["109_14.ids"].tolist()}
    rows |= {c * 2 * VOCAB + VOCAB + i for c in range(2) for i in batch["tags.ids"].tolist()}
    assert set((beh != 0).any(dim=1).nonzero().flatten().tolist()) == rows
