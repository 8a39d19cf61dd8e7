"""Positions and messages: Span, SourceFile, Diagnostic, and how a diagnostic prints.

Every stage (parser, lowering, validation, data checks at train time) reports problems as
Diagnostics; the CLI prints them sorted by position and exits 1. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


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
        """`path:line:col: error: message`, the source line, a caret under the span, a hint."""
        path = self.source.path if self.source else "<spec>"
        out = [f"{path}:{self.span.line}:{self.span.column}: {self.severity.value}: {self.message}"]
        if self.source is not None:
            raw = self.source.line(self.span.line)
            text = raw.expandtabs(4)
            gutter = f"{self.span.line:>4} | "
            out.append(gutter + text)
            start = len(raw[: self.span.column - 1].expandtabs(4))
            if self.span.end_line == self.span.line:
                end = len(raw[: self.span.end_column - 1].expandtabs(4))
            else:
                end = len(text)
            width = max(end - start, 1)
            out.append(" " * (len(gutter) - 2) + "| " + " " * start + "^" * width)
        if self.hint:
            out.append(f"  hint: {self.hint}")
        return "\n".join(out)


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


def sort_key(d: Diagnostic) -> tuple[int, int, str]:
    return (d.span.line, d.span.column, d.message)


def render_all(diagnostics: Sequence[Diagnostic]) -> str:
    return "\n".join(d.render() for d in sorted(diagnostics, key=sort_key))


class SpecError(Exception):
    """Raised by the Python API (load_spec, compile_spec, build_model) when a spec has errors."""

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        self.diagnostics = tuple(diagnostics)
        super().__init__(render_all(self.diagnostics))
