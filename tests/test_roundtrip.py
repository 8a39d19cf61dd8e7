"""parse → print → parse: shipped specs, Hypothesis trees and grammar-shaped text; the canonical layout."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.extra.lark import from_lark
from lark import Lark
from strategies import GRAMMAR, KEYWORDS, NAMES, spec_trees

from mtldsl import syntax as s
from mtldsl.diagnostics import SpecError, render_all
from mtldsl.parser import parse_text
from mtldsl.printer import format_file, print_spec
from mtldsl.vocab import TaskKind

SPECS = Path(__file__).resolve().parent.parent / "specs"
SHIPPED = sorted(SPECS.glob("*.mtl"))


def parse(text: str) -> s.Spec:
    result = parse_text(text)
    assert isinstance(result, s.Spec), f"printed text does not parse:\n{text}\n{render_all(result)}"
    return result


def assert_same_tree(got: s.Spec, want: s.Spec) -> None:
    assert got == want
    assert repr(got) == repr(want)  # `==` alone takes 1 == 1.0 == True; repr tells int, float and bool apart


@pytest.mark.parametrize("spec", SHIPPED, ids=lambda p: p.stem)
def test_shipped_spec_roundtrip(spec: Path) -> None:
    tree = parse(spec.read_text())
    printed = print_spec(tree)
    assert_same_tree(parse(printed), tree)
    assert print_spec(parse(printed)) == printed  # idempotent
    assert format_file(spec) == printed


def test_shipped_specs_exist() -> None:
    assert len(SHIPPED) >= 10


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_trees())  # valid by construction
def test_print_parse_roundtrip(tree: s.Spec) -> None:
    printed = print_spec(tree)
    assert_same_tree(parse(printed), tree)  # spans are compare=False
    assert print_spec(parse(printed)) == printed


# Grammar-shaped text reaches what the pool of names avoids: keywords used as names where the
# contextual lexer allows it (`model task`, `mix g[for]`), odd spacing, comments, huge numbers.
_LARK = Lark(GRAMMAR.read_text(), start="spec", parser="lalr", lexer="contextual")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(from_lark(_LARK, start="spec"))
def test_grammar_text_roundtrip(text: str) -> None:
    tree = parse_text(text)
    if isinstance(tree, s.Spec):
        assert_same_tree(parse(print_spec(tree)), tree)


def test_name_pool_avoids_keywords() -> None:
    assert {"task", "shared", "per", "for", "mix", "own", "other", "forward", "backward", "true", "false"} <= KEYWORDS
    assert {"binary", "sum", "concat", "experts"} <= KEYWORDS
    assert not set(NAMES) & KEYWORDS
    assert len(NAMES) >= 20


# ---- canonical layout -------------------------------------------------------------------------

MESSY = """\
# a comment, dropped
model stem   "STEM-Net, 1 level"   data synthetic
task ctr binary label click task cvr binary label purchase where click
output ctcvr = ctr*cvr label click*"purchase"
embedding emb_shared { dim 16 fields all }  # owner omitted
embedding emb per task { dim 16
  fields ["101", f205] }
experts experts_shared shared { count 1 input emb_shared mlp [256,128] }
gate g per task { input sum(emb_shared,emb) mix experts_shared batch_norm true
  mix experts[own] forward backward mix experts[other] forward }
gate g2 for ctr { input emb }
tower per task { input g mlp [64] } transfer ctr -> cvr { calibration 0.6 } transfer cvr -> ctr { }
levels 2 { experts e { count 2 } gate h { mix e } }
loss ctr loss ctcvr weight 1.0 where click
train { lr 1e-5 optimizer adam monitor cvr.auc name "a \\"b\\"\\n" flag true }
"""

CANONICAL = """\
model stem "STEM-Net, 1 level"
data synthetic

task ctr binary label click
task cvr binary label purchase where click
output ctcvr = ctr * cvr label click * "purchase"

embedding emb_shared { dim 16  fields all }
embedding emb per task { dim 16  fields ["101", f205] }

experts experts_shared shared { count 1  input emb_shared  mlp [256, 128] }

gate g per task {
  input sum(emb_shared, emb)
  mix experts_shared
  mix experts[own] forward backward
  mix experts[other] forward
  batch_norm true
}
gate g2 for ctr { input emb }

