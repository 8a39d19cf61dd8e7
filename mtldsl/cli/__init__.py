"""The `mtldsl` command: thin Typer commands over the library, `mtldsl.cli:app`.

`check`, `compile` and `graph` (spec.py) never import torch; `train`, `evaluate`, `predict` (run.py),
`export` and `data prepare` (tools.py) import the runtime inside the command, so the front end stays
fast. Diagnostics go to stderr without rich markup. The app is defined in app.py; importing the command
modules below registers their commands on it (they import only app.py and the library, never this module).
"""

from __future__ import annotations

# Importing a command module registers its commands on the app, in this order (the order --help lists them).
from . import spec  # noqa: I001,F401  check, compile, graph
from . import run  # noqa: F401  train, evaluate, predict
from . import tools  # noqa: F401  export, data prepare
from . import workbench  # noqa: F401  diff, compare, analyze
from .app import app

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover - console entry point
    app()
