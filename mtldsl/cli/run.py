"""`mtldsl train`, `evaluate` and `predict`: thin commands over mtldsl.runtime.trainer.

Registered on the app of app.py. `train`'s flags are built from runtime/config.py's OPTIONS (the same
declaration as train()'s keywords; config.py imports no torch). torch is imported inside the commands
only, so `mtldsl check`/`compile` stay torch-free. Every expected failure is one clean message on stderr
and exit 1: spec diagnostics as `check` prints them, bad or absent data as the data layer words it (file,
column, row), bad settings and divergence as one `error:` line.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

from ..runtime.config import OPTIONS
from .app import app

T = TypeVar("T")


@contextmanager
def _errors() -> Iterator[None]:
    """Turn the runtime's expected exceptions into messages and exit code 1 (no traceback)."""
    from ..catalog import DataError, DatasetNotFound
    from ..diagnostics import SpecError, render_all
    from ..runtime.trainer import ConfigError, TrainingDiverged

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


def train_cmd(spec: Path, **flags: Any) -> None:
    """Train a spec: prints the per-task test table and the run folder."""
    from ..sources import SpecNotFound, locate

    try:
        locate(spec)  # a file, or a packaged spec by bare name (`mtldsl train stem`)
    except SpecNotFound as e:
        typer.echo(e.render(), err=True)
        raise typer.Exit(1) from None
    flagged = [o for o in OPTIONS if o.cli]
    assert set(flags) == {o.cli_name for o in flagged}  # Typer passes exactly the flags of _train_flags()
    options = {o.name: (not flags[o.cli_name]) if o.negate else flags[o.cli_name] for o in flagged}

    def go():  # type: ignore[no-untyped-def]
        from ..runtime.trainer import train

        return train(spec, **options)

    result = _run(go)
    if result.is_main:  # under torchrun only rank 0 reports (it also printed the table)
        typer.echo(f"run folder: {result.run_dir}")


def _train_flags() -> inspect.Signature:
    """train_cmd's parameters as Typer reads them: the spec, then one flag per config.OPTIONS entry with a CLI
    flag, in declaration order (`--no-<name>` for a negated bool)."""
    params = [inspect.Parameter("spec", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                                default=typer.Argument(..., help="Spec file."))]
    for o in OPTIONS:
        if not o.cli:
            continue
        default = (not o.default) if o.negate else o.default
        annotation = bool if o.negate else o.annotation
        option = typer.Option(default, o.flag, help=o.help, show_default=o.show_default)
        params.append(inspect.Parameter(o.cli_name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=annotation))
    return inspect.Signature(params)


train_cmd.__signature__ = _train_flags()  # type: ignore[attr-defined]
app.command("train")(train_cmd)


# The options evaluate and predict share: a run folder, and the data and device to read it with.
RunDir = Annotated[Path, typer.Argument(help="A run folder written by `mtldsl train`.")]
RunData = Annotated[Optional[str], typer.Option("--data", help="Dataset name or folder (default: the run's).")]
DataDir = Annotated[Optional[str], typer.Option("--data-dir")]
Rows = Annotated[Optional[int], typer.Option("--rows")]
Split = Annotated[str, typer.Option("--split", help="train, val or test.")]
Device = Annotated[str, typer.Option("--device")]


@app.command("evaluate")
def evaluate_cmd(run_dir: RunDir, data: RunData = None, data_dir: DataDir = None, rows: Rows = None,
                 split: Split = "test", device: Device = "auto") -> None:
    """Per-task metrics of a run's best checkpoint."""

    def go():  # type: ignore[no-untyped-def]
        from ..runtime.trainer import evaluate

        return evaluate(run_dir, data, data_dir=data_dir, rows=rows, split=split, device=device)

    result = _run(go)
    typer.echo(result.table)


@app.command("predict")
def predict_cmd(
    run_dir: RunDir,
    out_file: Annotated[Path, typer.Option("-o", "--out", help="Predictions file: .parquet or .csv.")],
    data: RunData = None, data_dir: DataDir = None, rows: Rows = None, split: Split = "test", device: Device = "auto",
) -> None:
    """Per-sample predictions of a run's best checkpoint: one column per output, plus the labels."""

    def go():  # type: ignore[no-untyped-def]
        from ..runtime.trainer import predict

        return predict(run_dir, out_file, data, data_dir=data_dir, rows=rows, split=split, device=device)

    path = _run(go)
    typer.echo(f"{path}: written")