tower per task { input g  mlp [64] }
transfer ctr -> cvr { calibration 0.6 }
transfer cvr -> ctr

levels 2 {
  experts e { count 2 }
  gate h {
    mix e
  }
}

loss ctr
loss ctcvr weight 1.0 where click

train { lr 1e-05  optimizer adam  monitor cvr.auc  name "a \\"b\\"\\n"  flag true }
"""


def test_canonical_layout() -> None:
    tree = parse(MESSY)
    assert print_spec(tree) == CANONICAL
    assert_same_tree(parse(CANONICAL), tree)


def test_gate_prints_leading_inputs_then_routes_then_the_rest() -> None:
    tree = parse("gate g { input a  input b  dropout 0.1  mix e  input c }")
    assert print_spec(tree) == "gate g {\n  input a\n  input b\n  mix e\n  dropout 0.1\n  input c\n}\n"


def test_long_block_goes_multiline() -> None:
    fields = ", ".join(f'"field_{i}"' for i in range(10))
    printed = print_spec(parse(f"embedding emb {{ dim 8  fields [{fields}] }}"))
    assert printed == f"embedding emb {{\n  dim 8\n  fields [{fields}]\n}}\n"


def test_width_counts_indentation_inside_levels() -> None:
    block = f"experts e {{ activation {'a' * 75} }}"  # exactly 100 columns
    assert print_spec(parse(block)) == block + "\n"
    nested = print_spec(parse(f"levels 1 {{ {block} }}"))  # 102 columns when indented
    assert nested == f"levels 1 {{\n  experts e {{\n    activation {'a' * 75}\n  }}\n}}\n"


def test_empty_blocks_and_empty_spec() -> None:
    assert print_spec(s.Spec(())) == ""
    assert print_spec(parse("# only a comment\n")) == ""
    assert print_spec(parse("embedding e {} tower per task {} levels 3 {} train {}")) == (
        "embedding e {}\n\ntower per task {}\n\nlevels 3 {}\n\ntrain {}\n"
    )
    assert print_spec(parse("experts e { mlp [] } embedding f { fields [] }")) == (
        "experts e { mlp [] }\n\nembedding f { fields [] }\n"
    )


@pytest.mark.parametrize(
    ("text", "printed"),
    [
        ("embedding e { }", "embedding e {}"),
        ("embedding e shared { }", "embedding e shared {}"),
        ("embedding e per task { }", "embedding e per task {}"),
        ("embedding e for ctr { }", "embedding e for ctr {}"),
        ("gate g { mix e }", "gate g {\n  mix e\n}"),
        ("gate g { mix e forward }", "gate g {\n  mix e forward\n}"),
        ("gate g { mix e backward forward }", "gate g {\n  mix e backward forward\n}"),
        ("gate g { mix e[cvr] forward forward }", "gate g {\n  mix e[cvr] forward forward\n}"),
        ("task a regression label \"x y\" * z", 'task a regression label "x y" * z'),
        ("data \"data/ali ccp\"", 'data "data/ali ccp"'),
        ("data ali_ccp", "data ali_ccp"),
        ("model m", "model m"),
        ("loss a weight 2 label b where c", "loss a weight 2 label b where c"),
        ("loss a where c label b weight 2.5", "loss a weight 2.5 label b where c"),
        (
            "experts e { dropout 1 dropout 1. dropout .5 dropout 1E3 }",
            "experts e { dropout 1  dropout 1.0  dropout 0.5  dropout 1000.0 }",
        ),
        ("experts e { input concat(a) }", "experts e { input concat(a) }"),
        ("train { x 10000000000000000.0 y 0.000001 }", "train { x 1e+16  y 1e-06 }"),
    ],
)
def test_prints(text: str, printed: str) -> None:
    tree = parse(text)
    assert print_spec(tree) == printed + "\n"
    assert_same_tree(parse(printed), tree)


def test_infinity_is_no_value_of_a_spec() -> None:
    """No parse gives infinity (Note [Size limits]): the printer's spelling of it reads back as an error."""
    tree = s.Spec((s.LossDecl(s.NameRef("a"), math.inf),))
    assert print_spec(tree) == "loss a weight 1e999\n"
    result = parse_text(print_spec(tree))
    assert not isinstance(result, s.Spec) and "is too large: it is infinite" in result[0].message


