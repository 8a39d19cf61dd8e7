"""runtime/layers.py: semantics against plain torch references, parameter counts, the standalone region."""

from __future__ import annotations

import __future__
import ast
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from mtldsl import vocab
from mtldsl.runtime import layers
from mtldsl.runtime.layers import (
    ACTIVATIONS,
    MLP,
    BatchedExperts,
    FusedEmbedding,
    Gate,
    InfoTransfer,
    Tower,
    mix,
)

LAYERS = Path(layers.__file__)
BEGIN = "# mtldsl:standalone begin (from mtldsl/runtime/layers.py)"
END = "# mtldsl:standalone end"
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Fixed seed; one thread, since the tensors here are tiny (thread wake-ups would dominate)."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(actual: Tensor, expected: Tensor, atol: float = ATOL, rtol: float = ATOL) -> None:
    """Same shape and dtype, |actual - expected| <= atol + rtol * |expected| elementwise.

    (torch.testing.assert_close would do, but its first call imports torch.distributed: seconds.)
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual.shape, expected.shape)
    diff = (actual.detach() - expected.detach()).abs()
    bad = diff > atol + rtol * expected.detach().abs()
    assert not bad.any(), f"max abs diff {diff.max().item():.3g} at {bad.nonzero()[0].tolist()}"


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def rechub_mlp_params(d_in: int, dims: list[int], output_layer: bool, prelu: bool = False) -> int:
    """torch-rechub MLP: per width Linear + BatchNorm1d (+ PReLU's one slope), then Linear(.., 1)."""
    total, d = 0, d_in
    for w in dims:
        total += d * w + w + 2 * w + (1 if prelu else 0)
        d = w
    return total + (d + 1 if output_layer else 0)


def test_activations_are_the_languages() -> None:
    """layers.py cannot import mtldsl.vocab (its standalone section is copied into torch-only files): same list."""
    assert ACTIVATIONS == vocab.names(vocab.Activation)


# ---- BatchedExperts ----------------------------------------------------------------------------


def reference_act(name: str) -> nn.Module:
    return {
        "relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(), "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(),
        "gelu": nn.GELU(), "prelu": nn.PReLU(), "none": nn.Identity(),
    }[name]


def separate_experts(n: int, d_in: int, dims: list[int], activation: str, batch_norm: bool) -> list[nn.Sequential]:
    experts = []
    for _ in range(n):
        mods: list[nn.Module] = []
        d = d_in
        for w in dims:
            mods.append(nn.Linear(d, w))
            if batch_norm:
                mods.append(nn.BatchNorm1d(w))
            mods.append(reference_act(activation))
            d = w
        experts.append(nn.Sequential(*mods))
    return experts


@torch.no_grad()
def copy_into(batched: BatchedExperts, experts: list[nn.Sequential]) -> None:
    """Load n separate experts' weights (randomised BN and PReLU state) into the stacked layout."""
    for e, seq in enumerate(experts):
        linears = [m for m in seq if isinstance(m, nn.Linear)]
        norms = [m for m in seq if isinstance(m, nn.BatchNorm1d)]
        prelus = [m for m in seq if isinstance(m, nn.PReLU)]
        for i, lin in enumerate(linears):
            batched.weights[i][e].copy_(lin.weight.t())
            batched.biases[i][e].copy_(lin.bias)
        for i, bn in enumerate(norms):
            w = bn.num_features
            for p in (bn.weight, bn.bias, bn.running_mean):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p is bn.weight else 0.0))
            bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)
            target = batched.norms[i]
            target.weight[e * w:(e + 1) * w].copy_(bn.weight)
            target.bias[e * w:(e + 1) * w].copy_(bn.bias)
            target.running_mean[e * w:(e + 1) * w].copy_(bn.running_mean)
            target.running_var[e * w:(e + 1) * w].copy_(bn.running_var)
        for i, pr in enumerate(prelus):
            pr.weight.fill_(0.1 * (e + 1) + 0.05 * i)
            batched.slopes[i][e].copy_(pr.weight[0])


