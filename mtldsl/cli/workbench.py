"""`mtldsl diff`, `compare` and `analyze`: thin commands over mtldsl/workbench/.

Registered on the app of app.py. `diff` is torch-free; `compare` and `analyze` import the runtime inside
the command. Like diff(1), `diff` exits 0 when the graphs are equal, 1 when they differ and 2 when a spec
cannot be read or is invalid; the other commands exit 1 on an expected failure, with one `error:` line.
"""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app


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
