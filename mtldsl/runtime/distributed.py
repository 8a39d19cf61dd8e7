"""Data-parallel training through `torchrun`: the process group, the per-rank shards, rank-0 decisions.

`torchrun --nproc_per_node=N -m mtldsl train SPEC` starts N copies of the same command with WORLD_SIZE,
RANK and LOCAL_RANK (and MASTER_ADDR/MASTER_PORT) in their environment. `process_group(device)` reads
them, joins the group (gloo on CPU; nccl on CUDA, each process on `cuda:LOCAL_RANK`) and leaves it at the
end, on error too. Without those variables (or with WORLD_SIZE=1) it yields None and nothing changes.
If the caller has already initialised torch.distributed, that group is used and left alone.

Note [Global batch]
`--batch-size B` is the batch of ONE process: a step trains on a global batch of WORLD_SIZE x B rows.
Every rank loads the same dataset (deterministic by seed) and draws the same order of the train
split per epoch (the trainer's (seed, epoch) generator; Note [Block shuffle] in data.py); global batch k
is rows order[k*W*B : (k+1)*W*B] and rank r takes the contiguous block [r*B, (r+1)*B) of it. The tail
(t = n mod W*B rows) is split evenly too, t // W rows per rank; the t mod W (< W) rows left over are not
trained on in that epoch, nor is a tail of one row per rank (Note [Remainder batch] in data.py). So every rank runs the same number of steps on shards of equal size, and since
the losses are means and DDP averages gradients, one DDP step equals one single-process step on the
global batch (single process with --batch-size W*B sees exactly the same global batches). A masked loss
(`loss x where m`) is a mean over a data-dependent number of rows: under DDP its denominator is the
global count (one all_reduce of the counts), and the rank's numerator is scaled by W, so DDP's average
is again the global batch's masked mean (Objective.losses). BatchNorm keeps per-process batch
statistics (standard DDP, no SyncBatchNorm): specs with batch_norm train on per-shard statistics, and
running statistics are rank 0's (DDP broadcasts buffers from rank 0 every forward). Dropout masks are
drawn from each rank's own (identically seeded) RNG, so they are not the single process's masks.
All ranks keep the same global RNG state (same seed, same draws): PCGrad's random task order relies on it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Context", "batches_per_epoch", "env_world", "process_group", "rows_per_epoch", "shard_batches"]

ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def env_world() -> tuple[int, int, int] | None:
    """(world_size, rank, local_rank) from torchrun's environment; None when absent or WORLD_SIZE <= 1."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (as torchrun sets them): "
                         + ", ".join(f"{k}={os.environ.get(k)!r}" for k in ENV)) from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    return world, rank, local


@dataclass(frozen=True)
class Context:
    """This process's place in the group; the few collectives the trainer needs."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled; for small things: paths, metric dicts)."""
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def sum_(self, t: Tensor) -> Tensor:
        """All-reduce (sum) in place; returns `t`."""
        import torch.distributed as dist

        dist.all_reduce(t)
        return t

    def mean_(self, t: Tensor) -> Tensor:
        """All-reduce (mean) in place; returns `t`."""
        return self.sum_(t).div_(self.world_size)

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index or 0])
        else:
            dist.barrier()


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[Context | None]:
    """Join torchrun's group for training on `device` (see the module docstring); None when not under torchrun.

    On CUDA the device becomes `cuda:LOCAL_RANK` (the Context's `device`). The group is destroyed on
    exit, also on an exception, unless it was initialised before this call.

    Note [Leaving a gloo group]: a rank that destroys its gloo group while its peer is still inside a
    collective (or tearing its own group down) aborts the process ("terminate called without an active
    exception", seen in 1 of 8 two-process runs). Every rank therefore passes a barrier before
    destroying the group on a normal exit; after an exception it does not (the peer may never arrive).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # someone else's group (tests, a user's launcher)
        world = dist.get_world_size()
        if world <= 1:
            yield None
            return
        rank = dist.get_rank()
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
        yield Context(rank, local, world, _device(device, local))
        return
    found = env_world()
    if found is None:
        yield None
        return
    if not dist.is_available():
        raise ValueError("WORLD_SIZE is set (torchrun) but this torch build has no torch.distributed")
    world, rank, local = found
    dev = _device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ValueError(f"WORLD_SIZE={world} is set but {var} is not: launch with torchrun "
                             "(or set MASTER_ADDR and MASTER_PORT)")
    dist.init_process_group(backend, rank=rank, world_size=world)
    ctx = Context(rank, local, world, dev)
    try:
        yield ctx
        ctx.barrier()  # Note [Leaving a gloo group]
    finally:
        dist.destroy_process_group()


def _device(device: torch.device, local_rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", local_rank)


# --- shards (Note [Global batch]) --------------------------------------------------------------------


def batches_per_epoch(n: int, batch_size: int, world: int) -> int:
    """Steps per epoch: full global batches, plus one for the tail when it gives every rank a row."""
    full, tail = divmod(n, batch_size * world)
    return full + (1 if tail // world >= _min_tail(batch_size) else 0)


def _min_tail(batch_size: int) -> int:
    """The fewest rows per rank the tail batch needs (Note [Remainder batch] in data.py: no one-row steps)."""
    from .data import MIN_TRAIN_ROWS

    return MIN_TRAIN_ROWS if batch_size > 1 else 1


def rows_per_epoch(n: int, batch_size: int, world: int) -> int:
    """Rows trained per epoch over all ranks (n minus the < world rows the even tail split leaves out)."""
    full, tail = divmod(n, batch_size * world)
    per = tail // world
    return full * batch_size * world + (per * world if per >= _min_tail(batch_size) else 0)


def shard_batches(split: Any, batch_size: int, rank: int, world: int,
                  generator: torch.Generator | None, skip: int = 0) -> Iterator[dict[str, Any]]:
    """Rank `rank`'s batches of one epoch of `split` (a data.Split): its block of each global batch of the
    epoch's order (the same draw as Split.batches: Note [Block shuffle] in data.py); the first `skip` unread."""
    from .data import chunk_len, epoch_chunks, sub_chunk

    step = batch_size * world
    for k, pieces in enumerate(epoch_chunks(len(split), step, generator)):
        size = chunk_len(pieces)
        per = batch_size if size == step else size // world
        if per < _min_tail(batch_size):
            return
        if k >= skip:
            yield split.gather(sub_chunk(pieces, rank * per, (rank + 1) * per))
