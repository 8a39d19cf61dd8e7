"""The README cannot drift: its commands, its spec snippet and its API example are checked here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mtldsl import syntax
from mtldsl.cli import app
from mtldsl.parser import parse_file, parse_text
from mtldsl.pipeline import check_text

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```\n(.*?)```", README, flags=re.S)


def setup_commands() -> list[str]:
    return [line for block in BLOCKS for line in block.splitlines() if line.startswith("python3 -m venv")]


def test_two_setup_commands_and_ci_runs_the_test_one() -> None:
    main, tests = setup_commands()
    assert "torch==2.13.0" in main and "mtldsl train specs/" in main
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert tests in ci.splitlines(), ".ci/run must run the README's test command verbatim"


def test_main_command_trains_a_shipped_spec() -> None:
    main = setup_commands()[0]
    spec = re.search(r"mtldsl train (specs/\S+\.mtl)", main).group(1)
    assert (ROOT / spec).is_file()


def test_spec_snippet_is_the_shipped_stem_spec() -> None:
    snippet = next(b for b in BLOCKS if b.lstrip().startswith("# STEM-Net"))
    checked = check_text(snippet, "README.md")
    assert checked.ok, [d.render() for d in checked.diagnostics]
    _, shipped = parse_file(ROOT / "specs" / "stem.mtl")
    assert isinstance(shipped, syntax.Spec)
    parsed = parse_text(snippet)
    assert parsed == syntax.Spec(tuple(i for i in shipped.items if not isinstance(i, syntax.TrainDecl)))


@pytest.mark.parametrize("command", sorted({m.group(1) for b in BLOCKS for m in re.finditer(r"^mtldsl (\w+)", b, re.M)}))
def test_every_documented_command_exists(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
