"""Lark's syntax errors -> one Diagnostic each, positioned where the mistake is, with a hint from data.

Takes the exception parse_text caught, the source and the parser (parser.py passes it: this module
imports no parser); gives a Diagnostic. What it tells apart (Note [Syntax error positions]): a stray
character, named by its code point when it is not plain ASCII, and a look-alike letter named with the
letter it imitates; a string with an unsupported escape, and one left open; a statement keyword that
an incomplete statement took as a name; a misspelled keyword. Expected tokens come from the LALR
parser's exact accept set. No torch.
"""

from __future__ import annotations

import unicodedata

from lark import Lark, Token
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from .diagnostics import Diagnostic, SourceFile, Span, did_you_mean, error

# Note [Syntax error positions]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# The LALR parser stops at the first token it cannot take, which is not always where the mistake is:
# - `gаte` with a Cyrillic `а` lexes `g` as a name, which cannot start a statement: the error lands on
#   `g`. A token glued to a character no token may hold is reported at that character instead.
# - A string with `\q` does not match STRING, so the lexer stops at its opening quote; the string is
#   scanned for the escape and the escape is reported, "unterminated" only when no quote closes it.
# - `where` with no label before `embedding emb { ... }` takes `embedding` as the label column (keywords
#   are names wherever a name may stand) and fails at `emb`. When the token before the error is a
#   statement keyword that begins its line, read as a name where the keyword itself could not stand,
#   the error is reported at that keyword, with what the incomplete statement expected. (Mid-line,
#   `mix experts forwrd`, a keyword is a name as written.)
# - Lark's `expected` may be the whole follow set of a pending reduction; the interactive parser's
#   accepts() is the exact set of terminals that may come next.

STATEMENT_KEYWORDS = frozenset({"model", "data", "task", "output", "embedding", "experts", "gate", "tower",
                                "transfer", "loss", "train", "levels"})
ESCAPES = '"\\nt'  # the characters a backslash may escape in a string (grammars/mtl.lark, STRING)

# Human names for terminals in "expected ..." hints.
_TOKEN_NAMES = {
    "NAME": "a name", "STRING": "a string", "INT": "an integer", "FLOAT": "a number", "DOTTED": "a dotted name",
    "BOOL": "true or false", "FLAG": "forward or backward",
    "LBRACE": "'{'", "RBRACE": "'}'", "LSQB": "'['", "RSQB": "']'", "LPAR": "'('", "RPAR": "')'",
    "COMMA": "','", "STAR": "'*'", "EQUAL": "'='", "__ANON_0": "'->'",
}

# Known mistakes, keyed by the offending token text: a hint that beats the expected-token list.
_KNOWN_MISTAKES = {
    ",": "properties and route flags are separated by spaces, not commas",
    ";": "statements end at the next keyword; no ';' is needed",
    ":": "write `key value` without ':'",
    "=": "write `key value` without '='",
}

# Letters of other scripts that look exactly like an ASCII letter (the common ones of Unicode's confusables).
_LOOK_ALIKES = dict(zip(
    "\u0430\u0435\u043e\u0440\u0441\u0443\u0445\u0456\u0458\u0455\u0501\u0261\u0410\u0412\u0415\u041a\u041c\u041d"
    "\u041e\u0420\u0421\u0422\u0425\u03bf\u03b1\u03bd\u03c1\u03b9\u0391\u0392\u0395\u0396\u0397\u0399\u039a\u039c"
    "\u039d\u039f\u03a1\u03a4\u03a5\u03a7",
    "aeopcyxijsdgABEKMHOPCTXoavpiABEZHIKMNOPTYX",
))


def _expected(names: set[str]) -> str:
    words: list[str] = []
    for name in sorted(names):
        if name in _TOKEN_NAMES:
            words.append(_TOKEN_NAMES[name])
        elif name.isupper():
            words.append(f"'{name.lower()}'")
        else:
            words.append(name)
    words = sorted(set(words))
    if len(words) > 8:
        return "expected one of " + ", ".join(words[:8]) + ", …"
    return "expected " + (" or ".join(words) if len(words) <= 2 else ", ".join(words[:-1]) + " or " + words[-1])


def _accepted(exc: UnexpectedInput) -> set[str]:
    """Terminals the parser accepts here (Note [Syntax error positions])."""
    coarse = set(getattr(exc, "expected", None) or getattr(exc, "allowed", None) or ())
    try:
        return set(exc.interactive_parser.accepts()) - {"$END"} or coarse  # type: ignore[union-attr]
    except Exception:  # no interactive parser (or lark changed): the coarse set is still a hint
        return coarse


def _misspelled(token: str, expected: set[str], lark: Lark) -> str | None:
    """`did you mean 'forward'?` when a name is close to a keyword the parser expected."""
    words: list[str] = []
    for name in expected:
        if name == "FLAG":
            words += ["forward", "backward"]
        elif name == "BOOL":
            words += ["true", "false"]
        else:
            pattern = next((t.pattern for t in lark.terminals if t.name == name), None)
            if pattern is not None and pattern.type == "str" and pattern.value.isidentifier():
                words.append(pattern.value)
    return did_you_mean(token, words) if token.isidentifier() else None


def _eof_span(text: str) -> Span:
    """Just after the last character that is not white space: where the missing text belongs."""
    lines = text.rstrip().split("\n")
    return Span(len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 2)


