"""The `mtldsl` command: thin Typer commands over the library, `mtldsl.cli:app`.

`check`, `compile` and `graph` (spec.py) never import torch; `train`, `evaluate`, `predict` (run.py),
`export` and `data prepare` (tools.py) import the runtime inside the command, so the front end stays
fast. Diagnostics go to stderr without rich markup. The app is defined in app.py; importing the command
modules below registers their commands on it (they import only app.py and the library, never this module).
"""

from __future__ import annotations

from . import run, spec, tools  # noqa: F401  (register their commands on the app)
from .app import app

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover - console entry point
    app()
