"""The thin public API of the runtime: train a spec, evaluate or predict with a run folder.

`train(spec, **options)` checks the spec against the real dataset's schema (missing fields are positioned
SpecErrors), compiles and instantiates the generated module and trains it (loop.py); its options are
config.py's OPTIONS, the same as `mtldsl train`'s flags. `evaluate(run_dir)` and `predict(run_dir)` reload
a run folder (spec.mtl, model.py, checkpoint.pt; runs.py describes the folder) with `load_run`; it reads
the folder through checkpoint.read_run, as checkpoint.load_model does for the exporter (export.py).

The names below are re-exported from the modules that define them, so `mtldsl.runtime.trainer` stays the
one import for callers: config (TrainConfig, ConfigError), precision (device and autocast choice),
objective (loss/metric terms, monitor, table), optim (optimizers, shared parameters), binding (data),
checkpoint (run folders), loop (the Trainer).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..pipeline import Checked
from .binding import DEVICE_DATA_SHARE, Prepared, check_vocab, data_fits, prepare
from .checkpoint import LoadedRun, load_run
from .config import CHECKPOINT_EVERY, ConfigError, TrainConfig, bind_options, signature
from .host import keep_freed_memory
from .loop import RunResult, Trainer, TrainingDiverged, run
from .objective import EVAL_BATCH, Objective, evaluate_split, format_table
from .optim import SPARSE_AUTO_BYTES, shared_parameters
from .precision import BF16_AUTO_MACS, dense_macs, forward, native_bf16, resolve_device, resolve_precision

__all__ = [
    "BF16_AUTO_MACS",
    "CHECKPOINT_EVERY",
    "DEVICE_DATA_SHARE",
    "SPARSE_AUTO_BYTES",
    "ConfigError",
    "EvalResult",
    "LoadedRun",
    "Objective",
    "Prepared",
    "RunResult",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "data_fits",
    "dense_macs",
    "evaluate",
    "format_table",
    "load_run",
    "native_bf16",
    "predict",
    "prepare",
    "resolve_device",
    "resolve_precision",
    "shared_parameters",
    "train",
]

SPLITS = ("train", "val", "test")


def train(spec: str | Path | Checked, **options: Any) -> RunResult:
    """Train a spec; every option left None takes the spec's `train {}` value (data: its `data` line).

    The options and their defaults are config.OPTIONS (see the signature, or `mtldsl train --help`); an unknown
    name is a TypeError. Writes the run folder (runs.py) at `out` or `runs_root/<model>-<data>-<time>`, prints
    the test table to stdout and returns it with the metrics. metrics.json's `train.seconds` counts training
    steps only (no evaluation); `samples_per_second` is training samples over those seconds. Raises SpecError
    (diagnostics), DataError / DatasetNotFound (bad or absent data), ConfigError (bad setting) or
    TrainingDiverged. `resume=True` continues the run in `out` (Note [Resume]). `sparse_embeddings` is auto
    (default), on or off (Note [Sparse embedding updates]); `precision` is auto (default), fp32 or bf16
    (Note [Mixed precision]).
    """
    given = bind_options("train", options)
    keep_freed_memory()  # Note [Page faults]
    with contextlib.ExitStack() as stack:  # leaves the torchrun process group at the end, on error too
        return run(stack, spec, given)


train.__signature__ = signature(  # type: ignore[attr-defined]
    leading=[inspect.Parameter("spec", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="str | Path | Checked")])


@dataclass
class EvalResult:
    metrics: dict[str, dict[str, float]]
    table: str
    dataset: str
    split: str


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}' (train, val, test)")


def evaluate(run_dir: str | Path, data: str | None = None, *, data_dir: str | None = None, rows: int | None = None,
             split: str = "test", device: str = "auto", batch_size: int | None = None) -> EvalResult:
    """Per-task metrics of a run's best checkpoint on a split of its dataset (or of `data`)."""
    _check_split(split)
    keep_freed_memory()  # Note [Page faults]
    loaded = load_run(run_dir, data=data, data_dir=data_dir, rows=rows, device=device)
    check_vocab(loaded.prepared.cls, loaded.prepared.dataset, split, loaded.checkpoint["vocab_sizes"])
    metrics = evaluate_split(loaded.model, loaded.prepared.splits[split], loaded.prepared.objective,
                             batch_size or loaded.config.batch_size, loaded.device, loaded.precision)
    return EvalResult(metrics, format_table(metrics, split), loaded.prepared.dataset.source, split)


