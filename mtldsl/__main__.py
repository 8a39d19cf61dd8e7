"""`python -m mtldsl ...`: the same as the `mtldsl` command."""

from mtldsl.cli import main

main()
