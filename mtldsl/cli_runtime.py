"""`mtldsl train`, `evaluate` and `predict`: thin commands over mtldsl.runtime.trainer.

Registered on `mtldsl.cli.app` by the import at the bottom of cli.py. torch is imported inside the
commands only, so `mtldsl check`/`compile` stay torch-free. Every expected failure is one clean
message on stderr and exit 1: spec diagnostics as `check` prints them, bad or absent data as the data
layer words it (file, column, row), bad settings and divergence as one `error:` line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, TypeVar

import typer

from .cli import app

T = TypeVar("T")


@contextmanager
def _errors() -> Iterator[None]:
    """Turn the runtime's expected exceptions into messages and exit code 1 (no traceback)."""
    from .catalog import DataError, DatasetNotFound
    from .diagnostics import SpecError, render_all
    from .runtime.trainer import ConfigError, TrainingDiverged

    try:
        yield
    except SpecError as e:
        typer.echo(render_all(e.diagnostics), err=True)
        raise typer.Exit(1) from None
    except (DataError, DatasetNotFound, ConfigError, TrainingDiverged) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: the run folder keeps its last complete checkpoint (continue with --resume)", err=True)
        raise typer.Exit(130) from None


def _run(fn: Callable[[], T]) -> T:
    with _errors():
        return fn()


@app.command("train")
def train_cmd(
    spec: Path = typer.Argument(..., help="Spec file."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset name or folder (default: the spec's `data`)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Where named datasets live."),
    rows: Optional[int] = typer.Option(None, "--rows", help="Synthetic: total rows; folders: a cap per file."),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size",
                                             help="Rows per step; under torchrun per process (global batch N x B)."),
    lr: Optional[float] = typer.Option(None, "--lr"),
    weighting: Optional[str] = typer.Option(None, "--weighting", help="fixed, uwl, gradnorm, metabalance, pcgrad."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adam, adamw, sgd, adagrad."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:N."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/<model>-<data>-<time>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    monitor: Optional[str] = typer.Option(None, "--monitor", help="Early stopping metric: <output>.<metric> or mean.<metric>."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Epochs without improvement before stopping."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every",
                                                   help="Steps between mid-epoch last.pt saves (0: epoch ends only)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar and no per-epoch lines."),
    sparse_embeddings: Optional[str] = typer.Option(
        None, "--sparse-embeddings",
        help="auto (default: on for a table of 4 MiB or more), on or off: sparse gradients and a row-wise "
             "optimizer (SparseAdam for adam) for the embedding tables."),
    precision: Optional[str] = typer.Option(
        None, "--precision",
        help="auto (default: bf16 autocast where the device multiplies bf16 natively -- CUDA, or a CPU with "
             "AVX512-BF16 or AMX and a model of 32k+ multiply-adds per sample -- else fp32), fp32 or bf16. "
             "Weights, optimizer state, losses and logits stay float32."),
) -> None:
    """Train a spec: prints the per-task test table and the run folder."""
    if not spec.is_file():
        typer.echo(f"{spec}: error: no such spec file", err=True)
        raise typer.Exit(1)

    def go():  # type: ignore[no-untyped-def]
        from .runtime.trainer import CHECKPOINT_EVERY, train

        return train(spec, data=data, data_dir=data_dir, rows=rows, epochs=epochs, batch_size=batch_size, lr=lr,
                     weighting=weighting, optimizer=optimizer, device=device, seed=seed, out=out, resume=resume,
                     monitor=monitor, patience=patience, progress=not no_progress,
                     checkpoint_every=CHECKPOINT_EVERY if checkpoint_every is None else checkpoint_every,
                     sparse_embeddings=sparse_embeddings, precision=precision)

    result = _run(go)
    if result.is_main:  # under torchrun only rank 0 reports (it also printed the table)
        typer.echo(f"run folder: {result.run_dir}")


@app.command("evaluate")
def evaluate_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder written by `mtldsl train`."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset name or folder (default: the run's)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir"),
    rows: Optional[int] = typer.Option(None, "--rows"),
    split: str = typer.Option("test", "--split", help="train, val or test."),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Per-task metrics of a run's best checkpoint."""

    def go():  # type: ignore[no-untyped-def]
        from .runtime.trainer import evaluate

        return evaluate(run_dir, data, data_dir=data_dir, rows=rows, split=split, device=device)

    result = _run(go)
    typer.echo(result.table)


@app.command("predict")
def predict_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder written by `mtldsl train`."),
    out_file: Path = typer.Option(..., "-o", "--out", help="Predictions file: .parquet or .csv."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset name or folder (default: the run's)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir"),
    rows: Optional[int] = typer.Option(None, "--rows"),
    split: str = typer.Option("test", "--split", help="train, val or test."),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Per-sample predictions of a run's best checkpoint: one column per output, plus the labels."""

    def go():  # type: ignore[no-untyped-def]
        from .runtime.trainer import predict

        return predict(run_dir, out_file, data, data_dir=data_dir, rows=rows, split=split, device=device)

    path = _run(go)
    typer.echo(f"{path}: written")
