"""Where a spec's text comes from: a spec argument -> its bytes -> its text, or one clear reason why not.

`locate(arg)` gives a SpecInput for a spec file, or for a packaged spec named bare (`ple`, Note [Packaged
resources]) when no file of that name exists; it raises SpecNotFound (a missing path, a directory).
`decode(data, path)` gives the SourceFile, and a positioned Diagnostic when the bytes are not UTF-8
(a leading byte-order mark is dropped: editors write one). No torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .diagnostics import Diagnostic, SourceFile, Span, did_you_mean, error
from .resources import packaged_specs

BOM = b"\xef\xbb\xbf"


class SpecNotFound(FileNotFoundError):
    """A spec argument that names no readable file and no packaged spec; `str()` is one line, `hint` another."""

    def __init__(self, arg: str, problem: str, hint: str | None) -> None:
        super().__init__(f"{arg}: error: {problem}")
        self.problem = problem
        self.hint = hint

    def render(self) -> str:
        return str(self) + (f"\n  hint: {self.hint}" if self.hint else "")


@dataclass(frozen=True)
class SpecInput:
    path: str  # as diagnostics show it: the argument as typed, or `specs/ple.mtl` for a packaged spec
    data: bytes
    packaged: bool = False


def _is_bare(arg: str) -> bool:
    return "/" not in arg and "\\" not in arg and not arg.endswith(".mtl")


def locate(arg: str | Path) -> SpecInput:
    """The spec `arg` names: a file, else a packaged spec by bare name; SpecNotFound otherwise."""
    text = str(arg)
    path = Path(arg)
    if path.is_dir():
        raise SpecNotFound(text, "is a directory, not a spec file",
                           f"name the .mtl files in it, e.g. `{path.as_posix().rstrip('/')}/*.mtl`")
    if path.exists():
        try:
            return SpecInput(text, path.read_bytes())
        except OSError as exc:
            raise SpecNotFound(text, f"cannot read the spec file: {exc.strerror or exc}", None) from None
    shipped = packaged_specs()
    if _is_bare(text) and text in shipped:
        return SpecInput(shipped[text].display, shipped[text].data, packaged=True)
    close = did_you_mean(path.name.removesuffix(".mtl"), shipped) if _is_bare(text) else None
    raise SpecNotFound(text, "no such spec file",
                       close or "a bare name such as `ple` means a packaged spec; `mtldsl specs` lists them")


def decode(data: bytes, path: str) -> tuple[SourceFile, Diagnostic | None]:
    """The text of a spec's bytes. Bytes that are not UTF-8 give a Diagnostic at the first bad byte (the
    text then holds U+FFFD in its place, so the echoed line still shows where it is)."""
    if data.startswith(BOM):
        data = data[len(BOM):]
    try:
        return SourceFile(path, data.decode("utf-8")), None
    except UnicodeDecodeError as exc:
        text = data.decode("utf-8", errors="replace")
        start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        column = len(data[start: exc.start].decode("utf-8")) + 1
        bad = " ".join(f"0x{b:02X}" for b in data[exc.start: exc.end])
        diag = error(f"the file is not valid UTF-8: byte {bad} cannot be decoded", Span(line, column, line, column + 1),
                     "save the spec as UTF-8 (non-ASCII text may appear in comments and strings only)",
                     SourceFile(path, text))
        return SourceFile(path, text), diag
