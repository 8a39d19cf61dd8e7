"""Optimizers, sparse embedding updates, the shared parameter set and the loss weighting of a training run.

Takes a generated module, its block graph, the objective and the run's config; gives `build_optimizers`
(the fused dense optimizer plus, with sparse embedding updates, the tables' row-wise one, as one
`Optimizers`), `use_sparse` (Note [Sparse embedding updates]), `shared_parameters` (the blocks two or
more losses train) and `make_weighting` (runtime/weighting.py's strategy over the loss terms).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..vocab import Optimizer, TaskKind
from .config import ConfigError, SparseEmbeddings, TrainConfig
from .objective import Objective

__all__ = ["SPARSE_AUTO_BYTES", "Optimizers", "RowAdam", "build_optimizers", "make_optimizer", "make_weighting",
           "shared_parameters", "table_bytes", "use_sparse"]

SPARSE_AUTO_BYTES = 4 << 20  # `auto` turns sparse embedding updates on for a table at least this large
# (Note [Sparse embedding updates]: measured crossover)


def shared_parameters(module: nn.Module, graph: Any) -> list[nn.Parameter]:
    """Parameters of the blocks that receive gradient from two or more losses (graph.shared_nodes).

    A node `<kind>:<name>` is the module attribute `<name>` (`transfer_<name>` for transfer nodes). The
    result is in the module's registration order, which in a generated model is forward order (GradNorm
    takes the last shared layer from it).
    """
    from ..graph import shared_nodes

    wanted: set[int] = set()
    for nid in shared_nodes(graph):
        kind, name = nid.split(":", 1)
        block = getattr(module, f"transfer_{name}" if kind == "transfer" else name, None)
        if isinstance(block, nn.Module):
            wanted.update(id(p) for p in block.parameters())
    return [p for p in module.parameters() if id(p) in wanted and p.requires_grad]


def make_weighting(name: str, objective: Objective, shared: list[nn.Parameter]) -> nn.Module:
    """runtime/weighting.py's strategy `name` over the objective's loss terms."""
    from . import weighting as strategies

    kinds = {t.key: TaskKind.binary if t.binary else TaskKind.regression for t in objective.terms}
    try:
        return strategies.make(name, objective.loss_keys, objective.weights, shared, kinds=kinds)
    except ValueError as e:
        raise ConfigError(str(e)) from None


DENSE_OPTIMIZERS: dict[Optimizer, type[torch.optim.Optimizer]] = {
    Optimizer.adam: torch.optim.Adam, Optimizer.adamw: torch.optim.AdamW, Optimizer.sgd: torch.optim.SGD,
    Optimizer.adagrad: torch.optim.Adagrad}


def make_optimizer(name: str, params: list[dict[str, Any]], lr: float, device: torch.device) -> torch.optim.Optimizer:
    """adam/adamw/sgd/adagrad, fused where the device supports it (fused Adam: ~1.6x the foreach step)."""
    cls = DENSE_OPTIMIZERS[Optimizer(name)]
    for impl in ({"fused": True}, {"foreach": True}, {}):
        try:
            opt = cls(params, lr=lr, **impl)
        except (RuntimeError, TypeError, ValueError):
            continue
        if impl.get("fused"):  # construction may succeed where the step does not: try one on a scratch tensor
            try:
                probe = nn.Parameter(torch.zeros(1, device=device))
                probe.grad = torch.zeros(1, device=device)
                cls([probe], lr=lr, **impl).step()
            except (RuntimeError, TypeError, ValueError):
                continue
        return opt
    raise ConfigError(f"optimizer '{name}' cannot be built on {device}")


# Note [Sparse embedding updates]
# With dense gradients every step touches every row of every embedding table several times: the
# embedding backward zeroes and scatters into a (rows x dim) gradient, and Adam reads and writes the
# weight, the gradient and both moments of every row, although a batch of 1024 rows touches at most
# 1024 x fields of them. For the small synthetic tables that costs nothing; on real vocabularies (millions
# of ids) it dominates the step (DESIGN.md, Generated code). `--sparse-embeddings on` builds the tables
# with sparse gradients (nn.Embedding(sparse=True): the gradient holds only the looked-up rows) and gives
# the table weights their own row-wise optimizer: RowAdam for adam/adamw (SparseAdam's lazy Adam, Note
# [Row-wise Adam]: a row's moments and weight move only in steps whose batch contains it; its first step
# is dense Adam's except for gradients near eps, which lazy Adam adds before the second moment's bias
# correction), Adagrad and SGD as they are (both update only the rows present). Every other parameter keeps the fused dense
# optimizer. Sparse updates take no weight decay (a decayed row would have to move every step, which is
# what they avoid), so `on` refuses a spec with weight_decay > 0; and DDP's NCCL backend cannot reduce
# sparse gradients, so `on` refuses torchrun. `auto` (the default) turns them on when neither applies and
# the largest table holds at least SPARSE_AUTO_BYTES of weights.

class RowAdam(torch.optim.Optimizer):
    """Lazy Adam over sparse embedding gradients: torch.optim.SparseAdam's update, with dense index ops.

    Note [Row-wise Adam]: SparseAdam coalesces each gradient, then reads and writes the moments through
    sparse tensors (sparse_mask, sparse add): on a CPU ~12 ms of a 15.6 ms ESMM step over 23 tables of
    300k rows, and growing with the distinct rows a batch touches, so a larger vocabulary made every step
    slower. Here the looked-up rows are made unique once (torch.unique), their gradients summed with
    index_add_, and the moments and weights of those rows gathered, updated and written back as dense
    (rows, dim) blocks. The arithmetic is SparseAdam's, term for term (the moments move as
    old + (new - old)(1 - beta), eps is added to sqrt(v) before the bias correction, the step size is
    lr sqrt(1 - beta2^t) / (1 - beta1^t) with t the table's step count), and so is the state (step,
    exp_avg, exp_avg_sq), so checkpoints of either load into the other; only the order in which a
    batch's duplicate ids add up may differ.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        if lr < 0 or eps < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"RowAdam needs lr >= 0, eps >= 0 and betas in [0, 1); got {lr}, {eps}, {betas}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "maximize": False})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("RowAdam takes no closure")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("RowAdam updates sparse gradients only (nn.Embedding(sparse=True))")
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                grad = p.grad.coalesce() if p.grad.is_cuda else p.grad  # CUDA's index_add_ adds in no fixed order
                rows, g = _rows(grad)
                if rows.numel() == 0:
                    continue
                t = state["step"]
                step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                m = state["exp_avg"].index_select(0, rows)  # (U, dim)
                m.add_(g.sub(m).mul_(1 - beta1))
                v = state["exp_avg_sq"].index_select(0, rows)
                v.add_(g.pow_(2).sub_(v).mul_(1 - beta2))
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                p.index_add_(0, rows, m.div_(v.sqrt_().add_(group["eps"])).mul_(-step_size))


