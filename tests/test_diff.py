"""`mtldsl diff`: structural differences from the graphs (workbench/diff.py, Note [Structural diff])."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from mtldsl.cli import app
from mtldsl.pipeline import check_file, check_text
from mtldsl.workbench.diff import diff_checked

SPECS = Path(__file__).resolve().parents[1] / "specs"
runner = CliRunner()


def _lines(a: str, b: str) -> list[str]:
    return [str(c) for c in diff_checked(check_file(SPECS / f"{a}.mtl"), check_file(SPECS / f"{b}.mtl"))]


def _variant(name: str, old: str, new: str) -> object:
    text = (SPECS / f"{name}.mtl").read_text()
    assert old in text
    checked = check_text(text.replace(old, new), f"{name}_variant.mtl")
    assert checked.ok
    return checked


def test_stem_against_me_ple_is_the_forward_only_routes() -> None:
    assert _lines("stem", "me_ple") == ["- route experts_ctr -> gate g_cvr (forward only)",
                                        "- route experts_cvr -> gate g_ctr (forward only)"]


def test_a_spec_equals_itself_and_a_reformatted_copy_with_another_model_name() -> None:
    assert _lines("ple", "ple") == []
    text = (SPECS / "mmoe.mtl").read_text()
    other = check_text("# a comment\n" + text.replace("model mmoe", "model renamed").replace("  ", "    "), "x.mtl")
    assert diff_checked(check_file(SPECS / "mmoe.mtl"), other) == []


def test_a_renamed_gate_is_one_line() -> None:
    text = (SPECS / "omoe.mtl").read_text().replace("gate g ", "gate mixer ").replace("input g ", "input mixer ")
    renamed = check_text(text, "omoe_renamed.mtl")
    assert renamed.ok
    assert [str(c) for c in diff_checked(check_file(SPECS / "omoe.mtl"), renamed)] == ["~ gate g renamed mixer"]


def test_counts_dims_and_visibility_changes() -> None:
    a = check_file(SPECS / "stem.mtl")
    count = _variant("stem", "experts experts_shared shared { count 1", "experts experts_shared shared { count 3")
    assert [str(c) for c in diff_checked(a, count)] == ["~ experts experts_shared: count 1 -> 3"]
    dims = _variant("stem", "tower per task { input g  mlp [64] }", "tower per task { input g  mlp [64, 32] }")
    assert [str(c) for c in diff_checked(a, dims)] == ["~ tower tower_ctr: mlp [64] -> [64, 32]",
                                                       "~ tower tower_cvr: mlp [64] -> [64, 32]"]
    both = _variant("stem", "mix experts[other] forward\n", "mix experts[other] forward backward\n")
    assert [str(c) for c in diff_checked(a, both)] == [
        "~ route experts_ctr -> gate g_cvr: forward only -> forward+backward",
        "~ route experts_cvr -> gate g_ctr: forward only -> forward+backward"]


def test_a_table_that_becomes_per_task_is_named() -> None:
    lines = _lines("mmoe", "omoe")
    assert lines == ["~ gate g: per task (g_ctr, g_cvr) -> shared (g)"]
    assert "~ embedding emb: shared (emb) -> per task (emb_ctr, emb_cvr)" in _lines("me_mmoe", "me_ple")


def test_losses_links_and_domains() -> None:
    a = check_file(SPECS / "esmm.mtl")
    text = (SPECS / "esmm.mtl").read_text()
    lines = [str(c) for c in diff_checked(a, check_text(text.replace("loss ctcvr", "loss ctcvr weight 2"), "w.mtl"))]
    assert lines == ["~ loss ctcvr: weight 1.0 -> 2.0"]


def test_cli_exit_codes() -> None:
    same = runner.invoke(app, ["diff", str(SPECS / "stem.mtl"), str(SPECS / "stem.mtl")])
    assert same.exit_code == 0 and "the graphs are equal" in same.output
    differ = runner.invoke(app, ["diff", str(SPECS / "stem.mtl"), str(SPECS / "me_ple.mtl")])
    assert differ.exit_code == 1 and "route experts_cvr -> gate g_ctr (forward only)" in differ.output
    missing = runner.invoke(app, ["diff", "nope.mtl", str(SPECS / "stem.mtl")])
    assert missing.exit_code == 2 and "no such spec file" in missing.output


def test_cli_invalid_spec_exits_2_with_the_diagnostic(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mtl"
    bad.write_text((SPECS / "stem.mtl").read_text().replace("mix experts_shared", "mix exprts_shared"))
    result = runner.invoke(app, ["diff", str(bad), str(SPECS / "stem.mtl")])
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output
