"""`mtldsl check`, `compile`, `graph` and `specs`: spec files -> diagnostics, generated modules, architecture
pictures; the list of packaged specs, which every spec argument may name bare (`mtldsl compile ple`).

Registered on the app of app.py. None of them imports torch (a test checks it in a subprocess), so
they stay under a second. Diagnostics go to stderr without rich markup, sorted by position.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from .app import app

if TYPE_CHECKING:
    from ..pipeline import Checked


def _report(checked: Checked, strict: bool) -> bool:
    """Print a spec's diagnostics to stderr; True when it may proceed."""
    from ..diagnostics import render_all

    if checked.diagnostics:
        typer.echo(render_all(checked.diagnostics), err=True)
    warnings = len(checked.diagnostics) - len(checked.errors)
    return not checked.errors and not (strict and warnings)


def _check(spec: Path, data_dir: Optional[str], data: Optional[str] = None) -> Checked | None:
    """The checked spec (a file, or a packaged spec by bare name); None, said on stderr, when there is none."""
    from ..pipeline import check_file
    from ..sources import SpecNotFound

    try:
        return check_file(spec, data_dir=data_dir, data=data)
    except SpecNotFound as e:
        typer.echo(e.render(), err=True)
        return None


DATA_HELP = "Dataset name or folder to check the spec against (default: the spec's `data`), as `train --data`."


@app.command()
def check(
    specs: list[Path] = typer.Argument(..., help="Spec files, or packaged specs by name (`mtldsl specs`)."),
    strict: bool = typer.Option(False, "--strict", help="Warnings fail the check too."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Where named datasets live."),
    data: Optional[str] = typer.Option(None, "--data", help=DATA_HELP),
) -> None:
    """Check specs: exit 0 when all are valid, 1 with positioned errors otherwise."""
    ok = True
    for spec in specs:
        checked = _check(spec, data_dir, data)
        if checked is None:
            ok = False
            continue
        good = _report(checked, strict)
        ok &= good
        if good and checked.model is not None:
            m = checked.model
            blocks = len(m.embeddings) + len(m.experts) + len(m.gates) + len(m.towers)
            size = f"; {checked.size.describe()}" if checked.size is not None else ""
            typer.echo(f"{spec}: ok ({m.name}: {len(m.tasks)} tasks, {blocks} blocks, {len(m.losses)} losses{size})")
    raise typer.Exit(0 if ok else 1)


@app.command("compile")
def compile_(
    specs: list[Path] = typer.Argument(..., help="Spec files, or packaged specs by name (`mtldsl specs`)."),
    out: Path = typer.Option(Path("generated"), "-o", "--out", help="Output folder."),
    check_only: bool = typer.Option(False, "--check", help="Write nothing; exit 1 when a file is stale."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir"),
    data: Optional[str] = typer.Option(None, "--data", help=DATA_HELP),
) -> None:
    """Compile specs to standalone PyTorch modules, `OUT/<model>.py`."""
    from ..codegen import render, write_if_changed

    ok = True
    for spec in specs:
        checked = _check(spec, data_dir, data)
        if checked is None or not _report(checked, strict=False):
            ok = False
            continue
        assert checked.model is not None and checked.graph is not None
        text = render(checked.model, checked.graph, checked.source.text)
        target = out / f"{checked.model.name}.py"
        if check_only:
            current = target.read_text(encoding="utf-8") if target.exists() else None
            if current != text:
                typer.echo(f"{target}: stale, run `mtldsl compile {spec}`", err=True)
                ok = False
        else:
            changed = write_if_changed(target, text)
            typer.echo(f"{target}: {'written' if changed else 'unchanged'}")
    raise typer.Exit(0 if ok else 1)


@app.command()
def graph(
    spec: Path = typer.Argument(..., help="Spec file, or a packaged spec by name."),
    out: Path = typer.Option(..., "-o", "--out", help="Picture file: .svg, .png or .dot."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir"),
    data: Optional[str] = typer.Option(None, "--data", help=DATA_HELP),
) -> None:
    """Draw the architecture; stop-gradient edges are dashed."""
    from ..draw import draw

    checked = _check(spec, data_dir, data)
    if checked is None or not _report(checked, strict=False):
        raise typer.Exit(1)
    assert checked.graph is not None
    suffix = out.suffix.lower()
    if suffix not in (".svg", ".png", ".dot"):
        typer.echo(f"{out}: error: unknown picture format '{out.suffix}'\n  hint: use .svg, .png or .dot", err=True)
        raise typer.Exit(1)
    draw(checked.graph, out)
    typer.echo(f"{out}: written")


@app.command("specs")
def specs_() -> None:
    """List the packaged specs: `mtldsl compile NAME` and `mtldsl train NAME` take them by name."""
    from ..resources import packaged_specs

    shipped = packaged_specs()
    width = max(map(len, shipped), default=0)
    for name, spec in shipped.items():
        typer.echo(f"{name:<{width}}  {spec.description}")