def predict(run_dir: str | Path, out_file: str | Path, data: str | None = None, *, data_dir: str | None = None,
            rows: int | None = None, split: str = "test", device: str = "auto",
            batch_size: int | None = None) -> Path:
    """Write per-sample predictions of a split (.parquet or .csv by suffix): row, one column per output,
    then the label columns (`label_<column>`) and the group id when the dataset has one.

    Written as it is computed (a Parquet row group / a block of CSV lines per PREDICT_ROWS rows) into a
    temporary file beside `out_file`, which replaces it at the end: memory does not grow with the split.
    """
    out_file = Path(out_file)
    suffix = out_file.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise ConfigError(f"{out_file}: unknown prediction format '{out_file.suffix}' (use .parquet or .csv)")
    _check_split(split)
    keep_freed_memory()  # Note [Page faults]
    loaded = load_run(run_dir, data=data, data_dir=data_dir, rows=rows, device=device)
    check_vocab(loaded.prepared.cls, loaded.prepared.dataset, split, loaded.checkpoint["vocab_sizes"])
    cut = loaded.prepared.splits[split]
    raw = loaded.prepared.dataset.split(split)
    schema = loaded.prepared.dataset.schema
    raw_labels = replace(raw, sparse_cols={}, dense_cols={}, list_cols={}, products=None, truth_cols=None)
    size = min(batch_size or loaded.config.batch_size, EVAL_BATCH)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_file.name}.", dir=out_file.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _PredictionWriter(tmp, suffix) as writer, torch.inference_mode():
            start = 0
            for batch, truth in zip(cut.batches(size, shuffle=False), raw_labels.batches(size, shuffle=False),
                                    strict=True):
                out = forward(loaded.model, batch, loaded.device, loaded.precision)
                n = len(truth["labels"][next(iter(truth["labels"]))]) if truth["labels"] else len(batch["sparse"])
                columns: dict[str, Any] = {"row": np.arange(start, start + n)}
                for name in loaded.prepared.cls.OUTPUTS:
                    columns[name] = out[name].float().cpu().numpy().reshape(-1)
                for col, values in truth["labels"].items():
                    columns[f"label_{col}"] = values.numpy()
                if truth["groups"] is not None:
                    columns[schema.user_id or "group"] = truth["groups"].numpy()
                writer.write(columns)
                start += n
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    return out_file


PREDICT_ROWS = 1 << 20  # rows per Parquet row group / CSV block that predict writes


class _PredictionWriter:
    """Appends column batches to a .parquet (one row group per PREDICT_ROWS rows) or .csv file."""

    def __init__(self, path: Path, suffix: str) -> None:
        self.path, self.suffix = path, suffix
        self.pending: list[dict[str, Any]] = []
        self.rows = 0
        self.parquet: Any = None
        self.csv_header = True

    def __enter__(self) -> _PredictionWriter:
        return self

    def write(self, columns: dict[str, Any]) -> None:
        self.pending.append(columns)
        self.rows += len(columns["row"])
        if self.rows >= PREDICT_ROWS:
            self.flush()

    def flush(self) -> None:
        import pandas as pd

        if not self.pending:
            return
        keys = list(self.pending[0]) if self.pending else []
        frame = pd.DataFrame({k: np.concatenate([p[k] for p in self.pending]) for k in keys})
        self.pending, self.rows = [], 0
        if self.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self.parquet is None:
                self.parquet = pq.ParquetWriter(self.path, table.schema)
            self.parquet.write_table(table)
        else:
            frame.to_csv(self.path, mode="w" if self.csv_header else "a", header=self.csv_header, index=False)
            self.csv_header = False

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.flush()
        if self.parquet is not None:
            self.parquet.close()
