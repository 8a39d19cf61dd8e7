"""Loss weighting behind one interface: fixed, UWL, GradNorm, MetaBalance, PCGrad.

`make(name, tasks, weights, shared)` gives a `Weighting`, an nn.Module whose `backward(losses)` runs the
backward pass(es) that fill `.grad` of every model parameter and returns each task's effective weight as a
0-dim tensor (never a Python float: no host sync). The trainer adds `weighting.parameters()` (UWL's
log-variances, GradNorm's task weights) to its optimizer and saves `weighting.state_dict()` with the
model (GradNorm's initial losses, MetaBalance's moving averages are buffers).

Inputs, for every strategy:
- `tasks`: the names of the supervised outputs, in spec order (the keys of `losses`);
- `weights`: the spec's fixed loss weights w_t (missing = 1). Every strategy acts on the weighted loss
  l_t = w_t * L_t, so a fixed weight is a prior that adaptive strategies start from;
- `shared`: the parameters that receive gradient from two or more losses, in the model's registration
  (forward) order. The trainer derives them from the block graph (graph.shared_nodes), never from a
  per-model list (PEERS 2.7). Gradient surgery (MetaBalance, PCGrad) touches only these; every other
  parameter gets the plain sum of its task gradients.

Gradient strategies compute per-task gradients on `shared` with torch.autograd.grad, then one ordinary
backward of sum(l_t) fills every .grad (so gradient accumulation and the trainer's DDP wrapper work as
usual), and finally add the correction (combined - plain sum) to the shared gradients. Both MetaBalance
and PCGrad combine the per-task gradients linearly (per parameter tensor for MetaBalance), so the
correction is sum_t (c_t - 1) * g_t: exact zero when nothing is rescaled or projected, and sparse
embedding gradients stay sparse. Under torch.distributed (world size > 1), per-task shared gradients
and this module's own parameter gradients are averaged over ranks before use, so every rank applies the
same update (the model's own gradients are averaged by DDP as usual).
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import vocab

__all__ = ["NAMES", "GradNorm", "MetaBalance", "PCGrad", "Fixed", "UWL", "Weighting", "last_shared_layer", "make"]

log = logging.getLogger(__name__)

NAMES = vocab.names(vocab.Weighting)  # the strategies below, by the name a spec or --weighting gives
_TINY = 1e-12  # guards divisions by gradient norms and losses that may be exactly zero


# --- helpers ----------------------------------------------------------------------------------------


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _average(tensors: list[Tensor]) -> None:
    """Average dense tensors over ranks in place (one all_reduce of a flat buffer)."""
    import torch.distributed as dist

    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset: offset + n].view_as(t))
        offset += n


def _task_grads(losses: Sequence[Tensor], params: Sequence[nn.Parameter]) -> list[list[Tensor | None]]:
    """grads[t][p] = d losses[t] / d params[p] (None where the loss does not reach the parameter)."""
    grads: list[list[Tensor | None]] = []
    for loss in losses:
        if not params or not loss.requires_grad:
            grads.append([None] * len(params))
            continue
        grads.append(list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)))
    if _distributed() and params:
        if any(g is not None and g.is_sparse for row in grads for g in row):
            raise RuntimeError(
                "gradient weighting under torch.distributed needs dense gradients on shared parameters; "
                "build the model with sparse_grad=False"
            )
        # Ranks must agree on which entries exist: fill Nones with zeros before averaging.
        grads = [[torch.zeros_like(p) if g is None else g for g, p in zip(row, params)] for row in grads]
        _average([g for row in grads for g in row])
    return grads


def _dense(g: Tensor) -> Tensor:
    return g.to_dense() if g.is_sparse else g


def _dot(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """<a, b> as a 0-dim float32+ tensor; None when either side is None (= zero)."""
    if a is None or b is None:
        return None
    if a.is_sparse and b.is_sparse:
        prod = (a.coalesce() * b.coalesce()).coalesce()
        return prod.values().sum(dtype=torch.float32 if prod.dtype in (torch.float16, torch.bfloat16) else None)
    if a.is_sparse or b.is_sparse:
        s, d = (a, b) if a.is_sparse else (b, a)
        s = s.coalesce()
        return (s.values() * d[tuple(s.indices())]).sum()
    return torch.sum(a * b)


def _accumulator_dtype(grads: list[list[Tensor | None]]) -> torch.dtype:
    """float32, or the gradients' dtype when wider (float64 models keep their precision)."""
    dtypes = [g.dtype for row in grads for g in row if g is not None]
    return torch.promote_types(dtypes[0], torch.float32) if dtypes else torch.float32