def test_strings_are_escaped() -> None:
    doc = 'q"b\\n\nt\tcr\rnul\x00é#'
    tree = s.Spec((s.ModelDecl("m", doc),))
    assert print_spec(tree) == 'model m "q\\"b\\\\n\\nt\\tcr\rnul\x00é#"\n'
    assert_same_tree(parse(print_spec(tree)), tree)


@pytest.mark.parametrize(
    ("value", "printed"),
    [
        ("adam", "adam"),
        ("cvr.auc", "cvr.auc"),
        ("true_ctr.auc", "true_ctr.auc"),  # a name that starts like a boolean
        ("falsey", "falsey"),
        ("task", "task"),  # keywords lex as names where only a value can follow
        ("true", '"true"'),
        ("false", '"false"'),
        ("a b", '"a b"'),
        ("1x", '"1x"'),
        ("", '""'),
        ("a.", '"a."'),
        (True, "true"),
        (3, "3"),
        (3.0, "3.0"),
    ],
)
def test_train_values_print_bare_when_they_lex_as_names(value: object, printed: str) -> None:
    tree = s.Spec((s.TrainDecl((s.Prop("x", value),)),))
    assert print_spec(tree) == f"train {{ x {printed} }}\n"
    assert_same_tree(parse(print_spec(tree)), tree)


def _emb(value: object, key: str = "dim") -> s.Spec:
    return s.Spec((s.EmbeddingDecl("e", None, (s.Prop(key, value),)),))


@pytest.mark.parametrize(
    "tree",
    [
        _emb(-1),
        _emb(1.5),
        _emb(True),
        _emb(16, key="count"),
        _emb(s.FieldSel("all", (s.Column("a"),)), key="fields"),
        s.Spec((s.ModelDecl("not a name"),)),
        s.Spec((s.ModelDecl("1st"),)),
        s.Spec((s.TaskDecl("t", "binry", s.LabelExpr((s.Column("c"),))),)),
        s.Spec((s.TaskDecl("t", TaskKind.binary, s.LabelExpr(())),)),
        s.Spec((s.OutputDecl("o", (s.NameRef("a"),)),)),
        s.Spec((s.LossDecl(s.NameRef("a"), math.nan),)),
        s.Spec((s.LossDecl(s.NameRef("a"), -0.0),)),
        s.Spec((s.LossDecl(s.NameRef("a"), -2),)),
        s.Spec((s.ExpertsDecl("e", s.Owner(s.OwnerKind.task), ()),)),
        s.Spec((s.ExpertsDecl("e", s.Owner(s.OwnerKind.shared, s.NameRef("t")), ()),)),
        _emb(s.InputExpr(s.InputOp.ref, (s.NameRef("a"), s.NameRef("b"))), key="input"),
        s.Spec((s.ExpertsDecl("e", None, (s.Prop("input", s.InputExpr(s.InputOp.sum, ())),)),)),
        s.Spec((s.GateDecl("g", None, (), (s.RouteDecl(s.NameRef("e"), s.Selector.task),)),)),
        s.Spec((s.GateDecl("g", None, (), (s.RouteDecl(s.NameRef("e"), flags=("both",)),)),)),
        s.Spec((s.LevelsDecl(2, (s.TowerDecl(None, ()),)),)),
        s.Spec((s.TrainDecl((s.Prop("lr", None),)),)),
        s.Spec((s.TrainDecl((s.Prop("lr", math.nan),)),)),
    ],
    ids=repr,
)
def test_unprintable_trees_raise(tree: s.Spec) -> None:
    with pytest.raises(ValueError):
        print_spec(tree)


def test_format_file_drops_comments(tmp_path: Path) -> None:
    path = tmp_path / "m.mtl"
    path.write_text("# header\nmodel m  # trailing\n\n\n\ndata d\r\n")
    assert format_file(path) == "model m\ndata d\n"


def test_format_file_raises_on_a_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.mtl"
    path.write_text("model m\ntask ctr binry label click\n")
    with pytest.raises(SpecError, match="bad.mtl:2:10: error: unexpected 'binry'"):
        format_file(path)