@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "bn"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_input", "per_expert_input"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batched_experts_match_separate_experts(batch_norm: bool, shared: bool, train: bool) -> None:
    n, d_in, dims, B = 3, 10, [8, 6, 5], 16
    experts = separate_experts(n, d_in, dims, "relu", batch_norm)
    batched = BatchedExperts(n, d_in, dims, batch_norm=batch_norm)
    copy_into(batched, experts)
    for m in [batched, *experts]:
        m.train(train)
    x = torch.randn(B, d_in) if shared else torch.randn(B, n, d_in)
    x_ref = x.clone().requires_grad_()
    x_bat = x.clone().requires_grad_()

    ref = torch.stack([seq(x_ref if shared else x_ref[:, e]) for e, seq in enumerate(experts)], dim=1)
    out = batched(x_bat)
    assert out.shape == (B, n, dims[-1])
    assert_close(out, ref, )

    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    assert_close(x_bat.grad, x_ref.grad, )
    for e, seq in enumerate(experts):
        linears = [m for m in seq if isinstance(m, nn.Linear)]
        for i, lin in enumerate(linears):
            assert_close(batched.weights[i].grad[e], lin.weight.grad.t(), )
            assert_close(batched.biases[i].grad[e], lin.bias.grad, )
        if batch_norm:  # per-expert running statistics (updated in train mode, untouched in eval)
            for i, bn in enumerate(m for m in seq if isinstance(m, nn.BatchNorm1d)):
                w = bn.num_features
                assert_close(batched.norms[i].running_mean[e * w:(e + 1) * w], bn.running_mean)
                assert_close(batched.norms[i].running_var[e * w:(e + 1) * w], bn.running_var)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval_folded_batch_norm"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_batched_experts_every_activation(activation: str, train: bool) -> None:
    n, d_in, dims, B = 3, 7, [6, 4], 12
    experts = separate_experts(n, d_in, dims, activation, batch_norm=True)
    batched = BatchedExperts(n, d_in, dims, activation=activation, batch_norm=True)
    copy_into(batched, experts)
    for m in [batched, *experts]:
        m.train(train)
    x = torch.randn(B, d_in)
    ref = torch.stack([seq(x) for seq in experts], dim=1)
    assert_close(batched(x), ref, )


def test_batched_experts_init_and_params() -> None:
    n, d_in, dims = 4, 30, [20, 10]
    plain = BatchedExperts(n, d_in, dims)
    assert plain.n == n and plain.out_features == 10
    assert n_params(plain) == n * sum(p.numel() for p in MLP(d_in, dims).parameters())
    assert [tuple(w.shape) for w in plain.weights] == [(n, d_in, 20), (n, 20, 10)]
    assert [tuple(b.shape) for b in plain.biases] == [(n, 20), (n, 10)]
    for w, b, fan_in in zip(plain.weights, plain.biases, (d_in, 20)):
        bound = 1 / math.sqrt(fan_in)
        assert w.abs().max() <= bound and b.abs().max() <= bound
        assert w.abs().max() > 0.9 * bound  # uniform over the whole range, not a narrower init
        assert w[0].std() > 0 and not torch.equal(w[0], w[1])  # experts differ
    bn = BatchedExperts(n, d_in, dims, batch_norm=True)
    assert n_params(bn) == n * rechub_mlp_params(d_in, dims, output_layer=False)
    prelu = BatchedExperts(n, d_in, dims, activation="prelu", batch_norm=True)
    assert n_params(prelu) == n * rechub_mlp_params(d_in, dims, output_layer=False, prelu=True)
    with pytest.raises(ValueError, match="at least one width"):
        BatchedExperts(n, d_in, [])


def test_batched_experts_dropout() -> None:
    ex = BatchedExperts(2, 8, [64], activation="none", dropout=0.5)
    x = torch.randn(32, 8)
    ex.eval()
    assert_close(ex(x), ex(x))
    ex.train()
    zeros = (ex(x) == 0).float().mean().item()
    assert 0.35 < zeros < 0.65