def _rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse (rows x dim) gradient's distinct rows (sorted) and their summed values (U, dim), dense."""
    index, values = grad._indices()[0], grad._values()
    if grad.is_coalesced():
        return index, values.clone()
    rows, inverse = torch.unique(index, sorted=True, return_inverse=True)
    return rows, values.new_zeros((rows.numel(), *values.shape[1:])).index_add_(0, inverse, values)


SPARSE_OPTIMIZERS: dict[Optimizer, type[torch.optim.Optimizer]] = {
    Optimizer.adam: RowAdam, Optimizer.adamw: RowAdam,
    Optimizer.sgd: torch.optim.SGD, Optimizer.adagrad: torch.optim.Adagrad}


def table_bytes(cls: type, vocab: Mapping[str, int]) -> int:
    """Weight bytes of the largest embedding table `cls` builds over `vocab` (built on the meta device)."""
    with torch.device("meta"):
        model = cls(dict(vocab))
    return max((m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Embedding)),
               default=0)


def use_sparse(cfg: TrainConfig, table_bytes: int, distributed: bool) -> bool:
    """Whether this run updates its embedding tables sparsely (Note [Sparse embedding updates])."""
    if cfg.sparse_embeddings == SparseEmbeddings.off.value:
        return False
    if cfg.sparse_embeddings == SparseEmbeddings.on.value:
        if distributed:
            raise ConfigError("--sparse-embeddings on: sparse embedding gradients do not work under torchrun "
                              "(DDP's NCCL backend cannot reduce them); use --sparse-embeddings off")
        return True
    return not distributed and cfg.weight_decay == 0 and table_bytes >= SPARSE_AUTO_BYTES


class Optimizers:
    """The dense optimizer and, with sparse embedding updates, the tables' row-wise one, stepped as one."""

    def __init__(self, dense: torch.optim.Optimizer, sparse: torch.optim.Optimizer | None) -> None:
        self.dense, self.sparse = dense, sparse

    def zero_grad(self) -> None:
        self.dense.zero_grad(set_to_none=False)  # reuse dense gradient buffers (DESIGN.md: no fresh page faults)
        if self.sparse is not None:
            self.sparse.zero_grad(set_to_none=True)  # a sparse gradient is rebuilt by every backward

    def step(self) -> None:
        self.dense.step()
        if self.sparse is not None:
            self.sparse.step()

    def state_dict(self) -> dict[str, Any]:
        """The dense optimizer's state dict, plus the sparse one's under "sparse" when there is one."""
        state = self.dense.state_dict()
        if self.sparse is not None:
            state = {**state, "sparse": self.sparse.state_dict()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        sparse = state.pop("sparse", None)
        if (sparse is None) != (self.sparse is None):
            raise ConfigError("--resume: the checkpoint's embedding updates were "
                              f"{'dense' if sparse is None else 'sparse'}; resume with the same --sparse-embeddings")
        self.dense.load_state_dict(state)
        if self.sparse is not None:
            self.sparse.load_state_dict(sparse)



def build_optimizers(model: nn.Module, weighting: nn.Module, cfg: TrainConfig, device: torch.device) -> Optimizers:
    """The run's optimizers: the model's dense parameters (decayed) and the weighting's learnable ones (never
    decayed) in the fused dense optimizer; sparse embedding tables, if any, in their row-wise one."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in tables],
               "weight_decay": cfg.weight_decay}]
    extra = [p for p in weighting.parameters() if p.requires_grad]
    if extra:  # learnable loss weights (UWL): trained, never decayed
        groups.append({"params": extra, "weight_decay": 0.0})
    sparse_params = [p for p in model.parameters() if id(p) in tables and p.requires_grad]
    return Optimizers(
        make_optimizer(cfg.optimizer, groups, cfg.lr, device),
        SPARSE_OPTIMIZERS[Optimizer(cfg.optimizer)](sparse_params, lr=cfg.lr) if sparse_params else None)
