"""The front-end commands through Typer's CliRunner: check, compile, graph."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mtldsl.cli import app

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.mtl"))
runner = CliRunner()


def test_check_all_shipped_specs() -> None:
    result = runner.invoke(app, ["check", *map(str, SPECS)])
    assert result.exit_code == 0, result.output
    assert result.stdout.count(": ok (") == len(SPECS)


def test_check_reports_error_with_position_and_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mtl"
    bad.write_text((ROOT / "specs" / "mmoe.mtl").read_text().replace("mix experts", "mix exprts"))
    result = runner.invoke(app, ["check", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}:" in result.stderr and "exprts" in result.stderr and "^^^^^^" in result.stderr
    assert "did you mean 'experts'?" in result.stderr
    assert "Traceback" not in result.output


def test_check_missing_file_is_an_error_line() -> None:
    result = runner.invoke(app, ["check", "nope.mtl"])
    assert result.exit_code == 1 and "nope.mtl: error: no such spec file" in result.stderr


def test_compile_writes_then_reports_unchanged(tmp_path: Path) -> None:
    spec = ROOT / "specs" / "ple.mtl"
    first = runner.invoke(app, ["compile", str(spec), "-o", str(tmp_path)])
    assert first.exit_code == 0 and "written" in first.stdout
    second = runner.invoke(app, ["compile", str(spec), "-o", str(tmp_path)])
    assert second.exit_code == 0 and "unchanged" in second.stdout
    compile((tmp_path / "ple.py").read_text(), "ple.py", "exec")


def test_compile_check_detects_stale(tmp_path: Path) -> None:
    spec = ROOT / "specs" / "mmoe.mtl"
    shutil.copy(ROOT / "generated" / "mmoe.py", tmp_path / "mmoe.py")
    assert runner.invoke(app, ["compile", str(spec), "-o", str(tmp_path), "--check"]).exit_code == 0
    (tmp_path / "mmoe.py").write_text("# edited by hand\n")
    result = runner.invoke(app, ["compile", str(spec), "-o", str(tmp_path), "--check"])
    assert result.exit_code == 1 and "stale" in result.stderr
    assert (tmp_path / "mmoe.py").read_text() == "# edited by hand\n"  # --check writes nothing


def test_compile_check_of_repo_generated_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    result = runner.invoke(app, ["compile", *[f"specs/{p.name}" for p in SPECS], "--check"])
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("suffix", [".dot", ".svg", ".png"])
def test_graph_pictures(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"stem{suffix}"
    result = runner.invoke(app, ["graph", str(ROOT / "specs" / "stem.mtl"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    if suffix == ".dot":
        text = data.decode()
        assert '"experts:experts_cvr" -> "gate:g_ctr" [style=dashed, label="detach"];' in text
        assert '"experts:experts_ctr" -> "gate:g_ctr";' in text
    elif suffix == ".svg":
        assert b"<svg" in data[:500] and b"stroke-dasharray" in data
    else:
        assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_graph_unknown_format(tmp_path: Path) -> None:
    result = runner.invoke(app, ["graph", str(ROOT / "specs" / "stem.mtl"), "-o", str(tmp_path / "x.gif")])
    assert result.exit_code == 1 and "unknown picture format" in result.stderr


def test_a_bare_name_is_a_packaged_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Note [Packaged resources]: `ple` with no file of that name is the shipped spec, shown as specs/ple.mtl."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["compile", "ple", "-o", "out"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "ple.py").read_text() == (ROOT / "generated" / "ple.py").read_text()
    (tmp_path / "ple").write_text("model mine\n")  # a file of that name wins over the packaged spec
    result = runner.invoke(app, ["check", "ple"])
    assert result.exit_code == 1 and "ple:1:7: error: the spec declares no task" in result.stderr


def test_specs_lists_every_packaged_spec_with_its_description() -> None:
    result = runner.invoke(app, ["specs"])
    assert result.exit_code == 0
    rows = [line.split(None, 1) for line in result.stdout.splitlines()]
    assert [r[0] for r in rows] == [p.stem for p in SPECS]
    assert all(len(r) == 2 and r[1] for r in rows)


def test_a_directory_is_not_a_spec(tmp_path: Path) -> None:
    result = runner.invoke(app, ["check", str(tmp_path)])
    assert result.exit_code == 1 and f"{tmp_path}: error: is a directory, not a spec file" in result.stderr
    assert "hint: name the .mtl files in it" in result.stderr


def test_a_near_miss_names_the_packaged_spec() -> None:
    result = runner.invoke(app, ["compile", "plee"])
    assert result.exit_code == 1 and "plee: error: no such spec file" in result.stderr
    assert "did you mean 'ple'?" in result.stderr