def test_batched_experts_trace() -> None:
    ex = BatchedExperts(3, 6, [5, 4], batch_norm=True).eval()
    for x in (torch.randn(8, 6), torch.randn(8, 3, 6)):
        traced = torch.jit.trace(ex, (x,))
        x2 = torch.randn(11, *x.shape[1:])  # a different batch size
        assert_close(traced(x2), ex(x2))


# ---- FusedEmbedding ----------------------------------------------------------------------------


def per_field_reference(emb: FusedEmbedding, vocab: list[int], copy: int = 0) -> list[nn.Embedding]:
    """One nn.Embedding per field holding that field's rows of the fused weight."""
    total, start, tables = sum(vocab), copy * sum(vocab), []
    for v in vocab:
        tables.append(nn.Embedding.from_pretrained(emb.embedding.weight.detach()[start:start + v].clone()))
        start += v
    assert start == (copy + 1) * total
    return tables


def random_ids(B: int, vocab: list[int]) -> Tensor:
    return torch.stack([torch.randint(0, v, (B,)) for v in vocab], dim=1)


def test_fused_embedding_matches_per_field_tables() -> None:
    vocab, dim, B = [5, 3, 7, 2], 4, 20
    emb = FusedEmbedding(vocab, dim, sparse_columns=None, dense_columns=None)
    assert n_params(emb) == sum(vocab) * dim and emb.out_features == len(vocab) * dim
    sparse = random_ids(B, vocab)
    sparse[0] = torch.tensor([v - 1 for v in vocab])  # the last row of every field
    sparse[1] = 0
    ref = torch.cat([t(sparse[:, f]) for f, t in enumerate(per_field_reference(emb, vocab))], dim=1)
    out = emb(sparse, None)
    assert out.shape == (B, len(vocab) * dim)
    assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.parametrize("columns", [(4, 1, 3), (1, 2, 3)], ids=["gather", "slice"])
def test_fused_embedding_column_selection(columns: tuple[int, ...]) -> None:
    all_vocab, dim, B = [9, 4, 6, 5, 8], 3, 15
    vocab = [all_vocab[c] for c in columns]
    emb = FusedEmbedding(vocab, dim, sparse_columns=columns, dense_columns=None)
    sparse = random_ids(B, all_vocab)
    tables = per_field_reference(emb, vocab)
    ref = torch.cat([t(sparse[:, c]) for t, c in zip(tables, columns)], dim=1)
    assert_close(emb(sparse, None), ref, atol=0, rtol=0)
    assert n_params(emb) == sum(vocab) * dim


@pytest.mark.parametrize("dense_columns", [(2, 0), (1, 2)], ids=["gather", "slice"])
def test_fused_embedding_dense_append(dense_columns: tuple[int, ...]) -> None:
    vocab, dim, B = [4, 6], 2, 9
    emb = FusedEmbedding(vocab, dim, sparse_columns=None, dense_columns=dense_columns)
    sparse, dense = random_ids(B, vocab), torch.randn(B, 3)
    out = emb(sparse, dense)
    assert emb.out_features == len(vocab) * dim + len(dense_columns) == out.shape[1]
    ref = torch.cat([t(sparse[:, f]) for f, t in enumerate(per_field_reference(emb, vocab))], dim=1)
    assert_close(out[:, :len(vocab) * dim], ref, atol=0, rtol=0)
    assert_close(out[:, len(vocab) * dim:], dense[:, list(dense_columns)], atol=0, rtol=0)
    with pytest.raises(ValueError, match="appends 2 dense features"):
        emb(sparse, None)
    no_dense = FusedEmbedding(vocab, dim, sparse_columns=None, dense_columns=())
    assert no_dense.out_features == len(vocab) * dim
    assert no_dense(sparse, dense).shape == (B, len(vocab) * dim)


