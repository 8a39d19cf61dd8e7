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
