"""`mtldsl diff`, `compare` and `analyze`: thin commands over mtldsl/workbench/.

Registered on the app of app.py. `diff` is torch-free; `compare` and `analyze` import the runtime inside
the command. Like diff(1), `diff` exits 0 when the graphs are equal, 1 when they differ and 2 when a spec
cannot be read or is invalid; the other commands exit 1 on an expected failure, with one `error:` line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn, Optional

import typer

from .app import app
from .run import _run


def _checked_or_exit(spec: Path, code: int):  # type: ignore[no-untyped-def]
    from ..diagnostics import render_all
    from ..pipeline import check_file

    if not spec.is_file():
        typer.echo(f"{spec}: error: no such spec file", err=True)
        raise typer.Exit(code)
    checked = check_file(spec)
    if not checked.ok:
        typer.echo(render_all(checked.diagnostics), err=True)
        raise typer.Exit(code)
    return checked


@app.command("diff")
def diff_cmd(
    a: Path = typer.Argument(..., help="The first spec."),
    b: Path = typer.Argument(..., help="The second spec."),
) -> None:
    """Structural differences between two specs' graphs: exit 0 equal, 1 different, 2 on a bad spec."""
    from ..workbench.diff import diff_checked, format_changes

    ca, cb = _checked_or_exit(a, 2), _checked_or_exit(b, 2)
    changes = diff_checked(ca, cb)
    typer.echo(format_changes(ca, cb, changes))
    raise typer.Exit(1 if changes else 0)


def _fail(error: Exception) -> NoReturn:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(1) from None


def _show(report: str, written: Sequence[Path]) -> None:
    typer.echo(report)
    typer.echo("written: " + ", ".join(map(str, written)))


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        typer.echo(f"error: --seeds {text!r}: expected distinct integers separated by commas, e.g. 0,1,2", err=True)
        raise typer.Exit(1)
    return seeds


@app.command("compare")
def compare_cmd(
    specs: list[Path] = typer.Argument(..., help="Spec files to compare (the first is the default baseline)."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset name or folder (default: each spec's `data`)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Where named datasets live."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Training seeds, comma-separated."),
    rows: Optional[int] = typer.Option(None, "--rows", help="Synthetic: total rows; folders: a cap per file."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (default: each spec's)."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="The spec (path or label) others are paired with."),
    sets: list[str] = typer.Option([], "--set", help="NAME.PROP=V1,V2: variants over a declaration's property "
                                   "(repeat for a grid), e.g. experts_shared.count=1,2 or g.experts[other]=forward,off."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    out: Path = typer.Option(Path("runs/compare"), "--out", help="Folder of the runs and the comparison files."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
) -> None:
    """Train every spec (and --set variant) over the seeds, then write comparison.md/.csv/.json/.png."""
    from ..workbench.variants import SetError, parse_set

    seed_list = _seeds(seeds)

    def go() -> None:
        from ..workbench.compare import CompareError, plan, run_all, summarise
        from ..workbench.report import markdown, write_comparison

        try:
            entries, base = plan(specs, [parse_set(t) for t in sets], baseline, data, data_dir)
            options = {"data": data, "data_dir": data_dir, "rows": rows, "epochs": epochs, "device": device}
            runs = run_all(entries, seed_list, out, options, progress=not no_progress,
                           log=None if no_progress else lambda m: typer.echo(m, err=True))
            comp = summarise(entries, base, seed_list, runs)
        except (CompareError, SetError) as e:
            _fail(e)
        _show(markdown(comp), write_comparison(comp, out))

    _run(go)


@app.command("analyze")
def analyze_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="Run folders to analyse (same dataset)."),
    single: list[Path] = typer.Option([], "--single", help="A single-task run per task (repeat); missing ones are "
                                      "trained from the first run's tasks with its settings."),
    k: int = typer.Option(3, "--k", help="Bucket difference that makes a subset overwhelming (Note [STEM subsets])."),
    out: Path = typer.Option(Path("runs/analysis"), "--out", help="Folder of analysis.md/.json, plots, single runs."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
) -> None:
    """STEM subsets, gate mass, gradient conflict and per-task embedding distances of trained runs."""
    for d in [*run_dirs, *single]:
        if not (d / "metrics.json").is_file():
            typer.echo(f"error: {d}: not a finished run folder (no metrics.json)", err=True)
            raise typer.Exit(1)

    def go() -> None:
        from ..workbench.analyze import analyze
        from ..workbench.analyze_report import analysis_markdown, write_analysis
        from ..workbench.singles import AnalyzeError, single_runs

        try:
            singles = single_runs(run_dirs[0], single, out, progress=not no_progress)
            result = analyze(run_dirs, singles, k)
        except AnalyzeError as e:
            _fail(e)
        _show(analysis_markdown(result), write_analysis(result, out))

    _run(go)