def test_fused_embedding_copies() -> None:
    all_vocab, columns, dim, copies, B = [3, 8, 5], (2, 0), 4, 3, 10
    vocab = [all_vocab[c] for c in columns]
    emb = FusedEmbedding(vocab, dim, sparse_columns=columns, dense_columns=(1,), copies=copies)
    assert n_params(emb) == copies * sum(vocab) * dim
    assert emb.out_features == len(vocab) * dim + 1
    sparse, dense = random_ids(B, all_vocab), torch.randn(B, 2)
    out = emb(sparse, dense)
    assert out.shape == (B, copies, emb.out_features)
    for c in range(copies):
        tables = per_field_reference(emb, vocab, copy=c)
        ref = torch.cat([t(sparse[:, col]) for t, col in zip(tables, columns)] + [dense[:, 1:2]], dim=1)
        assert_close(out[:, c], ref, atol=0, rtol=0)
    assert not torch.equal(out[:, 0], out[:, 1])  # each copy has its own rows


@pytest.mark.parametrize("sparse_grad", [True, False])
def test_fused_embedding_gradient_layout(sparse_grad: bool) -> None:
    vocab = [6, 4]
    emb = FusedEmbedding(vocab, 3, sparse_columns=None, dense_columns=None, sparse_grad=sparse_grad)
    sparse = torch.tensor([[0, 1], [5, 1]])
    emb(sparse, None).sum().backward()
    grad = emb.embedding.weight.grad
    assert grad.is_sparse == sparse_grad
    dense_grad = grad.to_dense() if sparse_grad else grad
    touched = (dense_grad != 0).any(dim=1).nonzero().flatten().tolist()
    assert touched == [0, 5, 6 + 1]  # field 1's id 1 is row 7, counted twice
    assert_close(dense_grad[7], torch.full((3,), 2.0))


def test_fused_embedding_rejects_mismatched_columns() -> None:
    with pytest.raises(ValueError, match="2 sparse columns for 3 vocab sizes"):
        FusedEmbedding([2, 3, 4], 4, sparse_columns=(0, 1), dense_columns=None)


# ---- MLP, Gate, mix, Tower, InfoTransfer -------------------------------------------------------


def test_mlp_structure_and_params() -> None:
    mlp = MLP(10, [8, 4], activation="prelu", dropout=0.2, batch_norm=True)
    kinds = [type(m).__name__ for m in mlp.layers]
    assert kinds == ["Linear", "BatchNorm1d", "PReLU", "Dropout"] * 2
    assert n_params(mlp) == rechub_mlp_params(10, [8, 4], output_layer=False, prelu=True)
    head = MLP(10, [8, 4], batch_norm=True, out_dim=1)
    assert n_params(head) == rechub_mlp_params(10, [8, 4], output_layer=True)
    assert head.out_features == 1 and mlp.out_features == 4
    assert head(torch.randn(5, 10)).shape == (5, 1)
    assert [type(m).__name__ for m in MLP(10, [8]).layers] == ["Linear", "ReLU"]  # no dropout at p=0


def test_mlp_empty_is_identity() -> None:
    mlp = MLP(6, [])
    x = torch.randn(3, 6)
    assert mlp(x) is x and mlp.out_features == 6 and n_params(mlp) == 0
    assert MLP(6, [], out_dim=2)(x).shape == (3, 2)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_activations(activation: str) -> None:
    mlp = MLP(5, [4], activation=activation)
    x = torch.randn(7, 5)
    ref = reference_act(activation)
    if activation == "prelu":
        ref.weight.data.copy_(mlp.layers[1].weight.data)
    assert_close(mlp(x), ref(mlp.layers[0](x)))


@pytest.mark.parametrize("factory", [
    lambda a: MLP(4, [3], activation=a),
    lambda a: BatchedExperts(2, 4, [3], activation=a),
    lambda a: Gate(4, 2, dims=(3,), activation=a),
    lambda a: Tower(4, [3], activation=a),
], ids=["MLP", "BatchedExperts", "Gate", "Tower"])
def test_unknown_activation(factory) -> None:
    with pytest.raises(ValueError, match="unknown activation 'swish'.*relu, leaky_relu, sigmoid, tanh, gelu, prelu"):
        factory("swish")


