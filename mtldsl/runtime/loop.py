"""The one generic loop: a prepared spec + a config -> a trained module in a run folder, with per-task metrics.

Takes a spec (text or Checked) and the options train() was given; gives a RunResult after training with
losses, label domains and metrics read from the IR only (objective.py), early stopping on the monitor,
atomic checkpoints and exact resume (Note [Resume]), optionally data-parallel under torchrun (Note
[Distributed training]).

Hot path: batches are gathered from a window of the split's columns (data.py, Note [Block shuffle]),
holding only the model's columns and the label products the losses need; per-step losses stay on the
device and are read back once every LOG_EVERY steps (NaN check, progress bar), and before any
checkpoint is written, so a diverged step never reaches a checkpoint. Gradients are zeroed in place,
not freed: a large fused embedding table keeps one persistent dense gradient buffer instead of
allocating (and page-faulting) a fresh one every step (DESIGN.md, Generated code); the optimizer is
fused where the device supports it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__
from ..catalog import schema_to_json
from ..pipeline import Checked
from . import runs
from .binding import Prepared, check_spec, instantiate, prepare, spec_input, vocab_sizes
from .checkpoint import FORMAT, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import CHECKPOINT_COST, CHECKPOINT_EVERY, ConfigError, TrainConfig, make_config, resume_config
from .conflict import epoch_means, gradient_cosines, write_conflict
from .data import MIN_TRAIN_ROWS, DataError, train_batch_count
from .datacheck import unlinked_rows
from .objective import Objective, evaluate_split, format_table, make_monitor, undefined_cause
from .optim import build_optimizers, make_weighting, shared_parameters, table_bytes, use_sparse
from .precision import dense_macs, forward, resolve_device, resolve_precision

__all__ = ["LOG_EVERY", "RunResult", "Trainer", "TrainingDiverged", "run"]

LOG_EVERY = 20  # steps between reads of the device-side losses (NaN check, progress bar)


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; nothing from that step on reached a checkpoint."""

    def __init__(self, output: str, value: float, step: int, epoch: int, batch: int) -> None:
        self.output, self.value, self.step, self.epoch, self.batch = output, value, step, epoch, batch
        super().__init__(
            f"training diverged: loss '{output}' is {value} at step {step} (epoch {epoch}, batch {batch}); "
            "try a lower --lr, or another --weighting"
        )


# Note [Resume]
# `last.pt` is written at the end of every epoch (after validation) and every `checkpoint_every` steps
# (by default every 200 steps at most ~5 % of the time: Note [Checkpoint cost]);
# `checkpoint.pt` at the end of each epoch that improves the monitor (the best state; written before
# `last.pt`, so `last.pt` never claims a best that `checkpoint.pt` does not hold). Both hold the whole
# training state: model, optimizer and weighting state dicts, completed epochs, the global step, the
# batches already done in the current epoch with their partial loss sums, best value/epoch, patience
# counter, history, the torch RNG states, the config and the vocabulary sizes.
# Resume (`resume=True`, `out` = the run folder) rebuilds the model from the run's model.py, loads
# `last.pt` and continues *exactly* where it stopped, mid-epoch included: each epoch's shuffle comes
# from a generator seeded by (seed, epoch), so the resumed epoch redraws the same order
# (Note [Block shuffle] in data.py) and skips the batches already trained on, without reading them
# (none is seen twice or skipped), and the restored RNG state gives the
# same dropout masks. Resuming the end of epoch k with the same seed therefore ends with the same
# parameters as an uninterrupted run. Steps after the last save are lost and redone. A resumed run may
# change only RESUMABLE settings (e.g. more --epochs); anything else must match the checkpoint.