def _plain(ch: str) -> bool:
    """A character a token may hold, or white space: printable ASCII, tab, newline, carriage return."""
    return " " <= ch <= "~" or ch in "\t\n\r"


def describe_char(ch: str) -> tuple[str, str | None]:
    """How a message names a character that no token may hold, and a hint: `'а' (U+0430 CYRILLIC SMALL
    LETTER A), which looks like 'a'`; a control character by its code point only (it is escaped when shown)."""
    if _plain(ch):
        return repr(ch), None
    code = f"U+{ord(ch):04X}"
    name = unicodedata.name(ch, "")
    if not ch.isprintable():
        what = f"{code} ({name})" if name else f"{code} (a control character)"
        return what, "only comments and strings may hold characters other than printable ASCII"
    looks = _LOOK_ALIKES.get(ch) or next((c for c in [unicodedata.normalize("NFKC", ch)] if len(c) == 1 and _plain(c)), None)
    described = f"'{ch}' ({code} {name})" if name else f"'{ch}' ({code})"
    if looks:
        return f"{described}, which looks like '{looks}'", f"type '{looks}': names and keywords are ASCII"
    return described, "names and keywords are ASCII; other characters may appear in comments and strings"


def _char_error(text: str, pos: int, line: int, column: int, exc: UnexpectedInput | None,
                src: SourceFile) -> Diagnostic:
    ch = text[pos] if pos < len(text) else ""
    span = Span(line, column, line, column + 1)
    if ch == '"':
        return _string_error(text, pos, line, column, src)
    what, hint = describe_char(ch)
    if hint is None:
        hint = _KNOWN_MISTAKES.get(ch) or (_expected(_accepted(exc)) if exc is not None else None)
    return error(f"unexpected character {what}", span, hint, src)


def _string_error(text: str, pos: int, line: int, column: int, src: SourceFile) -> Diagnostic:
    """A string the lexer could not read: an unsupported escape in it, or no closing quote on its line."""
    i = pos + 1
    while i < len(text) and text[i] != "\n":
        if text[i] == "\\":
            nxt = text[i + 1] if i + 1 < len(text) else ""
            if nxt not in ESCAPES or nxt == "":
                at = column + (i - pos)
                shown = "\\" + nxt if nxt and nxt != "\n" else "\\"
                return error(f"unsupported escape '{shown}' in a string", Span(line, at, line, at + len(shown)),
                             "a string allows \\\" \\\\ \\n and \\t; write '\\\\' for a backslash", src)
            i += 2
            continue
        if text[i] == '"':
            break
        i += 1
    else:
        return error("unterminated string", Span(line, column, line, column + 1),
                     "strings end on the same line with '\"'", src)
    return error("unexpected string", Span(line, column, line, column + 1 + (i - pos)), None, src)


def _swallowed_keyword(text: str, bad: Token, lark: Lark) -> tuple[Token, set[str]] | None:
    """The statement keyword just before `bad`, first on its line, that the parser took as a name where the
    keyword could not stand, and what the parser expected there."""
    ip = lark.parse_interactive(text)
    previous: tuple[Token, set[str]] | None = None
    try:
        for tok in ip.iter_parse():  # yields each token before feeding it
            if tok.start_pos >= bad.start_pos:
                break
            previous = None
            line_start = text.rfind("\n", 0, tok.start_pos) + 1
            if tok.type == "NAME" and tok.value in STATEMENT_KEYWORDS and not text[line_start: tok.start_pos].strip():
                accepts = set(ip.accepts())
                if tok.value.upper() not in accepts:
                    previous = (tok, accepts)
    except UnexpectedInput:  # lexing the token after the last one fed: `bad` itself
        pass
    return previous


def _token_span(tok: Token) -> Span:
    return Span(tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + len(str(tok)))


def explain(exc: UnexpectedInput, src: SourceFile, lark: Lark) -> Diagnostic:
    """The Diagnostic of a syntax error (Note [Syntax error positions])."""
    text = src.text
    if isinstance(exc, UnexpectedCharacters):
        return _char_error(text, exc.pos_in_stream, exc.line, exc.column, exc, src)
    if isinstance(exc, UnexpectedToken):
        tok = exc.token
        if tok.type == "$END":
            return error("unexpected end of file", _eof_span(text), _expected(_accepted(exc)), src)
        after = tok.end_pos if tok.end_pos is not None else tok.start_pos + len(str(tok))
        if after < len(text) and not _plain(text[after]):  # glued to a character no token holds
            span = _token_span(tok)
            return _char_error(text, after, span.end_line, span.end_column, None, src)
        swallowed = _swallowed_keyword(text, tok, lark)
        if swallowed is not None:
            kw, accepts = swallowed
            return error(f"unexpected '{kw.value}': the statement before it is incomplete", _token_span(kw),
                         _expected(accepts - {"$END"}) + f" before it ('{kw.value}' starts a new statement)", src)
        expected = _accepted(exc)
        hint = _KNOWN_MISTAKES.get(str(tok)) or _misspelled(str(tok), expected, lark) or _expected(expected)
        return error(f"unexpected {_clip(str(tok))!r}", _token_span(tok), hint, src)
    return error(str(exc).splitlines()[0], Span(exc.line, exc.column, exc.line, exc.column + 1), None, src)


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"