def _gram(grads: list[list[Tensor | None]], device: torch.device) -> Tensor:
    """G[i, j] = <g_i, g_j> summed over all parameters, shape (T, T), float32 or wider."""
    t = len(grads)
    gram = torch.zeros(t, t, device=device, dtype=_accumulator_dtype(grads))
    for i in range(t):
        for j in range(i, t):
            total = None
            for a, b in zip(grads[i], grads[j]):
                d = _dot(a, b)
                if d is not None:
                    total = d if total is None else total + d
            if total is not None:
                gram[i, j] = total
                gram[j, i] = total
    return gram


def _norms(grads: list[list[Tensor | None]], device: torch.device) -> Tensor:
    """(T, P) L2 norm of each task's gradient on each parameter (0 for None)."""
    t, p = len(grads), len(grads[0]) if grads else 0
    out = torch.zeros(t, p, device=device, dtype=_accumulator_dtype(grads))
    for i, row in enumerate(grads):
        for j, g in enumerate(row):
            if g is not None:
                out[i, j] = (g.coalesce().values() if g.is_sparse else g).norm()
    return out


def _add_correction(params: Sequence[nn.Parameter], grads: list[list[Tensor | None]], coeff: Tensor) -> None:
    """params[p].grad += sum_t coeff[t, p] * grads[t][p]; coeff is (T, P) (or (T,) for all parameters)."""
    for j, p in enumerate(params):
        corr = None
        for i, row in enumerate(grads):
            g = row[j]
            if g is None:
                continue
            c = coeff[i, j] if coeff.dim() == 2 else coeff[i]
            term = g * c.to(g.dtype)
            corr = term if corr is None else corr + term
        if corr is None:
            continue
        if p.grad is None:
            p.grad = corr
        elif p.grad.is_sparse != corr.is_sparse:
            p.grad = _dense(p.grad) + _dense(corr)
        elif p.grad.is_sparse:
            p.grad = (p.grad + corr).coalesce()
        else:
            p.grad.add_(corr)


def last_shared_layer(shared: Sequence[nn.Parameter]) -> nn.Parameter | None:
    """GradNorm's W: among the shared parameters with the most dimensions (at least 2), the last one.

    `shared` is in the model's registration order, which in a generated model is forward order. If a
    shared expert group exists, W is the stacked weight (n, d_in, d_out) of the last shared expert
    layer (its stacked biases (n, d_out) are 2-D and so never win); otherwise the last shared 2-D
    tensor: a Linear weight (MLP biases and BatchNorm vectors are 1-D), or the embedding table when
    the embeddings are the only shared layer (ESMM). torch-rechub's GradNorm picks an embedding table
    even when shared MLP layers exist (PEERS 1g.1). Pass `layer=` to make() to choose W yourself.
    """
    params = list(shared)
    top = max((p.dim() for p in params), default=0)
    if top < 2:
        return None
    return next(p for p in reversed(params) if p.dim() == top)


# --- the interface ----------------------------------------------------------------------------------