# Note [Distributed training]
# `torchrun --nproc_per_node=N -m mtldsl train SPEC` runs `train()` in N processes; `_join_group` joins
# the group (distributed.process_group: gloo on CPU, nccl on cuda:LOCAL_RANK) and leaves it when train()
# returns or raises. Without torchrun's environment nothing below applies. Under it:
# - every rank loads the same dataset and builds the same model (DDP also broadcasts rank 0's weights);
#   `--batch-size` is per process, a step trains on a global batch of N x batch_size rows, each rank
#   its own equal-size block of the same per-epoch permutation (Note [Global batch] in distributed.py):
#   one DDP step is one single-process step on the global batch. Masked (`where`) losses divide by the
#   global mask count, so that holds for them too.
# - the training steps run through `Trainer.net`, DDP's wrapper of `Trainer.model`. DDP averages the
#   gradients of the final backward (its hooks fire on `.backward()`, not on torch.autograd.grad); the
#   gradient strategies' per-task gradients (torch.autograd.grad on the shared parameters) are averaged
#   by weighting.py, and their correction sum_t (c_t - 1) g_t is added after DDP's average, so every
#   gradient is averaged exactly once and all ranks apply the same update (UWL/GradNorm's own weights
#   are averaged by weighting.py). Logged losses are averaged over ranks at each read-back, so a NaN on
#   any rank stops every rank at the same step.
# - rank 0 alone evaluates (val each epoch, test at the end) with the unwrapped module, on the whole
#   split; the others wait for its metrics (broadcast), so early-stopping state is identical everywhere.
# - rank 0 alone writes the run folder (it picks the name and broadcasts it), checkpoints (the unwrapped
#   module's state dict: no `module.` prefix; loadable by a single process) and prints; every rank reads
#   the checkpoint on --resume (the run folder must be visible to all ranks, as on one machine). A run
#   stopped mid-epoch resumes only with the same number of processes (the batch position depends on it).



def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffle of epoch `epoch` (1-based) depends only on (seed, epoch): a resumed epoch redraws it."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]  # the content of metrics.json
    history: list[dict[str, Any]]
    table: str  # the final per-task table (test split)
    model: nn.Module  # the best checkpoint's weights, in eval mode (under DDP: on rank 0; final weights elsewhere)
    best_epoch: int | None
    is_main: bool = True  # False on the non-zero ranks of a torchrun launch (they print nothing)


@dataclass
class _State:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps so far
    batch_in_epoch: int = 0  # batches of epoch `epoch + 1` already trained
    loss_sums: list[float] = field(default_factory=list)  # partial sums of epoch `epoch + 1`
    loss_count: int = 0
    epoch_seconds: float = 0.0  # partial training-loop time of epoch `epoch + 1`
    train_seconds: float = 0.0  # training-loop time of completed epochs (no evaluation)
    samples: int = 0  # training samples of completed epochs
    best_value: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    stopped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    conflict: list[dict[str, Any]] = field(default_factory=list)  # Note [Gradient conflict]


