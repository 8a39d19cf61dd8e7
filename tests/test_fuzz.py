"""The front end never raises: grammar-shaped text, random text and mutated shipped specs all come back as
a Checked whose diagnostics lie inside the text and render. A spec that checks clean has only safe names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.lark import from_lark
from lark import Lark
from strategies import architectures

from mtldsl.diagnostics import render_all
from mtldsl.resources import grammar_text
from mtldsl.pipeline import Checked, check_text
from mtldsl.names import name_problem

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "specs").glob("*.mtl"))]

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

# Names a spec might declare or misspell, names that must be refused, and dataset words.
NAMES = ["ctr", "cvr", "ctcvr", "emb", "emb_shared", "experts", "experts_shared", "g", "g_shared", "bottom",
         "click", "purchase", "all", "user", "item", "synthetic", "class", "forward", "training", "batch",
         "Foo", "h_ctr", "own", "mean", "mix", "a__b", "tower_ctr", "emb_ctr", "a" * 70]


def assert_sound(text: str, checked: Checked) -> None:
    assert isinstance(checked, Checked)
    assert (checked.model is None) == (checked.syntax is None)
    for d in checked.diagnostics:
        assert d.span.within(text), (d.span, d.message)
        assert isinstance(d.render(), str)
    render_all(checked.diagnostics)


def assert_safe_when_clean(checked: Checked) -> None:
    """Note [Safe names] in names.py: nothing unsafe gets past a clean check."""
    if not checked.ok or checked.model is None:
        return
    m = checked.model
    local = [*(t.name for t in m.tasks), *(o.name for o in m.outputs),
             *(b.name for b in (*m.embeddings, *m.experts, *m.gates))]
    attributes = [m.name, *(t.name for t in m.towers), *(f"transfer_{tr.source}_{tr.target}" for tr in m.transfers)]
    bad = [n for n in attributes if name_problem(n, local=False) is not None] + \
        [n for n in local if name_problem(n, local=True) is not None]
    assert not bad, f"unsafe names passed the check: {bad}"


# ---- grammar-shaped text ----------------------------------------------------------------------------


def _grammar_strategy() -> st.SearchStrategy[str]:
    """from_lark over grammars/mtl.lark, every token followed by a space so that tokens do not glue."""
    lark = Lark(grammar_text(), start="spec", parser="lalr")
    spaced = {
        "NAME": st.sampled_from(NAMES),
        "DOTTED": st.sampled_from(["cvr.auc", "mean.auc", "ctr.mse", "ctr.acc", "a.b.c"]),
        "STRING": st.sampled_from(['"doc"', '"101"', '"205"', '"a \\" b"', '"x\\ny"', '""', '"a\\\\b"']),
        "INT": st.sampled_from(["0", "1", "2", "4", "16"]),
        "FLOAT": st.sampled_from(["0.1", "1e-3", ".5", "2."]),
        "BOOL": st.sampled_from(["true", "false"]),
        "FLAG": st.sampled_from(["forward", "backward"]),
        "COMMENT": st.just("# c\n"),
        "WS": st.sampled_from([" ", "\n"]),
    }
    explicit = {}
    for t in lark.terminals:
        if t.name in spaced:
            explicit[t.name] = spaced[t.name].map(lambda s: s + " ")
        elif t.pattern.type == "str":
            explicit[t.name] = st.just(t.pattern.value + " ")
    return from_lark(lark, start="spec", explicit=explicit)


GRAMMAR_TEXT = _grammar_strategy()


@FUZZ
@given(GRAMMAR_TEXT)
def test_grammar_shaped_text_never_raises(text: str) -> None:
    checked = check_text(text)
    assert_sound(text, checked)
    assert_safe_when_clean(checked)


# ---- random text ------------------------------------------------------------------------------------

SPEC_CHARS = list('abcdefgxyz_ {}[]()",*=->.#\\\n\t0123456789\r\x00é')
PIECES = st.sampled_from(SPEC_CHARS) | st.sampled_from(["task ", "gate ", "mix ", "experts ", "model "]) | st.characters()


@FUZZ
@given(st.lists(PIECES, max_size=120).map("".join))
def test_random_text_never_raises(text: str) -> None:
    assert_sound(text, check_text(text))


# ---- mutated shipped specs ----------------------------------------------------------------------------

SNIPPETS = ["{", "}", "[", "]", "(", ")", ",", "*", "->", '"', "\\", "#", "\n", " ", "forward", "backward",
            "per task", "for ctr", "shared", "mix experts", "input emb", "count 3", "copies 2", "levels 2 {",
            "transfer cvr -> ctr", "loss cvr", "task ctr binary label click", "output o = ctr * cvr",
            "tower per task { input g }", "gate g { input emb }", "sum(emb, g)", "concat(emb, emb)", "[own]",
            "train { monitor ctr.mse }", "mlp [8]", "mlp []", "dim 0", "0", "1e9"]


@st.composite
def mutated_specs(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(SHIPPED))
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 40)))
        op = draw(st.sampled_from(["delete", "insert", "replace"]))
        new = "" if op == "delete" else draw(st.sampled_from(SNIPPETS) | st.text(st.sampled_from(SPEC_CHARS), max_size=6))
        text = text[:i] + new + text[j:] if op != "insert" else text[:i] + new + text[i:]
    return text


_NAME_TOKEN = re.compile(r"(?<![\w.\"])[a-z_][a-z0-9_]*(?![\w.\"])")
KEYWORDS = {t.pattern.value for t in Lark(grammar_text(), start="spec", parser="lalr").terminals
            if t.pattern.type == "str"} | {"forward", "backward", "true", "false"}


@st.composite
def renamed_specs(draw: st.DrawFn) -> str:
    """A shipped spec with a few names swapped: mostly parses, so lowering and validation see it."""
    text = draw(st.sampled_from(SHIPPED))
    body = text.split("\nmodel ", 1)
    head, rest = (body[0] + "\nmodel ", body[1]) if len(body) == 2 else ("", text)
    for _ in range(draw(st.integers(1, 3))):
        matches = [m for m in _NAME_TOKEN.finditer(rest) if m.group() not in KEYWORDS]
        if not matches:
            break
        m = draw(st.sampled_from(matches))
        rest = rest[: m.start()] + draw(st.sampled_from(NAMES)) + rest[m.end():]
    return head + rest


@FUZZ
@given(mutated_specs())
def test_mutated_spec_never_raises(text: str) -> None:
    checked = check_text(text, "specs/mutated.mtl")
    assert_sound(text, checked)
    assert_safe_when_clean(checked)


@FUZZ
@given(renamed_specs())
def test_renamed_spec_never_raises(text: str) -> None:
    checked = check_text(text, "specs/renamed.mtl")
    assert_sound(text, checked)
    assert_safe_when_clean(checked)


# ---- what check accepts compiles, imports and builds ---------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(architectures() | renamed_specs())
def test_every_spec_check_accepts_compiles_imports_and_builds(text: str) -> None:
    """Issue 9: `model none` checked clean and compiled to `class None(nn.Module)`. Whatever passes `check`
    compiles to source ast.parse accepts, that imports, and whose class builds and runs a batch."""
    import torch

    import mtldsl
    from mtldsl.codegen import class_name

    checked = check_text(text, "specs/drawn.mtl")
    if not checked.ok:
        return
    source = mtldsl.compile_spec(checked)
    ast.parse(source)
    module = mtldsl.load_module(source, "mtldsl_drawn")
    cls = getattr(module, class_name(checked.model.name))
    model = cls({f: 7 for f in cls.SPARSE_FIELDS})
    model.eval()
    batch = {"sparse": torch.randint(0, 7, (3, len(cls.SPARSE_FIELDS))), "dense": torch.rand(3, len(cls.DENSE_FIELDS))}
    out = model(batch)
    assert set(out) == set(cls.OUTPUTS) and all(v.shape == (3,) for v in out.values())


def test_the_architectures_mostly_check_clean() -> None:
    """The property above tests something only if most drawn architectures pass `check`."""
    from hypothesis import find

    clean = find(architectures(), lambda t: check_text(t).ok and "levels" in t and "transfer" in t)
    assert check_text(clean).ok


# ---- byte-level mutations: what a file on disk may hold --------------------------------------------

SHIPPED_BYTES = [p.read_bytes() for p in sorted((ROOT / "specs").glob("*.mtl"))]
# Bytes that break decoding or terminals: invalid UTF-8, a BOM, controls (ESC, BEL, NUL, C1 as UTF-8),
# look-alikes, a bidi override, huge numbers.
BYTE_SNIPPETS = [b"\x80", b"\xff", b"\xe9", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\x1b]0;x\x07", b"\x1bP",
                 b"\x00", b"\x07", b"\xc2\x9b", "\u0430".encode(), "\u202e".encode(), "\uff47".encode(), b"\r",
                 b"\t", b"9" * 40, b"1e999", b"levels 100000000 {", b"count 99999", b"mlp []", b'"\\q"', b"where"]
BYTES_PER_CASE_SECONDS = 20  # a hang detector, not a timing: a case takes milliseconds


@st.composite
def mutated_bytes(draw: st.DrawFn) -> bytes:
    data = draw(st.sampled_from(SHIPPED_BYTES))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "replace"]))
        new = draw(st.sampled_from(BYTE_SNIPPETS) | st.binary(min_size=1, max_size=4))
        if op == "flip" and i < len(data):
            data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
        elif op == "insert":
            data = data[:i] + new + data[i:]
        elif op == "delete":
            data = data[:i] + data[i + draw(st.integers(1, 30)):]
        else:
            data = data[:i] + new + data[i + len(new):]
    return data


class _Hang(Exception):
    pass


def _on_alarm(signum: int, frame: object) -> None:
    raise _Hang(f"a case ran for {BYTES_PER_CASE_SECONDS} s")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated_bytes())
def test_mutated_bytes_give_a_spec_or_diagnostics(data: bytes) -> None:
    """Issue 9, acceptance: any bytes give a checked spec or diagnostics, never a traceback or a hang; a spec
    that checks clean compiles; every diagnostic prints without a control character."""
    import signal
    import unicodedata

    import mtldsl
    from mtldsl.pipeline import check_bytes

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, BYTES_PER_CASE_SECONDS)
    try:
        checked = check_bytes(data, "specs/mutated.mtl")
        assert_sound(checked.source.text, checked)
        out = render_all(checked.diagnostics)
        assert not [c for c in out if c != "\n" and unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
        assert checked.ok or checked.errors
        if checked.ok:
            ast.parse(mtldsl.compile_spec(checked))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