def test_gate() -> None:
    gate = Gate(12, 5, batch_norm=True)
    assert n_params(gate) == 12 * 5 + 5 + 2 * 5  # torch-rechub MLP(12, dims=[5], softmax, no output layer)
    deep = Gate(12, 5, dims=(8,), batch_norm=True)
    assert n_params(deep) == rechub_mlp_params(12, [8, 5], output_layer=False)
    for g in (gate, deep, Gate(12, 5)):
        w = g(torch.randn(9, 12))
        assert w.shape == (9, 5) and (w >= 0).all()
        assert_close(w.sum(dim=1), torch.ones(9))


def test_mix_is_weighted_sum() -> None:
    B, n, d = 6, 4, 5
    weights = torch.softmax(torch.randn(B, n), dim=1).requires_grad_()
    experts = torch.randn(B, n, d, requires_grad=True)
    ref = sum(weights[:, e:e + 1] * experts[:, e] for e in range(n))
    out = mix(weights, experts)
    assert out.shape == (B, d)
    assert_close(out, ref)
    out.sum().backward()
    assert_close(weights.grad, experts.detach().sum(dim=2))


def test_tower() -> None:
    tower = Tower(10, [8, 4], batch_norm=True)
    assert n_params(tower) == rechub_mlp_params(10, [8, 4], output_layer=True)
    tower.eval()
    x = torch.randn(7, 10)
    h = tower.hidden(x)
    assert h.shape == (7, 4) and tower.out_features == 4
    y = tower(x)
    assert y.shape == (7,)
    assert_close(y, tower.head(h))
    assert_close(y, tower.out(h)[:, 0])
    flat = Tower(10, [])
    assert flat(x).shape == (7,) and flat.hidden(x) is x


def test_info_transfer() -> None:
    dim, B = 6, 8
    it = InfoTransfer(dim)
    # torch-rechub: info gate MLP(dim, dims=[dim], no output layer) + AttentionLayer (3 x dim*dim, no bias)
    assert n_params(it) == rechub_mlp_params(dim, [dim], output_layer=False) + 3 * dim * dim
    current = torch.randn(B, dim, requires_grad=True)
    previous = torch.randn(B, dim, requires_grad=True)
    out = it(current, previous)
    assert out.shape == (B, dim)

    x = torch.stack([current, it.info(previous)], dim=1)  # the attention written out
    q, k, v = x @ it.q.weight.t(), x @ it.k.weight.t(), x @ it.v.weight.t()
    a = torch.softmax((q * k).sum(-1) / math.sqrt(dim), dim=1)
    assert_close(out, (a.unsqueeze(-1) * v).sum(1))

    out.pow(2).sum().backward()
    assert current.grad.abs().sum() > 0 and previous.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in it.parameters())


# ---- the standalone region ---------------------------------------------------------------------


def region() -> str:
    text = LAYERS.read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    start, end = text.index(BEGIN), text.index(END)
    assert start < end
    return text[start:end + len(END)]


def test_module_imports_only_torch() -> None:
    tree = ast.parse(LAYERS.read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "math", "torch", "typing", "collections"}