class Trainer:
    """The loop over one prepared spec: steps, NaN checks, validation, early stopping, checkpoints.

    Data-parallel (Note [Distributed training]) when `dist` (a distributed.Context) is given: `self.model`
    stays the plain module (checkpoints, evaluation), `self.net` is its DistributedDataParallel wrapper
    that the training steps run through, `train_batches` yields this rank's shard, and only the process
    with `is_main` writes files or prints.
    """

    def __init__(self, prepared: Prepared, cfg: TrainConfig, run_dir: Path, device: torch.device, *,
                 progress: bool, log: Any = None, dist: Any = None) -> None:
        self.p, self.cfg, self.run_dir, self.device = prepared, cfg, run_dir, device
        self.dist = dist
        self.world_size = dist.world_size if dist is not None else 1
        self.rank = dist.rank if dist is not None else 0
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.warned_undefined = False
        self.objective = prepared.objective
        self.vocab = vocab_sizes(prepared.cls, prepared.dataset.schema)
        self.sparse = use_sparse(cfg, table_bytes(prepared.cls, self.vocab), dist is not None)
        self.model = instantiate(prepared.cls, self.vocab, cfg.seed, device, sparse_grad=self.sparse)
        self.precision = resolve_precision(cfg.precision, device, dense_macs(self.model))
        self.net: nn.Module = self.model
        if dist is not None:  # broadcasts rank 0's parameters and buffers: every rank starts equal
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        assert prepared.checked.graph is not None
        self.weighting = make_weighting(cfg.weighting, self.objective,
                                        shared_parameters(self.model, prepared.checked.graph)).to(device)
        self.optimizer = build_optimizers(self.model, self.weighting, cfg, device)
        self.conflict_params = shared_parameters(self.model, prepared.checked.graph) if cfg.log_conflict else None
        self.monitor = make_monitor(cfg.monitor, self.objective, prepared.dataset.train.has_groups)
        self._losses_of = (self.objective.losses if dist is None
                           else functools.partial(self.objective.losses, dist=dist))
        self.state = _State(loss_sums=[0.0] * len(self.objective.loss_keys))
        self.last_weights: Mapping[str, Any] = {}
        self.saved_at, self.save_seconds = time.perf_counter(), 0.0  # the last save's end and duration

    # ---- checkpoints --------------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        s = self.state
        return {
            "format": FORMAT,
            "mtldsl": __version__,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "weighting": self.weighting.state_dict(),
            "epoch": s.epoch, "step": s.step, "batch_in_epoch": s.batch_in_epoch,
            "loss_sums": list(s.loss_sums), "loss_count": s.loss_count, "epoch_seconds": s.epoch_seconds,
            "train_seconds": s.train_seconds, "samples": s.samples,
            "best": {"value": s.best_value, "epoch": s.best_epoch},
            "bad_epochs": s.bad_epochs, "stopped": s.stopped,
            "history": list(s.history),
            "conflict": list(s.conflict),
            "rng": rng_state(),
            "config": self.cfg.to_json(),
            "vocab_sizes": dict(self.vocab),
            "loss_keys": self.objective.loss_keys,
            "world_size": self.world_size,
        }

    def save(self, *, best: bool) -> None:
        if not self.is_main:
            return
        t = time.perf_counter()
        state = self.checkpoint()
        if best:
            save_checkpoint(state, self.run_dir / runs.CHECKPOINT)
            runs.atomic_copy(self.run_dir / runs.CHECKPOINT, self.run_dir / runs.LAST)
        else:
            save_checkpoint(state, self.run_dir / runs.LAST)
        self.saved_at = time.perf_counter()
        self.save_seconds = self.saved_at - t

    # Note [Checkpoint cost]
    # A mid-epoch save writes the whole training state: at Ali-CCP's full size 1.3M table rows with their
    # two Adam moments, ~250 MB, fsynced, ~0.4 s. Every 200 steps of ~1.6 s (ESMM with sparse updates)
    # that added a quarter to the wall time of an epoch, 186 saves in a full-size one. The steps between
    # saves may run slower too (6M rows of the full-size folder: 112k-142k training samples/s with saves
    # every 200 steps against 147k-170k with none, but this shared VM spreads that much between runs).
    # So by default (checkpoint_every None) a mid-epoch save comes every CHECKPOINT_EVERY steps only once
    # the time since the last save is CHECKPOINT_COST times what that save took: saving takes at most ~5 %
    # of the time, and a killed run loses at most max(200 steps, 20 saves' time) of work. Small models
    # save in milliseconds, so for them nothing changes. An explicit --checkpoint-every N saves every N
    # steps exactly (0: at epoch ends only). Under torchrun the default is every CHECKPOINT_EVERY steps:
    # the ranks must agree on each save (it flushes the logged losses, a collective), and their clocks
    # would not.

    def _save_due(self) -> bool:
        """Whether this step ends with a mid-epoch save (Note [Checkpoint cost])."""
        every = self.cfg.checkpoint_every
        if every is not None:
            return every > 0 and self.state.step % every == 0
        if self.state.step % CHECKPOINT_EVERY:
            return False
        return self.dist is not None or time.perf_counter() - self.saved_at >= CHECKPOINT_COST * self.save_seconds

    def restore(self, ckpt: Mapping[str, Any]) -> None:
        saved_world = int(ckpt.get("world_size", 1))
        if ckpt["batch_in_epoch"] and saved_world != self.world_size:
            raise ConfigError(f"--resume: the run stopped mid-epoch with {saved_world} process(es); resume it with "
                              f"{saved_world} (a different number of processes is fine from the end of an epoch)")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.weighting.load_state_dict(ckpt["weighting"])
        best = ckpt["best"]
        self.state = _State(
            epoch=ckpt["epoch"], step=ckpt["step"], batch_in_epoch=ckpt["batch_in_epoch"],
            loss_sums=list(ckpt["loss_sums"]), loss_count=ckpt["loss_count"], epoch_seconds=ckpt["epoch_seconds"],
            train_seconds=ckpt["train_seconds"], samples=ckpt["samples"], best_value=best["value"],
            best_epoch=best["epoch"], bad_epochs=ckpt["bad_epochs"], stopped=ckpt["stopped"],
            history=list(ckpt["history"]), conflict=list(ckpt.get("conflict", [])),
        )
        set_rng_state(ckpt["rng"])

    # Note [Undefined monitor]
    # A monitored metric can be undefined on the val split: AUC when the split holds one class of the
    # output's label, gAUC when no group holds both. Early stopping never acts on it: an epoch with an
    # undefined value neither improves on a defined best nor counts towards --patience; while no value
    # has been defined, the latest epoch is the best checkpoint. The first such epoch prints one warning
    # (even under --no-progress) naming the split and the cause, and metrics.json records the value as null.

    def warn_undefined(self, val: Mapping[str, Mapping[str, float]]) -> None:
        if self.warned_undefined or not self.is_main:
            return
        self.warned_undefined = True
        output = self.monitor.output
        cause = undefined_cause(self.monitor.metric.value, "val", val.get(output, {}))
        self.log(f"warning: the monitored {self.monitor.name} is undefined ({cause}): early stopping does not act "
                 "on it, and the last epoch is kept while it stays undefined (Note [Undefined monitor])")

    # ---- the loop ------------------------------------------------------------------------------

    def train_batches(self, epoch: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        """This process's batches of `epoch` after the first `skip` (passed over unread: Note [Resume]): all of
        them, or its shard of each global batch under DDP."""
        generator = _epoch_generator(self.cfg.seed, epoch)
        if self.dist is None:
            return self.p.splits["train"].batches(self.cfg.batch_size, shuffle=True, generator=generator, skip=skip,
                                                  min_rows=MIN_TRAIN_ROWS)
        from .distributed import shard_batches

        return shard_batches(self.p.splits["train"], self.cfg.batch_size, self.rank, self.world_size, generator,
                             skip=skip)

    def batches_per_epoch(self) -> int:
        n = len(self.p.splits["train"])
        if self.dist is None:
            return train_batch_count(n, self.cfg.batch_size)
        from .distributed import batches_per_epoch

        return batches_per_epoch(n, self.cfg.batch_size, self.world_size)

    def rows_per_epoch(self) -> int:
        """Training rows of one epoch over all processes (samples/s is the global throughput)."""
        n = len(self.p.splits["train"])
        if self.dist is None:
            return n - (1 if n % self.cfg.batch_size == 1 and self.cfg.batch_size > 1 else 0)  # Note [Remainder batch]
        from .distributed import rows_per_epoch

        return rows_per_epoch(n, self.cfg.batch_size, self.world_size)

    def fit(self) -> None:
        s = self.state
        if s.stopped:
            return
        while s.epoch < self.cfg.epochs:
            self.run_epoch(s.epoch + 1)
            if s.stopped:
                break

    def _flush(self, pending: list[Tensor], first_step: int, epoch: int, first_batch: int) -> list[float] | None:
        """Read back the losses of the last steps (one sync): NaN check, epoch sums; the block's mean."""
        if not pending:
            return None
        block = torch.stack(pending)  # (steps, losses)
        pending.clear()
        if self.dist is not None:  # the global batches' losses; a NaN on any rank stops every rank here
            self.dist.mean_(block)
        block = block.double().cpu()
        bad = ~torch.isfinite(block)
        if bool(bad.any()):
            i, j = (int(v) for v in torch.nonzero(bad)[0])
            raise TrainingDiverged(self.objective.loss_keys[j], float(block[i, j]), first_step + i, epoch,
                                   first_batch + i)
        s = self.state
        sums = block.sum(0).tolist()
        s.loss_sums = [a + b for a, b in zip(s.loss_sums, sums)]
        s.loss_count += block.shape[0]
        return block.mean(0).tolist()

    def train_step(self, batch: Mapping[str, Any]) -> Tensor:
        """One optimizer step on `batch` (the module in train mode): the losses, (n_losses,), left on the device."""
        out = forward(self.net, batch, self.device, self.precision)
        losses = self._losses_of(out, batch["labels"])
        if self.conflict_params is not None and (self.state.step + 1) % self.cfg.log_conflict == 0:
            self.state.conflict.append({"step": self.state.step + 1, "epoch": self.state.epoch + 1,
                                        **gradient_cosines(losses, self.conflict_params)})
        self.optimizer.zero_grad()
        self.last_weights = self.weighting.backward(losses)
        self.optimizer.step()
        return torch.stack([losses[k].detach() for k in self.objective.loss_keys])

    def run_epoch(self, epoch: int) -> None:
        from tqdm.auto import tqdm

        s, cfg = self.state, self.cfg
        n_batches = self.batches_per_epoch()
        skip = s.batch_in_epoch  # > 0 only when resuming mid-epoch (Note [Resume])
        if skip == 0:
            s.loss_sums, s.loss_count, s.epoch_seconds = [0.0] * len(self.objective.loss_keys), 0, 0.0
        batches = self.train_batches(epoch, skip)
        bar = tqdm(total=n_batches, initial=skip, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False,
                   file=sys.stderr, dynamic_ncols=True, disable=not self.progress or not sys.stderr.isatty())
        keys = self.objective.loss_keys
        pending: list[Tensor] = []
        first_step, first_batch = s.step + 1, s.batch_in_epoch + 1
        self.net.train()
        t0 = time.perf_counter()
        try:
            for batch in batches:
                pending.append(self.train_step(batch))
                s.step += 1
                s.batch_in_epoch += 1
                bar.update(1)
                if len(pending) >= LOG_EVERY:
                    mean = self._flush(pending, first_step, epoch, first_batch)
                    first_step, first_batch = s.step + 1, s.batch_in_epoch + 1
                    if mean is not None and not bar.disable:
                        bar.set_postfix({k: f"{v:.4f}" for k, v in zip(keys, mean)}, refresh=False)
                if s.batch_in_epoch < n_batches and self._save_due():
                    self._flush(pending, first_step, epoch, first_batch)  # never checkpoint a diverged step
                    first_step, first_batch = s.step + 1, s.batch_in_epoch + 1
                    s.epoch_seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.save(best=False)
            self._flush(pending, first_step, epoch, first_batch)
        finally:
            bar.close()
        s.epoch_seconds += time.perf_counter() - t0
        self.end_epoch(epoch, self.rows_per_epoch())

    def main_evaluate(self, split: str) -> dict[str, dict[str, float]]:
        """Metrics of `self.model` on a whole split: computed by the main process, the same dict on every rank."""
        val = None
        if self.is_main:
            val = evaluate_split(self.model, self.p.splits[split], self.objective, self.cfg.batch_size, self.device,
                                 self.precision)
        if self.dist is not None:  # the other ranks wait here while rank 0 evaluates
            val = self.dist.broadcast(val)
        assert val is not None
        return val

    def end_epoch(self, epoch: int, n_samples: int) -> None:
        s, cfg = self.state, self.cfg
        t_eval = time.perf_counter()
        val = self.main_evaluate("val")  # every rank sees rank 0's metrics: identical early-stopping decisions
        eval_seconds = time.perf_counter() - t_eval
        value = self.monitor.value(val)
        undefined = math.isnan(value)  # Note [Undefined monitor]
        if undefined:
            self.warn_undefined(val)
            improved = s.best_epoch is None or s.best_value is None or math.isnan(s.best_value)
        else:
            improved = self.monitor.better(value, s.best_value) or s.best_epoch is None
        row: dict[str, Any] = {"epoch": epoch}
        n = max(s.loss_count, 1)
        for k, total in zip(self.objective.loss_keys, s.loss_sums):
            row[f"train_loss_{k}"] = total / n
        for k, w in self.last_weights.items():
            row[f"weight_{k}"] = float(w)
        for key, m in val.items():
            for metric, v in m.items():
                if metric != "n":
                    row[f"val_{key}.{metric}"] = v
        row[f"val_{self.monitor.name}"] = value
        row.update(epoch_means(s.conflict, epoch))
        row["seconds"] = s.epoch_seconds + eval_seconds
        row["samples_per_second"] = n_samples / s.epoch_seconds if s.epoch_seconds > 0 else math.nan
        s.history.append(row)
        s.train_seconds += s.epoch_seconds
        s.samples += n_samples
        s.epoch, s.batch_in_epoch = epoch, 0
        s.loss_sums, s.loss_count, s.epoch_seconds = [0.0] * len(self.objective.loss_keys), 0, 0.0
        if improved:
            s.best_value, s.best_epoch, s.bad_epochs = value, epoch, 0
        elif not undefined:  # an undefined value is no evidence against the best epoch
            s.bad_epochs += 1
            if s.bad_epochs >= cfg.patience:
                s.stopped = True
        self.save(best=improved)
        if self.is_main:
            runs.write_history(self.run_dir / runs.HISTORY, s.history)
        if self.progress:
            losses = " ".join(f"{k} {row[f'train_loss_{k}']:.4f}" for k in self.objective.loss_keys)
            mark = " *" if improved else ""
            stop = f"  (no improvement for {s.bad_epochs} epochs: stopping)" if s.stopped else ""
            self.log(f"epoch {epoch}/{cfg.epochs}  loss {losses}  val {self.monitor.name} {value:.4f}{mark}  "
                     f"{row['seconds']:.1f}s  {row['samples_per_second']:,.0f} samples/s{stop}")




# --------------------------------------------------------------------------------------------
# A run: start or resume, train, finish


def _join_group(stack: contextlib.ExitStack, dev: torch.device) -> tuple[Any, torch.device]:
    """Join torchrun's process group when launched by it (distributed.process_group): (context or None, device)."""
    from . import distributed

    try:
        ctx = stack.enter_context(distributed.process_group(dev))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return ctx, (ctx.device if ctx is not None else dev)


@dataclass
class _Start:
    """What a run starts from: its config, data, folder, process group, and the checkpoint when resuming."""

    cfg: TrainConfig
    prepared: Prepared
    run_dir: Path
    dist: Any  # distributed.Context or None
    device: torch.device
    checkpoint: dict[str, Any] | None = None


def _resume(stack: contextlib.ExitStack, text: str, path: str, options: Mapping[str, Any]) -> _Start:
    """Continue the run in options["out"] from its last checkpoint (Note [Resume])."""
    if options["out"] is None:
        raise ConfigError("--resume needs --out RUN_DIR (the run folder to continue)")
    run_dir = Path(options["out"])
    last = run_dir / runs.LAST if (run_dir / runs.LAST).is_file() else run_dir / runs.CHECKPOINT
    if not last.is_file():
        raise ConfigError(f"--resume: {run_dir} has no {runs.LAST} or {runs.CHECKPOINT} to continue from")
    saved_spec = (run_dir / runs.SPEC).read_text(encoding="utf-8") if (run_dir / runs.SPEC).is_file() else None
    if saved_spec is not None and saved_spec != text:
        raise ConfigError(f"--resume: {path} differs from the spec the run in {run_dir} was trained with "
                          f"({run_dir / runs.SPEC})")
    ckpt = load_checkpoint(last)
    cfg = resume_config(ckpt["config"], options, run_dir)
    dist, dev = _join_group(stack, resolve_device(cfg.device))
    source = (run_dir / runs.MODEL_SOURCE).read_text(encoding="utf-8")
    prepared = prepare(text, path, data=cfg.data, data_dir=cfg.data_dir, rows=cfg.rows, hash_ids=cfg.hash_ids,
                       data_seed=cfg.data_seed, device=dev, source=source)
    if dist is None or dist.is_main:
        runs.clean_stale_tmp(run_dir)
    return _Start(cfg, prepared, run_dir, dist, dev, ckpt)


def _start(stack: contextlib.ExitStack, text: str, path: str, options: Mapping[str, Any],
           dev: torch.device) -> _Start:
    """A new run: the config from the options and the spec's `train {}`, a fresh run folder with spec and source."""
    dist, dev = _join_group(stack, dev)
    out = options["out"]
    spec_checked = check_spec(text, path, data=options["data"], data_dir=options["data_dir"])
    model_ir = spec_checked[0].model
    assert model_ir is not None
    data_source = spec_checked[1]
    cfg = make_config(model_ir.train, {**options, "data": data_source})
    make_monitor(cfg.monitor, Objective(model_ir), True)  # before loading any data; gauc is re-checked below
    if out is not None and ((Path(out) / runs.LAST).exists() or (Path(out) / runs.CHECKPOINT).exists()):
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it, or another --out")
    prepared = prepare(text, path, data=data_source, data_dir=cfg.data_dir, rows=cfg.rows, hash_ids=cfg.hash_ids,
                       data_seed=cfg.data_seed, device=dev, checked=spec_checked)
    _check_trainable(prepared, cfg)
    make_monitor(cfg.monitor, prepared.objective, prepared.dataset.train.has_groups)
    run_dir = Path()
    if dist is None or dist.is_main:  # only the main process writes (Note [Distributed training])
        if out is None:
            run_dir = runs.new_run_dir(model_ir.name, data_source, options["runs_root"])
        else:
            run_dir = Path(out)
            run_dir.mkdir(parents=True, exist_ok=True)
        runs.atomic_write_text(run_dir / runs.SPEC, text)
        runs.atomic_write_text(run_dir / runs.MODEL_SOURCE, prepared.source)
        runs.atomic_write_text(run_dir / runs.SCHEMA, schema_to_json(prepared.dataset.schema, with_vocab=True))
    if dist is not None:  # one run folder: the name rank 0 chose (its time stamp)
        run_dir = Path(dist.broadcast(str(run_dir) if dist.is_main else None))
    return _Start(cfg, prepared, run_dir, dist, dev)


def _check_trainable(prepared: Prepared, cfg: TrainConfig) -> None:
    """Data a run cannot train on: fewer than two train rows; one-row batches for a model with BatchNorm."""
    n = len(prepared.splits["train"])
    if n < MIN_TRAIN_ROWS:
        raise DataError(f"{prepared.dataset.source}: {n} train row(s) (after any val hold-out): too few to train on")
    model = prepared.checked.model
    mlps = [getattr(x, "mlp", None) for x in (*model.experts, *model.gates, *model.towers)]
    if cfg.batch_size == 1 and (model.transfers or any(m is not None and m.batch_norm for m in mlps)):
        raise ConfigError("--batch-size 1: the model uses batch_norm, which needs at least 2 rows per training batch "
                          "(Note [Remainder batch])")


def _linked(model: Any) -> list[tuple[str, str]]:
    """(label, condition) column pairs the spec links: a label and its `where` columns; a product's later factor
    and each earlier one (`click * purchase`: purchase needs a click)."""
    pairs: list[tuple[str, str]] = []
    for node in (*model.tasks, *model.outputs, *model.losses):
        label = tuple(node.label or ())
        pairs += [(label[j], label[i]) for j in range(len(label)) for i in range(j)]
        pairs += [(c, w) for c in label for w in (node.where or ()) if c != w]
    return list(dict.fromkeys(pairs))


def data_report(prepared: Prepared) -> tuple[list[str], dict[str, Any]]:
    """The data's warnings (printed even without progress output) and what metrics.json records about the data:
    split sizes, the val hold-out, rows whose labels contradict the spec's links, the warnings."""
    ds = prepared.dataset
    warnings = list(ds.warnings)
    unlinked = unlinked_rows(ds, _linked(prepared.checked.model))
    for (label, cond), counts in unlinked.items():
        where = ", ".join(f"{k} in {name}" for name, k in counts.items())
        warnings.append(f"{ds.source}: rows with {label} = 1 and {cond} = 0 ({where}), which the spec's labels rule "
                        f"out ({label} needs {cond}); kept as they are (`mtldsl data prepare` drops such rows)")
    record = {
        "source": ds.source,
        "rows": {name: len(ds.split(name)) for name in ("train", "val", "test")},
        "val_held_out": {"rows": len(ds.val), "of_train_rows": len(ds.val) + len(ds.train)} if ds.val_from_train
        else None,
        "unlinked_rows": [{"label": label, "condition": cond, "rows": counts}
                          for (label, cond), counts in unlinked.items()],
        "warnings": warnings,
    }
    return warnings, record


def _announce(trainer: Trainer, start: _Start) -> None:
    """The progress lines before the first step: where a resumed run continues, or what a new run chose."""
    if not trainer.progress:
        return
    if start.checkpoint is not None:
        s = trainer.state
        where = f"epoch {s.epoch + 1}, batch {s.batch_in_epoch + 1}" if s.epoch < start.cfg.epochs else \
            "the end of training"
        trainer.log(f"resuming {start.run_dir} at step {s.step} ({where})")
        return
    prepared = start.prepared
    for note in prepared.dataset.notes:
        trainer.log(note)
    if prepared.splits["train"].stream_to is not None:
        nbytes = sum(split.nbytes for split in prepared.splits.values())
        trainer.log(f"data: {nbytes / 2**30:.1f} GiB stay in host memory, batches stream to {trainer.device} "
                    "through pinned buffers (Note [Streamed batches])")
    if trainer.sparse:
        trainer.log(f"embedding tables: sparse gradients, {type(trainer.optimizer.sparse).__name__} "
                    "(Note [Sparse embedding updates])")
    if trainer.precision == "bf16":
        trainer.log(f"precision: bf16 autocast on {trainer.device.type}, float32 weights and losses "
                    "(Note [Mixed precision]; --precision fp32 turns it off)")


def run(stack: contextlib.ExitStack, spec: str | Path | Checked, options: Mapping[str, Any]) -> RunResult:
    """Train `spec` with train()'s options (config.bind_options): a new run, or the one in `out` when `resume`.

    `stack` holds the torchrun process group (left when the caller's `with` ends, on error too)."""
    text, path = spec_input(spec)
    dev = resolve_device(options["device"])  # fails early on a bad --device; a resumed run re-resolves its config's
    start = _resume(stack, text, path, options) if options["resume"] else _start(stack, text, path, options, dev)
    trainer = Trainer(start.prepared, start.cfg, start.run_dir, start.device, progress=options["progress"],
                      dist=start.dist)
    if start.checkpoint is not None:
        trainer.restore(start.checkpoint)
        if trainer.state.stopped and trainer.state.bad_epochs < start.cfg.patience:
            trainer.state.stopped = False  # a larger --patience lets a stopped run go on
    _announce(trainer, start)
    warnings, data = data_report(start.prepared)
    if trainer.is_main:
        for w in warnings:
            trainer.log(f"warning: {w}")
    trainer.fit()
    return _finish(trainer, start.prepared, start.cfg, start.run_dir, data)


def _finish(trainer: Trainer, prepared: Prepared, cfg: TrainConfig, run_dir: Path,
            data: dict[str, Any]) -> RunResult:
    """Load the best checkpoint, evaluate it on test, write metrics.json, history.csv and curve.png."""
    s = trainer.state
    if trainer.is_main:  # under DDP the other ranks keep their final weights (the run folder may be rank 0's only)
        best = load_checkpoint(run_dir / runs.CHECKPOINT, mmap=True)
        trainer.model.load_state_dict(best["model"])
        del best
    test = trainer.main_evaluate("test")
    best_row = next((r for r in s.history if r["epoch"] == s.best_epoch), {})
    model_ir = prepared.checked.model
    assert model_ir is not None
    metrics = {
        "model": model_ir.name,
        "dataset": cfg.data,
        "data": data,
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "tasks": test,
        "train": {
            "epochs": s.epoch,
            "seconds": round(s.train_seconds, 3),
            "samples_per_second": round(s.samples / s.train_seconds, 1) if s.train_seconds > 0 else None,
            "steps": s.step,
            "stopped_early": s.stopped,
            "processes": trainer.world_size,  # data-parallel processes (torchrun); samples/s is over all of them
            "sparse_embeddings": trainer.sparse,  # what --sparse-embeddings (config) resolved to
            "precision": trainer.precision,  # what --precision (config) resolved to on this device
        },
        "best_epoch": s.best_epoch,
        "monitor": cfg.monitor,
        "best_value": s.best_value,
        "val": {k[len("val_"):]: v for k, v in best_row.items() if k.startswith("val_")},
        "config": cfg.to_json(),
        "mtldsl": __version__,
        "device": str(trainer.device),
    }
    if trainer.is_main:
        runs.atomic_write_json(run_dir / runs.METRICS, metrics)
        runs.write_history(run_dir / runs.HISTORY, s.history)
        runs.write_curve(run_dir / runs.CURVE, s.history, trainer.objective.loss_keys, trainer.monitor.name,
                         best_epoch=s.best_epoch, log=trainer.log if trainer.progress else None)
        if s.conflict:
            write_conflict(run_dir, s.conflict)
    table = format_table(test)
    if trainer.is_main:
        print(table, flush=True)
    trainer.model.eval()
    return RunResult(run_dir, metrics, list(s.history), table, trainer.model, s.best_epoch, trainer.is_main)