class Weighting(nn.Module):
    """Combines per-task losses into parameter gradients; may own learnable parameters and state buffers."""

    name = "weighting"

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float], shared: Sequence[nn.Parameter]) -> None:
        super().__init__()
        tasks = tuple(tasks)
        if not tasks:
            raise ValueError("loss weighting needs at least one task")
        dupes = sorted({t for t in tasks if tasks.count(t) > 1})
        if dupes:
            raise ValueError(f"duplicate task name(s) {', '.join(map(repr, dupes))}")
        unknown = sorted(set(weights) - set(tasks))
        if unknown:
            raise ValueError(f"weights given for unknown task(s) {', '.join(map(repr, unknown))} (tasks: {', '.join(tasks)})")
        self.tasks = tasks
        self.fixed = tuple(float(weights.get(t, 1.0)) for t in tasks)
        bad = [f"{t}={w!r}" for t, w in zip(tasks, self.fixed) if not math.isfinite(w) or w < 0]
        if bad:
            raise ValueError(f"loss weights must be finite and non-negative: {', '.join(bad)}")
        # A plain list, not registered: these parameters belong to the model (and to its optimizer group).
        self.shared = list(shared)
        self.register_buffer("fixed_weights", torch.tensor(self.fixed), persistent=False)

    def backward(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:  # noqa: D102 - see the class docstring
        raise NotImplementedError

    # helpers for subclasses

    def _weighted(self, losses: Mapping[str, Tensor]) -> list[Tensor]:
        """[w_t * L_t] in task order; each loss must be a 0-dim tensor."""
        if set(losses) != set(self.tasks):
            missing = [t for t in self.tasks if t not in losses]
            extra = sorted(set(losses) - set(self.tasks))
            raise ValueError(f"{self.name}: losses for {sorted(losses)} but tasks are {list(self.tasks)}"
                             + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
        out = []
        for t, w in zip(self.tasks, self.fixed):
            loss = losses[t]
            if loss.dim() != 0:
                raise ValueError(f"{self.name}: loss '{t}' must be a scalar, got shape {tuple(loss.shape)}")
            out.append(loss * w if w != 1.0 else loss)
        return out

    def _result(self, weights: Tensor) -> dict[str, Tensor]:
        w = weights.detach()
        return {t: w[i] for i, t in enumerate(self.tasks)}

    def _fixed_tensor(self, like: Tensor) -> Tensor:
        return self.fixed_weights.to(like.device)  # a no-op once the trainer has moved this module

    def _sync_own_grads(self) -> None:
        """Average this module's own parameter gradients over ranks (they are not inside the model's DDP)."""
        if _distributed():
            _average([p.grad for p in self.parameters() if p.grad is not None])

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}, weights={list(self.fixed)}, shared={len(self.shared)} tensors"


class Fixed(Weighting):
    """sum_t w_t * L_t: one backward pass, effective weight w_t."""

    name = "fixed"

    def backward(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        weighted = self._weighted(losses)
        torch.stack(weighted).sum().backward()
        return self._result(self._fixed_tensor(weighted[0]))


class UWL(Weighting):
    """Uncertainty weighting, Kendall, Gal & Cipolla (CVPR 2018), in the paper's exact per-kind forms.

    With a learnable s_t = log sigma_t^2 per task (initialised to 0; the paper learns the log-variance
    for numerical stability), the paper's losses are
        binary (classification, eq. 10):  L_t / sigma_t^2     + log sigma_t  =       exp(-s_t) * l_t + s_t / 2
        regression (Gaussian, eq. 7):     L_t / (2 sigma_t^2) + log sigma_t  = 0.5 * exp(-s_t) * l_t + s_t / 2
    with l_t = w_t * L_t. The effective weight is c_t * exp(-s_t) * w_t (c = 1 binary, 0.5 regression);
    at the optimum over s_t it is 1 / (2 l_t) for both kinds: a task with a larger (noisier) loss gets a
    smaller weight. Unlike torch-rechub (`2 L exp(-w) + w` with w clamped >= 0, PEERS 1g.3), s_t is not
    clamped, so a task's weight can exceed its starting value; EasyRec uses the same forms as here.
    Tasks whose kind is not given are binary.
    """

    name = "uwl"

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float], shared: Sequence[nn.Parameter],
                 kinds: Mapping[str, object] | None = None) -> None:
        super().__init__(tasks, weights, shared)
        kinds = dict(kinds or {})
        unknown = sorted(set(kinds) - set(self.tasks))
        if unknown:
            raise ValueError(f"uwl: kinds given for unknown task(s) {', '.join(map(repr, unknown))}")
        scale = []
        for t in self.tasks:
            kind = getattr(kinds.get(t, "binary"), "value", kinds.get(t, "binary"))
            if kind not in vocab.names(vocab.TaskKind):
                raise ValueError(f"uwl: task '{t}' has kind {kind!r}; expected 'binary' or 'regression'")
            scale.append(1.0 if kind == vocab.TaskKind.binary.value else 0.5)
        self.log_var = nn.Parameter(torch.zeros(len(self.tasks)))  # s_t = log sigma_t^2
        self.register_buffer("scale", torch.tensor(scale))  # c_t

    def backward(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        weighted = torch.stack(self._weighted(losses))  # (T,)
        s = self.log_var.to(weighted.device)
        precision = self.scale.to(weighted.device) * torch.exp(-s)  # (T,)
        total = (precision * weighted).sum() + 0.5 * s.sum()
        total.backward()
        self._sync_own_grads()
        return self._result(precision * self._fixed_tensor(weighted))


class GradNorm(Weighting):
    """GradNorm, Chen et al. (ICML 2018), Algorithm 1.

    Learnable task weights v_t (init 1). The model is trained on sum_t v_t * l_t with v held constant;
    v is trained only on the GradNorm loss
        G_t   = || d (v_t l_t) / dW ||_2 = v_t || d l_t / dW ||_2        (W: the last shared layer)
        r_t   = (l_t / l_t(0)) / mean_k (l_k / l_k(0))                     (relative inverse training rate)
        L_gn  = sum_t | G_t - const( mean_k G_k * r_t ** alpha ) |,  alpha = 1.5
    whose gradient the call stores in v.grad for the trainer's optimizer step. Before each call the
    weights are renormalised so that sum_t v_t = T (the paper renormalises after each update; doing it
    before the next use is the same except for the very last step), clamped at a tiny positive value
    first. l_t(0) is the first call's loss. W is `layer` if given, else last_shared_layer(shared): the
    stacked weights of the last shared expert layer, else the last shared Linear weight, else the
    shared embedding table (see last_shared_layer for the rule). The effective
    weight is w_t * v_t. With one task or no shared layer there is nothing to balance: v stays at 1.
    """

    name = "gradnorm"

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float], shared: Sequence[nn.Parameter],
                 alpha: float = 1.5, layer: nn.Parameter | None = None) -> None:
        super().__init__(tasks, weights, shared)
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"gradnorm: alpha must be finite and >= 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.task_weights = nn.Parameter(torch.ones(len(self.tasks)))
        self.register_buffer("initial_losses", torch.zeros(len(self.tasks)))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))
        self.layer = [layer if layer is not None else last_shared_layer(self.shared)]  # a list: not registered
        if len(self.tasks) > 1 and self.layer[0] is None:
            log.warning("gradnorm: no shared weight matrix to balance gradients on; task weights stay at 1")

    def backward(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        t = len(self.tasks)
        with torch.no_grad():
            v = self.task_weights
            v.clamp_(min=1e-6)
            v.mul_(t / v.sum())
        weighted = torch.stack(self._weighted(losses))  # (T,)
        v = self.task_weights.to(weighted.device)
        layer = self.layer[0]
        if t > 1 and layer is not None:
            grads = _task_grads(list(weighted), [layer])
            norms = _norms(grads, weighted.device)[:, 0]  # || d l_t / dW ||, constant w.r.t. v
            with torch.no_grad():
                current = weighted.detach().float()
                started = self.started.to(weighted.device)
                initial = torch.where(started, self.initial_losses.to(weighted.device), current)
                self.initial_losses.copy_(initial)
                self.started.fill_(True)
                ratio = current / initial.clamp_min(_TINY)
                rate = ratio / ratio.mean().clamp_min(_TINY)
            g = v * norms  # (T,) G_t, differentiable in v only
            target = (g.mean() * rate.pow(self.alpha)).detach()
            gn_loss = (g - target).abs().sum()
            (grad_v,) = torch.autograd.grad(gn_loss, self.task_weights)
            if self.task_weights.grad is None:
                self.task_weights.grad = grad_v
            else:
                self.task_weights.grad.add_(grad_v)
        (v.detach() * weighted).sum().backward()
        self._sync_own_grads()
        return self._result(v * self._fixed_tensor(weighted))


class MetaBalance(Weighting):
    """MetaBalance, He et al. (WWW 2022), Algorithm 1 with the "adapt both" strategy.

    For each shared parameter tensor p (layer-wise, as in the paper) and task t, with g_{t,p} the
    gradient of l_t on p:
        m_{t,p} <- beta * m_{t,p} + (1 - beta) * ||g_{t,p}||                      (moving average, beta = 0.9)
        g_{a,p} <- r * (m_{tar,p} / m_{a,p}) * g_{a,p} + (1 - r) * g_{a,p}         (each auxiliary task a, r = 0.7)
        grad_p   = g_{tar,p} + sum_a g_{a,p}
    so each auxiliary gradient's magnitude moves toward the target task's (fully at r = 1, not at all at
    r = 0). The target task is the first of `tasks` unless `target` names another. Parameters the target
    does not reach keep unscaled auxiliary gradients; non-shared parameters get the plain sum. The
    moving averages start at 0 (both sides of the ratio carry the same bias, so it cancels). The returned
    weight of task t is w_t * ||scaled g_t|| / ||g_t|| over all shared parameters (w_tar for the target).
    """

    name = "metabalance"

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float], shared: Sequence[nn.Parameter],
                 target: str | None = None, relax: float = 0.7, beta: float = 0.9) -> None:
        super().__init__(tasks, weights, shared)
        if target is None:
            target = self.tasks[0]
        if target not in self.tasks:
            raise ValueError(f"metabalance: target task '{target}' is not one of {', '.join(self.tasks)}")
        if not 0.0 <= relax <= 1.0:
            raise ValueError(f"metabalance: relax factor must lie in [0, 1], got {relax!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"metabalance: beta must lie in [0, 1), got {beta!r}")
        self.target = target
        self.relax, self.beta = float(relax), float(beta)
        self.register_buffer("magnitudes", torch.zeros(len(self.tasks), len(self.shared)))  # m_{t,p}

    def backward(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        weighted = self._weighted(losses)
        grads = _task_grads(weighted, self.shared)
        torch.stack(weighted).sum().backward()
        fixed = self._fixed_tensor(weighted[0])
        if not self.shared or len(self.tasks) == 1:
            return self._result(fixed)
        device = weighted[0].device
        norms = _norms(grads, device)  # (T, P)
        with torch.no_grad():
            m = self.magnitudes.to(device)
            m.mul_(self.beta).add_((1.0 - self.beta) * norms)
            self.magnitudes.copy_(m)
            k = self.tasks.index(self.target)
            m_tar = m[k]  # (P,)
            scale = self.relax * m_tar / m.clamp_min(_TINY) + (1.0 - self.relax)  # (T, P)
            scale = torch.where(m_tar > 0, scale, torch.ones_like(scale))
            scale[k] = 1.0
            _add_correction(self.shared, grads, scale - 1.0)
            before = norms.pow(2).sum(dim=1)
            after = (scale * norms).pow(2).sum(dim=1)
            ratio = torch.where(before > 0, (after / before.clamp_min(_TINY)).sqrt(), torch.ones_like(before))
        return self._result(fixed * ratio)


class PCGrad(Weighting):
    """PCGrad, Yu et al. (NeurIPS 2020), Algorithm 1, on the shared parameters.

    With g_t the gradient of l_t on all shared parameters (one concatenated vector):
        for each task i:  g_i' = g_i;  for j != i in random order:
                              if <g_i', g_j> < 0:  g_i' <- g_i' - <g_i', g_j> / ||g_j||^2 * g_j
        grad_shared = sum_i g_i'
    Non-shared parameters get the plain sum. Every g_i' is a linear combination of the original
    gradients, so the projections run on the T x T Gram matrix of inner products (no flattened copies,
    no host sync: the conflict test is a clamp, not a branch) and the result is applied as
    sum_t (c_t - 1) g_t on top of the plain sum: exactly the plain sum when nothing conflicts. The random
    order comes from `generator` (default: torch's global CPU generator, so seeds reproduce it). The
    returned weight of task t is w_t * ||g_t'|| / ||g_t||.
    """

    name = "pcgrad"

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float], shared: Sequence[nn.Parameter],
                 generator: torch.Generator | None = None) -> None:
        super().__init__(tasks, weights, shared)
        self.generator = generator

    def backward(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        weighted = self._weighted(losses)
        grads = _task_grads(weighted, self.shared)
        torch.stack(weighted).sum().backward()
        fixed = self._fixed_tensor(weighted[0])
        t = len(self.tasks)
        if not self.shared or t == 1:
            return self._result(fixed)
        device = weighted[0].device
        with torch.no_grad():
            gram = _gram(grads, device)  # (T, T)
            sq = gram.diagonal().clamp_min(_TINY)  # ||g_j||^2
            coeffs = torch.eye(t, device=device, dtype=gram.dtype)  # row i: g_i' in the basis of the g_j
            for i in range(t):
                c = coeffs[i].clone()
                others = [j for j in torch.randperm(t, generator=self.generator).tolist() if j != i]
                for j in others:
                    dot = c @ gram[:, j]  # <g_i', g_j>
                    c[j] = c[j] - dot.clamp(max=0.0) / sq[j]
                coeffs[i] = c
            combined = coeffs.sum(dim=0)  # grad_shared = sum_j combined[j] g_j
            _add_correction(self.shared, grads, combined - 1.0)
            after = torch.einsum("ij,jk,ik->i", coeffs, gram, coeffs)  # ||g_i'||^2
            before = gram.diagonal()
            ratio = torch.where(before > 0, (after.clamp_min(0) / before.clamp_min(_TINY)).sqrt(), torch.ones_like(before))
        return self._result(fixed * ratio)


_CLASSES: dict[vocab.Weighting, type[Weighting]] = {
    vocab.Weighting.fixed: Fixed, vocab.Weighting.uwl: UWL, vocab.Weighting.gradnorm: GradNorm,
    vocab.Weighting.metabalance: MetaBalance, vocab.Weighting.pcgrad: PCGrad}


def make(name: str, tasks: Sequence[str], weights: Mapping[str, float], shared: Sequence[nn.Parameter], *,
         target: str | None = None, kinds: Mapping[str, object] | None = None,
         layer: nn.Parameter | None = None) -> Weighting:
    """The weighting strategy `name` (one of NAMES) for these tasks.

    target: MetaBalance's target task (default: the first task); kinds: task kind per task for UWL
    ('binary' or 'regression', or a TaskKind; default binary); layer: GradNorm's W (default:
    last_shared_layer(shared)). Options a strategy does not use are ignored.
    """
    key = name.strip().lower()
    if key not in NAMES:
        close = difflib.get_close_matches(key, NAMES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown loss weighting '{name}' (known: {', '.join(NAMES)}){hint}")
    strategy = vocab.Weighting(key)
    if strategy is vocab.Weighting.uwl:
        return UWL(tasks, weights, shared, kinds=kinds)
    if strategy is vocab.Weighting.metabalance:
        return MetaBalance(tasks, weights, shared, target=target)
    if strategy is vocab.Weighting.gradnorm:
        return GradNorm(tasks, weights, shared, layer=layer)
    return _CLASSES[strategy](tasks, weights, shared)