def test_standalone_region_is_self_contained() -> None:
    text = region()
    tree = ast.parse(text)
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    namespace = {"math": math, "torch": torch, "Tensor": Tensor, "nn": nn,
                 "annotations": __future__.annotations, "__name__": "generated"}
    exec(compile(text, "generated.py", "exec", flags=__future__.annotations.compiler_flag, dont_inherit=True),
         namespace)
    for name in ("FusedEmbedding", "MLP", "BatchedExperts", "Gate", "mix", "Tower", "InfoTransfer"):
        assert name in namespace, name

    # A miniature MMoE built only from the exec'd classes runs forward, backward and trace.
    class Mini(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = namespace["FusedEmbedding"]([5, 7], 4, None, (0,))
            self.experts = namespace["BatchedExperts"](3, 9, (8, 6), batch_norm=True)
            self.g = namespace["Gate"](9, 3, batch_norm=True)
            self.tower = namespace["Tower"](6, (4,))
            self.transfer = namespace["InfoTransfer"](6)

        def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
            x = self.emb(sparse, dense)
            h = namespace["mix"](self.g(x), self.experts(x))
            return torch.sigmoid(self.tower(self.transfer(h, h.detach())))

    model = Mini()
    sparse, dense = random_ids(10, [5, 7]), torch.randn(10, 2)
    y = model(sparse, dense)
    assert y.shape == (10,)
    y.sum().backward()
    model.eval()
    traced = torch.jit.trace(model, (sparse, dense))
    assert_close(traced(sparse[:4], dense[:4]), model(sparse[:4], dense[:4]))


def test_onnx_export_matches_torch() -> None:
    ort = pytest.importorskip("onnxruntime")
    import io
    import warnings

    class Mini(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = FusedEmbedding([3, 5], 4, (2, 0), (1,), copies=3)
            self.experts = BatchedExperts(3, 9, (8, 6), activation="prelu", batch_norm=True)
            self.g = Gate(9, 3, batch_norm=True)
            self.tower = Tower(6, (4,))
            self.transfer = InfoTransfer(6)

        def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
            x = self.emb(sparse, dense)  # (B, 3, 9)
            h = mix(self.g(x.sum(dim=1)), self.experts(x))
            return torch.sigmoid(self.tower(self.transfer(h, h)))

    model = Mini().eval()
    sparse, dense = random_ids(10, [5, 7, 3]), torch.randn(10, 2)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (sparse, dense), buf, input_names=["sparse", "dense"], output_names=["y"],
                          dynamic_axes={"sparse": {0: "B"}, "dense": {0: "B"}, "y": {0: "B"}}, dynamo=False)
    session = ort.InferenceSession(buf.getvalue())
    (y,) = session.run(None, {"sparse": sparse[:4].numpy(), "dense": dense[:4].numpy()})
    assert_close(torch.from_numpy(y), model(sparse[:4], dense[:4]), )


def test_fused_embedding_backward_equals_nn_embedding() -> None:
    """Note [Embedding backward]: the index_add_ backward gives nn.Embedding's gradient, every time the same."""
    torch.manual_seed(0)
    emb = FusedEmbedding(vocab_sizes=(7, 3, 11), dim=4, sparse_columns=None, dense_columns=None, copies=2)
    ids = torch.stack([torch.randint(0, v, (64,)) for v in (7, 3, 11)], dim=1)  # repeated rows on purpose
    g = torch.randn(64, 2, 12)
    grads = []
    for training in (True, True, False):
        emb.train(training)
        emb.zero_grad(set_to_none=True)
        out = emb(ids, None)
        (out * g).sum().backward()
        grads.append(emb.embedding.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])  # deterministic
    assert torch.allclose(grads[0], grads[2], atol=1e-6)  # eval mode runs nn.Embedding's own backward
    lookup = lambda: emb(ids, None).grad_fn.next_functions[0][0].name()  # noqa: E731  (under the flatten)
    emb.train()
    assert lookup() == "_LookupBackward"
    emb.eval()
    assert lookup() == "EmbeddingBackward0"  # aten's kernel outside training (and for export)


# ---- list fields: FusedEmbedding pools bags (Note [List fields]) -------------------------------


def random_bags(B: int, vocab: int, weighted: bool, g: torch.Generator, max_len: int = 4) -> list[Tensor]:
    """One list field's batch tensors: ids, offsets[, weights]; samples 1 and B-1 have empty lists."""
    lengths = torch.randint(0, max_len + 1, (B,), generator=g)
    lengths[1] = lengths[-1] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    ids = torch.randint(0, vocab, (int(lengths.sum()),), generator=g)
    return [ids, offsets] + ([torch.rand(ids.shape[0], generator=g) + 0.25] if weighted else [])


