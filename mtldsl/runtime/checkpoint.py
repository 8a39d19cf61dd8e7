"""Checkpoint I/O and the one run-folder loader: a run folder -> its config, checkpoint and trained module.

Takes a run folder (runs.py names its files); gives `save_checkpoint`/`load_checkpoint` (the atomic write
and the checked read of a training state: Note [Resume] in loop.py says what it holds), the RNG state
helpers, `load_model` (the trained module and its vocabulary sizes, no dataset needed: what export.py
exports) and `load_run` (the same module bound to a dataset: what evaluate and predict read). Both read
the folder through `read_run`, so every reader checks the checkpoint's format the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import runs
from .binding import Prepared, prepare
from .config import ConfigError, TrainConfig
from .precision import dense_macs, resolve_device, resolve_precision

__all__ = ["FORMAT", "LoadedRun", "SavedRun", "load_checkpoint", "load_model", "load_run", "read_run",
           "rng_state", "save_checkpoint", "set_rng_state"]

FORMAT = 1  # checkpoint layout version


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """torch.save straight into the atomic temporary file: no in-memory copy of a large table's state."""
    with runs.atomic_write(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint at `path`; mmap=True maps its tensors from the file, so the ones never read (the
    optimizer state when only the model is wanted) cost no memory."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a file from elsewhere, or damaged by hand: one clear line
        raise ConfigError(f"{path}: not a readable mtldsl checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{path}: not an mtldsl checkpoint (format {FORMAT})")
    return state


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Reading a run folder


@dataclass
class SavedRun:
    """A finished run folder's files, read and checked; no dataset, no module built yet."""

    run_dir: Path
    checkpoint: dict[str, Any]  # the best epoch's state (checkpoint.pt), tensors memory-mapped
    vocab: dict[str, int]  # the vocabulary sizes the model was built with
    source: str  # model.py

    @property
    def config(self) -> TrainConfig:
        return TrainConfig(**self.checkpoint["config"])

    def build(self, cls: type) -> nn.Module:
        """The generated class `cls` (from `source`) with the checkpoint's weights: on the CPU, in eval mode."""
        model = cls(self.vocab, sparse_grad=False)
        try:
            model.load_state_dict(self.checkpoint["model"])
        except (KeyError, RuntimeError) as e:
            raise ConfigError(f"{self.run_dir}: checkpoint does not fit model.py ({type(e).__name__}: {e})") from None
        return model.eval()


def read_run(run_dir: str | Path, *, need_spec: bool = True) -> SavedRun:
    """The run folder's model.py and best checkpoint (load_checkpoint: the format is checked), and spec.mtl
    present when `need_spec`."""
    run_dir = Path(run_dir)
    for name in ((runs.SPEC,) if need_spec else ()) + (runs.MODEL_SOURCE, runs.CHECKPOINT):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir}: not a finished run folder (no {name})")
    ckpt = load_checkpoint(run_dir / runs.CHECKPOINT, mmap=True)
    if not isinstance(ckpt.get("model"), Mapping):
        raise ConfigError(f"{run_dir / runs.CHECKPOINT}: no model state (expected a dict with 'model')")
    vocab = ckpt.get("vocab_sizes")
    if not isinstance(vocab, Mapping):
        raise ConfigError(f"{run_dir / runs.CHECKPOINT}: no 'vocab_sizes': cannot rebuild the model's embedding "
                          "tables")
    source = (run_dir / runs.MODEL_SOURCE).read_text(encoding="utf-8")
    return SavedRun(run_dir, ckpt, {str(k): int(v) for k, v in vocab.items()}, source)


def load_model(run_dir: str | Path) -> tuple[nn.Module, dict[str, int]]:
    """The trained module of a run folder (model.py + checkpoint.pt), on the CPU in eval mode, and its vocabulary
    sizes; no dataset and no spec.mtl needed (export.py)."""
    from .. import load_module

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run folder")
    saved = read_run(run_dir, need_spec=False)
    try:
        module = load_module(saved.source, "mtldsl_export")
    except Exception as e:  # a hand-edited model.py
        raise ConfigError(f"{run_dir / runs.MODEL_SOURCE}: cannot load the generated source "
                          f"({type(e).__name__}: {e})") from e
    classes = [v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, nn.Module) and hasattr(v, "OUTPUTS") and hasattr(v, "SPARSE_FIELDS")]
    if len(classes) != 1:
        raise ConfigError(f"{run_dir / runs.MODEL_SOURCE}: expected one generated model class, found {len(classes)}")
    return saved.build(classes[0]), saved.vocab


@dataclass
class LoadedRun:
    """A run folder brought back: config, spec checked against `dataset`, generated module, best weights."""

    run_dir: Path
    config: TrainConfig
    prepared: Prepared
    model: nn.Module  # best checkpoint, eval mode, on `device`
    device: torch.device
    checkpoint: dict[str, Any]
    precision: str  # the run's precision setting resolved on `device` (Note [Mixed precision])


def load_run(run_dir: str | Path, *, data: str | None = None, data_dir: str | None = None, rows: int | None = None,
             device: str = "auto") -> LoadedRun:
    """Reload a run folder (spec.mtl, model.py, checkpoint.pt) with a dataset (default: the one it trained on)."""
    saved = read_run(run_dir)
    cfg = saved.config
    dev = resolve_device(device)
    if data is None:
        data, data_dir, rows = cfg.data, cfg.data_dir if data_dir is None else data_dir, cfg.rows if rows is None else rows
    spec = saved.run_dir / runs.SPEC
    prepared = prepare(spec.read_text(encoding="utf-8"), str(spec), data=data, data_dir=data_dir, rows=rows,
                       data_seed=cfg.data_seed, device=dev, source=saved.source, hash_ids=cfg.hash_ids)
    model = saved.build(prepared.cls).to(dev)
    return LoadedRun(saved.run_dir, cfg, prepared, model, dev, saved.checkpoint,
                     resolve_precision(cfg.precision, dev, dense_macs(model)))

