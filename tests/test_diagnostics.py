"""How diagnostics print text that comes from the spec (Note [Echoed text]) and how a spec's bytes become
text (sources.decode): no terminal control sequence reaches the terminal, long lines are cut, carets sit
under what they point at, and bytes that are not UTF-8 are one positioned error."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mtldsl.cli import app
from mtldsl.diagnostics import MAX_ECHO, MAX_TEXT, SourceFile, Span, echo, error
from mtldsl.pipeline import check_bytes, check_text

ROOT = Path(__file__).resolve().parents[1]
MMOE = (ROOT / "specs" / "mmoe.mtl").read_bytes()
runner = CliRunner()

# Every character a terminal may act on: C0 but tab and newline, DEL, C1, bidi overrides, separators, BOM.
CONTROLS = [chr(c) for c in (*range(0, 9), *range(11, 32), 127, *range(0x80, 0xA0))] + \
    ["\u202e", "\u2066", "\u200b", "\u2028", "\u2029", "\ufeff"]


def _unsafe(text: str) -> list[str]:
    return [c for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]


@pytest.mark.parametrize("ch", CONTROLS, ids=lambda c: f"U+{ord(c):04X}")
def test_no_control_character_is_printed(ch: str) -> None:
    line = f"task ctr binary label click{ch}]0;title{ch}x"
    d = error(f"message {ch} here", Span(1, 28, 1, 29), f"hint {ch}", SourceFile(f"a{ch}.mtl", line))
    rendered = d.render()
    assert not _unsafe(rendered), rendered
    lines = rendered.split("\n")
    caret = lines[2].index("^") - lines[2].index("| ") - 2
    echoed = lines[1][lines[1].index("| ") + 2:]
    assert echoed[caret:].startswith(repr(ch)[1:-1])  # the caret is on the escape, which is the character's repr


def test_a_checked_spec_with_controls_renders_safely() -> None:
    text = 'model x "t"\ntask ctr binary label click \x1b]52;c;ZXZpbA==\x07\x1bP+q\x1b\\\x9b31m\x00\n'
    checked = check_text(text, "x.mtl")
    out = "\n".join(d.render() for d in checked.diagnostics)
    assert checked.errors and not _unsafe(out) and "\\x1b]52;c;ZXZpbA==\\x07" in out


def test_a_very_long_line_is_cut_around_the_span() -> None:
    text = 'model x "t"\ntask ctr binary label "' + "x" * (1 << 20) + '" ' + "y" * (1 << 20) + " ?\n"
    checked = check_text(text, "x.mtl")
    out = "\n".join(d.render() for d in checked.diagnostics)
    assert len(out) < 3 * (MAX_ECHO + MAX_TEXT), len(out)
    lines = out.split("\n")
    assert lines[0].startswith("x.mtl:2:") and lines[1].endswith("…")
    caret = lines[2].index("^") - lines[2].index("| ") - 2
    assert lines[1][lines[1].index("| ") + 2:][caret] == "y"  # the unexpected name, in the window


def test_echo_window_and_wide_characters() -> None:
    assert echo("ab\u4e2d\u6587cd", 5, 6) == ("ab\u4e2d\u6587cd", 6, 1)  # two cells per CJK character
    text, start, width = echo("a" * 1000 + "BAD" + "b" * 1000, 1001, 1004)
    assert text[start: start + width] == "BAD" and text.startswith("…") and text.endswith("…")
    assert len(text) <= MAX_ECHO + 2
    assert echo("\tx", 2, 3) == ("    x", 4, 1)


def test_a_long_message_is_cut_in_the_middle() -> None:
    name = "a" * 100_000
    checked = check_text(f"model m\ntask {name} binary label click\n", "x.mtl")
    first = checked.errors[0].render().split("\n")[0]
    assert len(first) < MAX_TEXT + 100 and "characters)…" in first


# ---- bytes -> text ------------------------------------------------------------------------------------


def test_bytes_that_are_not_utf8_are_one_positioned_error() -> None:
    data = MMOE.replace(b'"Multi-gate', b'"Multi-gate \xe9t\xe9', 1)
    checked = check_bytes(data, "x.mtl")
    assert len(checked.diagnostics) == 1
    d = checked.diagnostics[0]
    line = data[: data.index(b"\xe9")].count(b"\n") + 1
    assert (d.span.line, d.message) == (line, "the file is not valid UTF-8: byte 0xE9 cannot be decoded")
    assert "\ufffd" in d.render().split("\n")[1][: d.span.column + 10]
    assert check_bytes(b"\x80\x81\xfe\xff garbage \x00", "g.mtl").diagnostics[0].span.column == 1


def test_a_leading_byte_order_mark_is_ignored_and_a_later_one_named() -> None:
    assert check_bytes(b"\xef\xbb\xbf" + MMOE, "x.mtl").ok
    checked = check_bytes(MMOE.replace(b"loss ctr", b"loss\xef\xbb\xbf ctr"), "x.mtl")
    assert [d.message for d in checked.errors] == ["unexpected character U+FEFF (ZERO WIDTH NO-BREAK SPACE)"]


def test_cli_reports_bad_bytes_with_exit_1(tmp_path: Path) -> None:
    spec = tmp_path / "latin1.mtl"
    spec.write_bytes(MMOE.replace(b"# MMoE", b"# MM\xf6E"))
    result = runner.invoke(app, ["check", str(spec)])
    assert result.exit_code == 1 and f"{spec}:1:5: error: the file is not valid UTF-8" in result.stderr
    assert "Traceback" not in result.output


def test_repeats_at_one_position_are_one_report_in_numeric_order() -> None:
    """Note [Cascades]: texts that differ only in numbers, at one span, print once with a count."""
    from mtldsl.diagnostics import collapse

    here, there = Span(3, 1, 3, 5), Span(2, 1, 2, 5)
    found = [error(f"level {k} has no input", here, f"see level {k - 1}") for k in (10, 100, 2, 1000, 101)]
    found += [error("level 7 is odd", there), error("level 3 has no input", there)]
    out = collapse(found)
    assert [(d.span.line, d.message) for d in out] == [
        (2, "level 3 has no input"), (2, "level 7 is odd"), (3, "level 2 has no input (and 4 more like it here)")]
    assert out[2].hint == "see level 1"