def naive_pool(table: Tensor, bag: list[Tensor], pool: str) -> Tensor:
    """A per-sample loop: the reference for one field's pooled (B, dim)."""
    ids, offsets = bag[0], bag[1]
    weights = bag[2] if len(bag) > 2 else torch.ones(ids.shape[0])
    ends = [*offsets[1:].tolist(), ids.shape[0]]
    rows = []
    for start, end in zip(offsets.tolist(), ends):
        vecs, w = table[ids[start:end]], weights[start:end]
        if end == start:
            rows.append(torch.zeros(table.shape[1]))
        elif pool == "sum":
            rows.append((vecs * w.unsqueeze(1)).sum(0))
        elif pool == "mean":
            rows.append((vecs * w.unsqueeze(1)).sum(0) / w.sum())
        else:
            rows.append(vecs.max(0).values)
    return torch.stack(rows)


LIST_VOCAB = [7, 5]


def list_table(pool: str, weighted: tuple[bool, ...], copies: int = 1, sparse_grad: bool = False) -> FusedEmbedding:
    emb = FusedEmbedding([4, 6], 3, sparse_columns=(1, 0), dense_columns=(0,), copies=copies, sparse_grad=sparse_grad,
                         list_vocab_sizes=LIST_VOCAB, pool=pool, weighted=weighted)
    with torch.no_grad():
        emb.embedding.weight.normal_()
    return emb


def list_batch(B: int, weighted: tuple[bool, ...], seed: int = 0) -> tuple[Tensor, Tensor, list[Tensor], list[list[Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, 6, (B,), generator=g), torch.randint(0, 4, (B,), generator=g)], dim=1)
    dense = torch.rand(B, 2, generator=g)
    per_field = [random_bags(B, v, w, g) for v, w in zip(LIST_VOCAB, weighted)]
    return sparse, dense, [t for bag in per_field for t in bag], per_field


@pytest.mark.parametrize("copies", [1, 2])
@pytest.mark.parametrize("weighted", [(False, False), (True, False), (True, True)], ids=["plain", "mixed", "weighted"])
@pytest.mark.parametrize("pool", ["sum", "mean", "max"])
def test_fused_embedding_pools_like_a_loop(pool: str, weighted: tuple[bool, ...], copies: int) -> None:
    emb = list_table(pool, weighted, copies)
    assert emb.out_features == (2 + 2) * 3 + 1 and n_params(emb) == copies * (4 + 6 + 7 + 5) * 3
    B = 9
    sparse, dense, bags, per_field = list_batch(B, weighted)
    out = emb(sparse, dense, bags)
    assert out.shape == ((B, emb.out_features) if copies == 1 else (B, copies, emb.out_features))
    weight = emb.embedding.weight.detach()
    total = 4 + 6 + 7 + 5
    for c in range(copies):
        got = out if copies == 1 else out[:, c]
        singles = [weight[c * total + s:][:v][sparse[:, col]] for s, v, col in ((0, 4, 1), (4, 6, 0))]
        pooled = [naive_pool(weight[c * total + s:][:v], bag, pool) for s, v, bag in zip((10, 17), LIST_VOCAB, per_field)]
        expected = torch.cat([*singles, *pooled, dense[:, :1]], dim=1)  # singles, then lists, then dense
        assert_close(got, expected)
        assert torch.equal(got[1, 6:12], torch.zeros(6)) and torch.equal(got[-1, 6:12], torch.zeros(6))  # empty lists
    assert torch.isfinite(out).all()


