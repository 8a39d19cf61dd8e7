"""The Typer app of the `mtldsl` command, defined once; it imports nothing of the CLI.

The command modules (spec.py: check/compile/graph; run.py: train/evaluate/predict; tools.py: export,
data prepare) import `app` from here and register their commands on it; cli/__init__.py imports them
all, so `mtldsl.cli:app` has every command.
"""

from __future__ import annotations

import typer

__all__ = ["app"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Compile and train multi-task recommendation models from .mtl specs.")
