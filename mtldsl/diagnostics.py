"""Positions and messages: Span, SourceFile, Diagnostic, and how a diagnostic prints.

Every stage (parser, lowering, validation, data checks at train time) reports problems as
Diagnostics; the CLI prints them sorted by position and exits 1. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import enum
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace


@dataclass(frozen=True, slots=True)
class Span:
    """A 1-based, end-exclusive region of a spec: `line:column` to `end_line:end_column`."""

    line: int
    column: int
    end_line: int
    end_column: int

    def within(self, text: str) -> bool:
        lines = text.split("\n")
        return 1 <= self.line <= max(len(lines), 1) and self.column >= 1 and (self.end_line, self.end_column) >= (self.line, self.column)


NOWHERE = Span(1, 1, 1, 1)


@dataclass(frozen=True, slots=True)
class SourceFile:
    path: str  # as the user typed it
    text: str

    def line(self, number: int) -> str:
        lines = self.text.split("\n")
        return lines[number - 1] if 1 <= number <= len(lines) else ""


class Severity(enum.Enum):
    error = "error"
    warning = "warning"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    severity: Severity
    message: str
    span: Span
    hint: str | None = None
    source: SourceFile | None = field(default=None, compare=False, repr=False)

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.error

    def render(self) -> str:
        """`path:line:col: error: message`, the source line, a caret under the span, a hint (Note [Echoed text])."""
        path = shown(self.source.path) if self.source else "<spec>"
        out = [f"{path}:{self.span.line}:{self.span.column}: {self.severity.value}: {shown(self.message)}"]
        if self.source is not None:
            gutter = f"{self.span.line:>4} | "
            end = self.span.end_column if self.span.end_line == self.span.line else None
            text, start, width = echo(self.source.line(self.span.line), self.span.column, end)
            out.append(gutter + text)
            out.append(" " * (len(gutter) - 2) + "| " + " " * start + "^" * width)
        if self.hint:
            out.append(f"  hint: {shown(self.hint)}")
        return "\n".join(out)


# Note [Echoed text]
# ~~~~~~~~~~~~~~~~~~
# A diagnostic prints text that comes from the spec: the source line, and names, strings and tokens
# quoted in messages. That text may hold terminal control sequences (ESC ] for a window title or a
# clipboard write, DCS, single-byte C1 controls, BEL, NUL) and lines of any length. Everything printed
# goes through `shown` (messages, hints, the path) or `echo` (the source line): a character that is
# not printable, by str.isprintable (controls, format characters such as bidi overrides and U+FEFF,
# unassigned code points), is shown as its Python escape (`\x1b`, `\u202e`); tabs expand to 4 columns;
# a long line is cut to a window around the span, a long message in its middle. The caret is placed in
# terminal cells of the shown text (a wide CJK character takes two).

MAX_ECHO = 160  # terminal cells of an echoed source line
MAX_TEXT = 300  # characters of a message or hint


def _pieces(raw: str) -> list[str]:
    """Each character of a source line as it is shown (Note [Echoed text]): itself, spaces for a tab, or an escape."""
    out: list[str] = []
    col = 0
    for ch in raw:
        if ch == "\t":
            piece = " " * (4 - col % 4)
        elif ch.isprintable():
            piece = ch
        else:
            piece = repr(ch)[1:-1]  # a non-printable character's repr is its escape
        out.append(piece)
        col += _cells(piece)
    return out


def _cells(piece: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in piece)


def echo(raw: str, column: int, end_column: int | None) -> tuple[str, int, int]:
    """A source line as shown, the caret's start cell and its width: the span `column` to `end_column`
    (to the end of the line when None), at least one cell, inside a window of MAX_ECHO cells."""
    pieces = _pieces(raw)
    cells = [_cells(p) for p in pieces]
    first = min(max(column - 1, 0), len(pieces))
    last = len(pieces) if end_column is None else min(max(end_column - 1, first), len(pieces))
    start, width = sum(cells[:first]), max(sum(cells[first:last]), 1)
    total = sum(cells)
    if total <= MAX_ECHO:
        return "".join(pieces), start, width
    lo = max(0, min(start - MAX_ECHO // 3, total - MAX_ECHO))  # the window's first cell
    text, pos = [], 0
    for piece, n in zip(pieces, cells):
        if lo <= pos and pos + n <= lo + MAX_ECHO:
            text.append(piece)
        pos += n
    head, tail = ("…" if lo > 0 else ""), ("…" if lo + MAX_ECHO < total else "")
    shift = len(head) - lo
    start = max(start + shift, 0)
    width = max(min(width, len(head) + MAX_ECHO - start), 1)
    return head + "".join(text) + tail, start, width


def shown(text: str) -> str:
    """Message text as printed (Note [Echoed text]): unprintable characters escaped, the middle of a very long one cut."""
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    if len(text) > MAX_TEXT:
        half = MAX_TEXT // 2
        text = f"{text[:half]}…({len(text) - 2 * half} characters)…{text[-half:]}"
    return text


def error(message: str, span: Span, hint: str | None = None, source: SourceFile | None = None) -> Diagnostic:
    return Diagnostic(Severity.error, message, span, hint, source)


def warning(message: str, span: Span, hint: str | None = None, source: SourceFile | None = None) -> Diagnostic:
    return Diagnostic(Severity.warning, message, span, hint, source)


def quoted(names: Iterable[str]) -> str:
    """`'a', 'b'`: names as messages list them."""
    return ", ".join(f"'{n}'" for n in names)


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """`did you mean 'experts'?` from the closest declared names, or None."""
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


_DIGITS = re.compile(r"(\d+)")


def _natural(text: str) -> tuple[object, ...]:
    """`level 10` after `level 9`: numbers in a message compare as numbers."""
    return tuple(int(p) if p.isdigit() else p for p in _DIGITS.split(text))


def sort_key(d: Diagnostic) -> tuple[int, int, tuple[object, ...]]:
    """Position order, then message order with numbers compared as numbers."""
    return (d.span.line, d.span.column, _natural(d.message))


def collapse(diagnostics: Sequence[Diagnostic]) -> list[Diagnostic]:
    """Sorted, with a repeated diagnostic printed once (Note [Cascades]): the first of each set that differ
    only in their numbers at one position, with the count of the others."""
    groups: dict[tuple[object, ...], list[Diagnostic]] = {}
    for d in sorted(diagnostics, key=sort_key):
        key = (d.severity, d.span, _DIGITS.sub("#", d.message), _DIGITS.sub("#", d.hint or ""))
        groups.setdefault(key, []).append(d)
    out = []
    for same in groups.values():
        first = same[0]
        if len(same) > 1:
            first = replace(first, message=f"{first.message} (and {len(same) - 1} more like it here)")
        out.append(first)
    return sorted(out, key=sort_key)


def render_all(diagnostics: Sequence[Diagnostic]) -> str:
    return "\n".join(d.render() for d in collapse(diagnostics))


# Note [Cascades]
# ~~~~~~~~~~~~~~~
# One mistake inside a repeated construct is found once per repetition: a `levels 32` block without a
# shared gate lacks an input at each of levels 2..32, all at the same declaration. Diagnostics at one
# position whose texts differ only in their numbers are one report: `collapse` keeps the first in
# numeric order (`level 2`, not `level 10`, which sorts first as text) and says how many more there
# are. pipeline.py collapses what a check finds, so the API's SpecError and the CLI print the same.


class SpecError(Exception):
    """Raised by the Python API (load_spec, compile_spec, build_model) when a spec has errors."""

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        self.diagnostics = tuple(diagnostics)
        super().__init__(render_all(self.diagnostics))