def test_fused_embedding_only_lists_and_errors() -> None:
    emb = FusedEmbedding((), 2, sparse_columns=(), dense_columns=None, list_vocab_sizes=[5], pool="mean")
    g = torch.Generator().manual_seed(0)
    bag = random_bags(6, 5, False, g)
    out = emb(None, None, bag)
    assert out.shape == (6, 2)
    assert_close(out, naive_pool(emb.embedding.weight.detach(), bag, "mean"))
    with pytest.raises(ValueError, match="pass 2 tensors, got 0"):
        emb(None, None, ())
    with pytest.raises(ValueError, match="unknown pool mode 'avg'"):
        FusedEmbedding((), 2, (), None, list_vocab_sizes=[5], pool="avg")
    with pytest.raises(ValueError, match="1 weighted flags for 2 list fields"):
        FusedEmbedding((), 2, (), None, list_vocab_sizes=[5, 3], weighted=(True,))


def test_weighted_mean_of_zero_weights_is_zero() -> None:
    emb = FusedEmbedding((), 2, (), None, list_vocab_sizes=[5], pool="mean", weighted=(True,))
    ids, offsets, weights = torch.tensor([1, 2, 3]), torch.tensor([0, 0, 2]), torch.tensor([0.0, 0.0, 2.0])
    out = emb(None, None, (ids, offsets, weights))
    row3 = emb.embedding.weight.detach()[3]
    assert torch.equal(out[0], torch.zeros(2)) and torch.equal(out[1], torch.zeros(2))
    assert_close(out[2], row3)


@pytest.mark.parametrize("sparse_grad", [True, False])
@pytest.mark.parametrize("pool", ["sum", "mean", "max"])
def test_pooled_gradient_reaches_the_rows_present(pool: str, sparse_grad: bool) -> None:
    emb = list_table(pool, (True, False), sparse_grad=sparse_grad)
    sparse, dense, bags, per_field = list_batch(8, (True, False))
    emb(sparse, dense, bags)[:, 6:12].sum().backward()  # the pooled columns only
    grad = emb.embedding.weight.grad
    assert grad.is_sparse == sparse_grad
    grad = grad.to_dense() if sparse_grad else grad
    touched = set((grad != 0).any(dim=1).nonzero().flatten().tolist())
    present = {10 + i for i in per_field[0][0].tolist()} | {17 + i for i in per_field[1][0].tolist()}
    assert touched <= present and (touched == present or pool == "max")
    assert touched  # max: the rows that won somewhere
    reference = list_table(pool, (True, False))
    with torch.no_grad():
        reference.embedding.weight.copy_(emb.embedding.weight)
    reference(sparse, dense, bags)[:, 6:12].sum().backward()
    assert_close(grad, reference.embedding.weight.grad)  # sparse and dense gradients agree


@pytest.mark.parametrize("pool", ["sum", "mean", "max"])
def test_pooled_table_under_bf16_autocast(pool: str) -> None:
    emb = list_table(pool, (True, False)).train()
    sparse, dense, bags, _ = list_batch(8, (True, False))
    expected = emb(sparse, dense, bags)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = emb(sparse, dense, bags)
    assert out.dtype == torch.bfloat16  # Note [One cast per table]
    assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    out.float().sum().backward()
    assert emb.embedding.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("pool", ["sum", "mean", "max"])
def test_pooled_table_traces_with_any_list_length(pool: str) -> None:
    emb = list_table(pool, (True, False), copies=2).eval()

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = emb

        def forward(self, sparse: Tensor, dense: Tensor, a_ids: Tensor, a_off: Tensor, a_w: Tensor, b_ids: Tensor,
                    b_off: Tensor) -> Tensor:
            return self.emb(sparse, dense, (a_ids, a_off, a_w, b_ids, b_off))

    flat = Flat()
    sparse, dense, bags, _ = list_batch(9, (True, False))
    with torch.no_grad():
        traced = torch.jit.trace(flat, (sparse, dense, *bags), check_trace=False)
    for B, seed in ((4, 1), (30, 2)):
        sparse, dense, bags, _ = list_batch(B, (True, False), seed)
        with torch.no_grad():
            assert_close(traced(sparse, dense, *bags), flat(sparse, dense, *bags))
