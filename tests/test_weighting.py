"""Each loss-weighting strategy does what its paper says, on toy models small enough to check by hand.

The toy model is a shared linear layer (or a shared vector) feeding one head per task; the tasks'
losses are built so that their gradients differ in scale or conflict in direction.
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
from torch import nn

from mtldsl.runtime import weighting as W


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation overhead (10x on a loaded 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Toy(nn.Module):
    """x -> shared Linear(4, 4) -> heads a, b (Linear(4, 1) each)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.shared = nn.Linear(4, 4)
        self.head_a = nn.Linear(4, 1)
        self.head_b = nn.Linear(4, 1)

    def losses(self, x: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor, scale_b: float = 1.0) -> dict[str, torch.Tensor]:
        h = torch.relu(self.shared(x))
        la = (self.head_a(h).squeeze(-1) - ya).pow(2).mean()
        lb = (self.head_b(h).squeeze(-1) - yb).pow(2).mean() * scale_b
        return {"a": la, "b": lb}


def data(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, x[:, 0] + 0.5 * x[:, 1], -x[:, 0] + x[:, 2]


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def zero(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def task_grad(loss: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params, retain_graph=True))


# --- interface ---------------------------------------------------------------------------------------


def test_make_knows_every_name_and_rejects_typos() -> None:
    model = Toy()
    for name in W.NAMES:
        w = W.make(name, ["a", "b"], {}, list(model.shared.parameters()))
        assert isinstance(w, W.Weighting) and w.name == name
    with pytest.raises(ValueError, match="did you mean 'pcgrad'"):
        W.make("pcgard", ["a", "b"], {}, [])
    with pytest.raises(ValueError, match="unknown task"):
        W.make("fixed", ["a", "b"], {"c": 1.0}, [])


@pytest.mark.parametrize("name", W.NAMES)
def test_every_strategy_fills_all_grads_and_returns_scalar_tensors(name: str) -> None:
    model = Toy()
    w = W.make(name, ["a", "b"], {"b": 0.5}, list(model.shared.parameters()))
    out = w.backward(model.losses(*data()))
    assert list(out) == ["a", "b"]
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in out.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match="missing"):
        w.backward({"a": model.losses(*data())["a"]})


@pytest.mark.parametrize("name", W.NAMES)
def test_single_task_and_no_shared_parameters_reduce_to_the_plain_loss(name: str) -> None:
    model = Toy()
    loss = model.losses(*data())["a"]
    loss.backward(retain_graph=True)
    expected = grads(model)
    zero(model)
    W.make(name, ["a"], {}, list(model.shared.parameters())).backward({"a": loss})
    got = grads(model)  # UWL's binary form starts at weight exp(0) = 1 too
    assert got.keys() == expected.keys()
    assert all(torch.allclose(got[k], expected[k], rtol=0, atol=1e-7) for k in expected)


# --- fixed -------------------------------------------------------------------------------------------


def test_fixed_equals_the_weighted_sum_exactly() -> None:
    model = Toy()
    losses = model.losses(*data())
    (1.0 * losses["a"] + 0.3 * losses["b"]).backward(retain_graph=True)
    expected = grads(model)
    zero(model)
    out = W.make("fixed", ["a", "b"], {"b": 0.3}, list(model.shared.parameters())).backward(losses)
    got = grads(model)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert out["a"].item() == 1.0 and out["b"].item() == pytest.approx(0.3)


# --- UWL ---------------------------------------------------------------------------------------------


