"""`mtldsl export` and `mtldsl data prepare`: thin commands over runtime/export.py and runtime/prepare.py.

Registered on the app of app.py. torch, pyarrow and the exporters
are imported inside the commands only, so `mtldsl check`/`compile` stay fast. Expected failures print
one `error:` line on stderr and exit 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app

data_app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                       help="Dataset tools: convert raw public datasets into the folder layout `train --data` reads.")
app.add_typer(data_app, name="data")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder written by `mtldsl train`."),
    fmt: str = typer.Option(..., "--format", "-f", help="onnx or torchscript."),
    out: Optional[Path] = typer.Option(None, "-o", "--out",
                                       help="Output file (default RUN_DIR/model.onnx or RUN_DIR/model.torchscript.pt)."),
    exporter: str = typer.Option("auto", "--onnx-exporter",
                                 help="ONNX only: auto (TorchScript-based, then torch.export-based), torchscript, dynamo."),
    tolerance: float = typer.Option(1e-5, "--tolerance", help="Largest accepted |exported - PyTorch| per output."),
) -> None:
    """Export a trained run to ONNX or TorchScript; the file is written only if its outputs match PyTorch's."""
    fmt = fmt.strip().lower()
    if fmt not in ("onnx", "torchscript"):
        _fail(f"unknown export format '{fmt}'\n  hint: use --format onnx or --format torchscript")
    from ..runtime.export import ExportError, export_run

    try:
        result = export_run(run_dir, fmt, out, exporter=exporter, tolerance=tolerance)
    except ExportError as e:
        _fail(str(e))
        return
    sizes = ", ".join(map(str, result.batch_sizes))
    per = ", ".join(f"{k} {v:.2e}" for k, v in result.per_output.items())
    typer.echo(f"{result.path}: written ({result.format}, {result.exporter})")
    typer.echo(f"outputs match PyTorch on batches of {sizes}: max |diff| {result.max_abs_diff:.2e} "
               f"(tolerance {result.tolerance:g}; {per})")


@data_app.command("prepare")
def prepare_cmd(
    name: str = typer.Argument(..., help="Dataset name: ali_ccp."),
    raw: Path = typer.Option(..., "--raw", help="Folder with the raw files (sample_skeleton_*.csv, common_features_*.csv)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: $MTLDSL_DATA/<name> or ~/.mtldsl/data/<name>)."),
    min_count: int = typer.Option(10, "--min-count", help="Raw ids seen fewer times in train map to id 0."),
    val_share: float = typer.Option(0.1, "--val-share", help="Share of the train file held out as val (by sample id)."),
    row_group_size: int = typer.Option(100_000, "--row-group-size", help="Rows per Parquet row group."),
    block_size: int = typer.Option(8 << 20, "--block-size",
                                   help="Bytes of raw text parsed at once, per worker (with the common-features "
                                        "tables of the two splits, what bounds memory)."),
    workers: int = typer.Option(2, "--workers", help="Threads parsing blocks, shared by the train and test splits "
                                "(1: one thread in all; output is the same for any number)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
    last_entry: bool = typer.Option(False, "--last-entry",
                                    help="Keep only the last id of each behaviour list (109_14, 110_14, 127_14, "
                                         "150_14) as a single-valued field, as torch-rechub does; default: whole "
                                         "lists with their values as weights."),
) -> None:
    """Convert raw dataset files into train/val/test Parquet + schema.json, vectorised, in bounded memory."""
    from ..catalog import DataError, DatasetNotFound
    from ..runtime.prepare import prepare

    def note(message: str) -> None:
        typer.echo(message, err=True)

    try:
        report = prepare(name, raw, out, min_count=min_count, val_share=val_share, row_group_size=row_group_size,
                         block_size=block_size, workers=workers, progress=not no_progress, log=note,
                         last_entry=last_entry)
    except (DataError, DatasetNotFound, ValueError) as e:
        _fail(str(e))
        return
    rows = ", ".join(f"{k} {v}" for k, v in report.rows.items())
    typer.echo(f"{report.out}: written ({rows} rows)")
    typer.echo(f"vocabulary sizes (min count {report.min_count}): "
               + ", ".join(f"{k} {v}" for k, v in report.vocab_sizes.items()))
    typer.echo(f"train with: mtldsl train SPEC --data {report.out}")