def test_uwl_reaches_the_analytic_optimum_and_gives_the_noisier_task_less_weight() -> None:
    # Constant losses L = (0.2, 2.0): minimising exp(-s) L + s/2 over s gives weight exp(-s) = 1 / (2 L).
    anchor = nn.Parameter(torch.zeros(()))
    w = W.make("uwl", ["a", "b"], {}, [])
    opt = torch.optim.Adam(w.parameters(), lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        out = w.backward({"a": anchor * 0 + 0.2, "b": anchor * 0 + 2.0})
        opt.step()
    assert out["a"].item() == pytest.approx(1 / (2 * 0.2), rel=0.02)
    assert out["b"].item() == pytest.approx(1 / (2 * 2.0), rel=0.02)
    assert out["a"] > 2 * out["b"] and out["a"] > 2.0  # not capped at 2 like torch-rechub's clamped form


def test_uwl_regression_form_learns_the_noise_variances() -> None:
    # Two regression heads on the same inputs, noise std 0.1 vs 1.0: the learned sigma^2 approaches each
    # task's residual variance, and the weight 1 / (2 sigma^2) is ~100x larger for the clean task.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4, generator=g)
    ya = x[:, 0] + 0.1 * torch.randn(512, generator=g)
    yb = x[:, 1] + 1.0 * torch.randn(512, generator=g)
    model = Toy()
    w = W.make("uwl", ["a", "b"], {}, list(model.shared.parameters()), kinds={"a": "regression", "b": "regression"})
    opt = torch.optim.Adam([*model.parameters(), *w.parameters()], lr=0.02)
    for _ in range(800):
        opt.zero_grad()
        losses = model.losses(x, ya, yb)
        out = w.backward(losses)
        opt.step()
    sigma2 = torch.exp(w.log_var.detach())
    assert sigma2[0].item() == pytest.approx(losses["a"].item(), rel=0.15)
    assert sigma2[1].item() == pytest.approx(losses["b"].item(), rel=0.15)
    assert out["a"].item() / out["b"].item() > 30
    assert out["a"].item() == pytest.approx(0.5 / sigma2[0].item(), rel=1e-2)  # out is from before the last step


def test_uwl_applies_exp_minus_s_to_the_model_gradient() -> None:
    model = Toy()
    w = W.make("uwl", ["a", "b"], {"b": 2.0}, [])
    with torch.no_grad():
        w.log_var.copy_(torch.tensor([0.5, -1.0]))
    losses = model.losses(*data())
    (math.exp(-0.5) * losses["a"] + 2.0 * math.exp(1.0) * losses["b"]).backward(retain_graph=True)
    expected = grads(model)
    zero(model)
    out = w.backward(losses)
    assert all(torch.allclose(model.get_parameter(k).grad, v, atol=1e-6) for k, v in expected.items())
    assert out["b"].item() == pytest.approx(2.0 * math.exp(1.0))
    # d/ds (exp(-s) l + s/2) = -exp(-s) l + 1/2
    la, lb = losses["a"].item(), 2.0 * losses["b"].item()
    assert w.log_var.grad.tolist() == pytest.approx([-math.exp(-0.5) * la + 0.5, -math.exp(1.0) * lb + 0.5], rel=1e-5)


# --- GradNorm ----------------------------------------------------------------------------------------


def _grad_norms(model: Toy, losses: dict[str, torch.Tensor]) -> list[float]:
    """||d L_t / dW|| on the shared layer's weight, before any weighting."""
    return [torch.autograd.grad(losses[t], model.shared.weight, retain_graph=True)[0].norm().item() for t in ("a", "b")]


def test_gradnorm_balances_gradient_norms_on_the_last_shared_layer() -> None:
    # Task b's loss is scaled 10x, so its gradient on the shared layer is 10x task a's. With the model
    # frozen, both training rates stay 1 and GradNorm drives v_a ||g_a|| and v_b ||g_b|| together.
    model = Toy()
    x, ya, yb = data()
    w = W.make("gradnorm", ["a", "b"], {}, list(model.shared.parameters()))
    assert w.layer[0] is model.shared.weight
    opt = torch.optim.Adam(w.parameters(), lr=0.01)
    first = None
    for _ in range(300):
        opt.zero_grad()
        losses = model.losses(x, ya, yb, scale_b=10.0)
        raw = _grad_norms(model, losses)
        out = w.backward(losses)
        norms = [out["a"].item() * raw[0], out["b"].item() * raw[1]]  # G_t = v_t ||d L_t / dW||
        first = first or norms
        opt.step()
        zero(model)
    assert first[1] / first[0] > 5
    assert norms[1] / norms[0] == pytest.approx(1.0, abs=0.1)
    assert sum(v.item() for v in out.values()) == pytest.approx(2.0, abs=1e-5)  # renormalised to T
    assert out["a"] > 3 * out["b"]


def test_gradnorm_is_rate_adjusted() -> None:
    # After the first step task a's loss is halved (and so is its gradient): r_a / r_b = 0.5, and at
    # equilibrium G_a / G_b = (r_a / r_b) ** alpha = 0.5 ** 1.5: the task that trains faster gets less.
    model = Toy()
    x, ya, yb = data()
    w = W.make("gradnorm", ["a", "b"], {}, list(model.shared.parameters()))
    opt = torch.optim.Adam(w.parameters(), lr=0.01)
    for step in range(300):
        opt.zero_grad()
        losses = model.losses(x, ya, yb)
        if step > 0:
            losses["a"] = losses["a"] * 0.5
        raw = _grad_norms(model, losses)
        out = w.backward(losses)
        norms = [out["a"].item() * raw[0], out["b"].item() * raw[1]]
        opt.step()
        zero(model)
    assert norms[0] / norms[1] == pytest.approx(0.5 ** 1.5, rel=0.1)


def test_gradnorm_trains_only_its_weights_and_picks_a_weight_matrix_not_the_embedding() -> None:
    emb = nn.Embedding(10, 4)
    experts = nn.Parameter(torch.randn(3, 4, 5))  # stacked expert weights (n, d_in, d_out)
    bias = nn.Parameter(torch.zeros(3, 5))  # stacked expert biases (n, d_out): 2-D, never W
    bottom = nn.Linear(5, 6)
    assert W.last_shared_layer([emb.weight, experts, bias]) is experts
    assert W.last_shared_layer([emb.weight, bottom.weight, bottom.bias]) is bottom.weight
    assert W.last_shared_layer([emb.weight]) is emb.weight
    assert W.last_shared_layer([bottom.bias]) is None
    model = Toy()
    losses = model.losses(*data(), scale_b=10.0)
    (losses["a"] + losses["b"]).backward(retain_graph=True)
    expected = grads(model)
    zero(model)
    w = W.make("gradnorm", ["a", "b"], {}, list(model.shared.parameters()))
    w.backward(losses)
    # first step: v = 1, so the model sees the plain sum; v got the GradNorm-loss gradient only
    assert all(torch.allclose(model.get_parameter(k).grad, v, atol=1e-6) for k, v in expected.items())
    assert w.task_weights.grad is not None and w.task_weights.grad[0] < 0 < w.task_weights.grad[1]


# --- MetaBalance -------------------------------------------------------------------------------------


def test_metabalance_moves_aux_gradient_magnitude_toward_the_target() -> None:
    model = Toy()
    shared = list(model.shared.parameters())
    w = W.make("metabalance", ["a", "b"], {}, shared)
    assert w.target == "a"
    m = torch.zeros(2, len(shared))
    for step, scale_b in enumerate((10.0, 10.0, 3.0)):
        losses = model.losses(*data(seed=step), scale_b=scale_b)
        ga = task_grad(losses["a"], shared)
        gb = task_grad(losses["b"], shared)
        plain_head_b = task_grad(losses["b"], list(model.head_b.parameters()))
        zero(model)
        out = w.backward(losses)
        for j, p in enumerate(shared):
            m[0, j] = 0.9 * m[0, j] + 0.1 * ga[j].norm()
            m[1, j] = 0.9 * m[1, j] + 0.1 * gb[j].norm()
            scaled_b = p.grad - ga[j]  # what remains after the target's own gradient
            expected = 0.7 * m[0, j] / m[1, j] * gb[j] + 0.3 * gb[j]
            assert torch.allclose(scaled_b, expected, atol=1e-6)
            if step == 0:  # moving averages = norms: ||aux|| = r ||target|| + (1 - r) ||aux||
                assert scaled_b.norm().item() == pytest.approx(0.7 * ga[j].norm().item() + 0.3 * gb[j].norm().item(), rel=1e-5)
                assert scaled_b.norm() < 0.5 * gb[j].norm()
        assert all(torch.equal(p.grad, g) for p, g in zip(model.head_b.parameters(), plain_head_b))
        assert out["a"].item() == 1.0 and out["b"].item() < 1.0
        zero(model)
    assert torch.allclose(w.magnitudes, m, atol=1e-6)


def test_metabalance_target_can_be_chosen() -> None:
    model = Toy()
    shared = list(model.shared.parameters())
    w = W.make("metabalance", ["a", "b"], {}, shared, target="b")
    losses = model.losses(*data(), scale_b=10.0)
    gb = task_grad(losses["b"], shared)
    zero(model)
    out = w.backward(losses)
    assert out["b"].item() == 1.0 and out["a"].item() > 1.0  # the small aux gradient is scaled up
    with pytest.raises(ValueError, match="target task 'c'"):
        W.make("metabalance", ["a", "b"], {}, shared, target="c")
    assert all(not torch.equal(p.grad, g) for p, g in zip(shared, gb))


# --- PCGrad ------------------------------------------------------------------------------------------


class Linear2(nn.Module):
    """Shared vector theta and one private scalar per task; losses linear in theta, so the gradients are fixed."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(3))
        self.own_a = nn.Parameter(torch.ones(()))
        self.own_b = nn.Parameter(torch.ones(()))

    def losses(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"a": self.own_a * (a @ self.theta) + self.own_a ** 2, "b": self.own_b * (b @ self.theta) + self.own_b ** 2}


def test_pcgrad_projects_conflicting_gradients() -> None:
    a = torch.tensor([1.0, 0.0, 0.5])
    b = torch.tensor([-1.0, 1.0, 0.0])
    assert a @ b < 0
    model = Linear2()
    W.make("pcgrad", ["a", "b"], {}, [model.theta]).backward(model.losses(a, b))
    g = model.theta.grad
    assert g @ a >= -1e-6 and g @ b >= -1e-6
    expected = (a - (a @ b) / (b @ b) * b) + (b - (a @ b) / (a @ a) * a)
    assert torch.allclose(g, expected, atol=1e-6)
    assert not torch.allclose(g, a + b)
    # private parameters get their plain gradients: d/d own (own * <a, theta> + own^2) = <a, 0> + 2
    assert model.own_a.grad.item() == 2.0 and model.own_b.grad.item() == 2.0


def test_pcgrad_leaves_agreeing_gradients_alone() -> None:
    a = torch.tensor([1.0, 0.0, 0.5])
    b = torch.tensor([0.5, 1.0, 0.0])
    assert a @ b > 0
    model = Linear2()
    out = W.make("pcgrad", ["a", "b"], {}, [model.theta]).backward(model.losses(a, b))
    assert torch.equal(model.theta.grad, a + b)
    assert out["a"].item() == 1.0 and out["b"].item() == 1.0


def test_pcgrad_three_tasks_match_a_direct_implementation() -> None:
    torch.manual_seed(3)
    vecs = {t: torch.randn(6) for t in "abc"}
    vecs["c"] = -vecs["a"] + 0.1 * torch.randn(6)  # make sure something conflicts
    theta = nn.Parameter(torch.zeros(6))
    gen = torch.Generator().manual_seed(7)
    W.PCGrad(list("abc"), {}, [theta], generator=gen).backward({t: v @ theta for t, v in vecs.items()})
    gen.manual_seed(7)
    gs = [vecs[t] for t in "abc"]
    total = torch.zeros(6)
    for i in range(3):
        gi = gs[i].clone()
        for j in [j for j in torch.randperm(3, generator=gen).tolist() if j != i]:
            if gi @ gs[j] < 0:
                gi = gi - (gi @ gs[j]) / (gs[j] @ gs[j]) * gs[j]
        total += gi
    assert torch.allclose(theta.grad, total, atol=1e-6)


@pytest.mark.parametrize("name", ["metabalance", "pcgrad"])
def test_gradient_surgery_keeps_sparse_embedding_gradients_sparse(name: str) -> None:
    results = []
    for sparse in (False, True):
        torch.manual_seed(0)
        emb = nn.Embedding(20, 4, sparse=sparse)
        heads = nn.Linear(4, 2)
        x = emb(torch.tensor([1, 2, 3, 1, 9]))
        out = heads(x)
        losses = {"a": out[:, 0].pow(2).mean(), "b": -3 * out[:, 1].mean()}
        torch.manual_seed(1)
        W.make(name, ["a", "b"], {}, [emb.weight]).backward(losses)
        assert emb.weight.grad.is_sparse == sparse
        results.append(emb.weight.grad.to_dense())
    assert torch.allclose(results[0], results[1], atol=1e-6)


# --- DDP ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process(name: str) -> dict[str, torch.Tensor]:
    model = Toy()
    x, ya, yb = data(n=64)
    torch.manual_seed(5)
    w = W.make(name, ["a", "b"], {"b": 2.0}, list(model.shared.parameters()))
    w.backward(model.losses(x, ya, yb, scale_b=5.0))
    out = grads(model)
    out.update({f"w.{k}": p.grad.clone() for k, p in w.named_parameters()})
    return out


def _ddp_worker(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = {}
        for name in W.NAMES:
            model = Toy()
            ddp = nn.parallel.DistributedDataParallel(model)
            x, ya, yb = data(n=64)
            part = slice(rank * 32, (rank + 1) * 32)
            torch.manual_seed(5)
            w = W.make(name, ["a", "b"], {"b": 2.0}, list(model.shared.parameters()))
            losses = _ddp_losses(ddp, x[part], ya[part], yb[part])
            w.backward(losses)
            res = grads(model)
            res.update({f"w.{k}": p.grad.clone() for k, p in w.named_parameters()})
            results[name] = {k: v.numpy() for k, v in res.items()}  # by value: shared-memory tensors die with the worker
        queue.put((rank, results))
        dist.barrier()  # Note [Leaving a gloo group] in mtldsl/runtime/distributed.py
    finally:
        dist.destroy_process_group()


def _ddp_losses(ddp: nn.Module, x, ya, yb) -> dict[str, torch.Tensor]:
    heads = ddp(x)
    la = (heads[0] - ya).pow(2).mean()
    lb = (heads[1] - yb).pow(2).mean() * 5.0
    return {"a": la, "b": lb}


def _toy_forward(self: Toy, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = torch.relu(self.shared(x))
    return self.head_a(h).squeeze(-1), self.head_b(h).squeeze(-1)


Toy.forward = _toy_forward  # DDP needs forward(); the same maths as Toy.losses


def test_two_process_ddp_gives_the_single_process_gradients() -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = mp.start_processes(_ddp_worker, args=(port, queue), nprocs=2, join=False, start_method="spawn")
    got = {rank: {name: {k: torch.from_numpy(v) for k, v in res.items()} for name, res in results.items()}
           for rank, results in (queue.get() for _ in range(2))}
    procs.join()
    for name in W.NAMES:
        r0, r1 = got[0][name], got[1][name]
        assert r0.keys() == r1.keys()
        for k in r0:
            assert torch.allclose(r0[k], r1[k], atol=1e-6), f"{name}: ranks disagree on {k}"
        if name == "gradnorm":
            continue  # its weights' gradient uses each rank's own loss ratios; ranks agree (above), not equal to 1 process
        single = _single_process(name)
        for k in single:
            assert torch.allclose(r0[k], single[k], atol=1e-5), f"{name}: {k} differs from one process"
