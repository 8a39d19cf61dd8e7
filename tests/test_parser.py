"""The parser: spans, every grammar rule and alias, syntax-error text, comments, the shipped specs."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtldsl import syntax as s
from mtldsl.diagnostics import Diagnostic, Span
from mtldsl.parser import _lark, parse_file, parse_text
from mtldsl.vocab import TaskKind

SPECS = Path(__file__).resolve().parent.parent / "specs"


def parse(text: str) -> s.Spec:
    result = parse_text(text)
    assert isinstance(result, s.Spec), "\n".join(d.render() for d in result)
    return result


def assert_same(got: object, want: object) -> None:
    assert got == want
    assert repr(got) == repr(want)  # `==` alone takes 1 == 1.0 == True


def N(name: str) -> s.NameRef:  # noqa: N802 - short constructors keep the table readable
    return s.NameRef(name)


def L(*columns: str | s.Column) -> s.LabelExpr:  # noqa: N802
    return s.LabelExpr(tuple(c if isinstance(c, s.Column) else s.Column(c) for c in columns))


def Q(name: str) -> s.Column:  # noqa: N802
    return s.Column(name, quoted=True)


def P(key: str, value: object) -> s.Prop:  # noqa: N802
    return s.Prop(key, value)


def ref(name: str) -> s.InputExpr:
    return s.InputExpr(s.InputOp.ref, (N(name),))


SHARED = s.Owner(s.OwnerKind.shared)
PER_TASK = s.Owner(s.OwnerKind.per_task)


# ---- spans ------------------------------------------------------------------------------------

SPANNED = """\
model m "doc"
task ctr binary label click
gate g for ctr {
  input sum(a, b)
  mix experts[own] forward
}
"""


def test_spans_are_one_based_and_end_exclusive() -> None:
    spec = parse(SPANNED)
    model, task, gate = spec.items
    assert isinstance(model, s.ModelDecl) and isinstance(task, s.TaskDecl) and isinstance(gate, s.GateDecl)
    assert spec.span == Span(1, 1, 6, 2)
    assert model.span == Span(1, 1, 1, 14)
    assert task.span == Span(2, 1, 2, 28)
    assert task.label.span == Span(2, 23, 2, 28)
    assert task.label.columns[0].span == Span(2, 23, 2, 28)
    assert gate.span == Span(3, 1, 6, 2)  # a block spans its lines, up to and including `}`
    assert gate.owner is not None and gate.owner.span == Span(3, 8, 3, 15)
    assert gate.owner.task is not None and gate.owner.task.span == Span(3, 12, 3, 15)
    prop = gate.props[0]
    assert prop.span == Span(4, 3, 4, 18)
    assert isinstance(prop.value, s.InputExpr)
    assert prop.value.span == Span(4, 9, 4, 18)
    assert [r.span for r in prop.value.refs] == [Span(4, 13, 4, 14), Span(4, 16, 4, 17)]
    route = gate.routes[0]
    assert route.span == Span(5, 3, 5, 27)
    assert route.group.span == Span(5, 7, 5, 14)


def test_declared_names_and_train_values_have_their_own_spans() -> None:
    """What validate.py points at (Note [Spans in the IR]): the name of a declaration, a train value."""
    spec = parse(SPANNED + "output o = ctr * cvr\nembedding emb { dim 8 }\nexperts x {}\ntrain { monitor  ctr.auc }\n")
    model, task, gate, output, emb, experts, train = spec.items
    assert isinstance(model, s.ModelDecl) and model.name_span == Span(1, 7, 1, 8)
    assert isinstance(task, s.TaskDecl) and task.name_span == Span(2, 6, 2, 9)
    assert isinstance(gate, s.GateDecl) and gate.name_span == Span(3, 6, 3, 7)
    assert isinstance(output, s.OutputDecl) and output.name_span == Span(7, 8, 7, 9)
    assert isinstance(emb, s.EmbeddingDecl) and emb.name_span == Span(8, 11, 8, 14)
    assert isinstance(experts, s.ExpertsDecl) and experts.name_span == Span(9, 9, 9, 10)
    assert isinstance(train, s.TrainDecl) and train.props[0].value_span == Span(10, 18, 10, 25)


def test_spans_count_tabs_as_one_column() -> None:
    task = parse("\ttask ctr binary label click").items[0]
    assert isinstance(task, s.TaskDecl)
    assert task.span == Span(1, 2, 1, 29)


# ---- every rule and alias ---------------------------------------------------------------------

RULES: list[tuple[str, tuple[s.Item, ...]]] = [
    ("", ()),
    ("model m", (s.ModelDecl("m"),)),
    ('model m "A \\"quoted\\" doc\\\\ \\n\\t"', (s.ModelDecl("m", 'A "quoted" doc\\ \n\t'),)),
    ('model m "raw\ttab, CR\r, NUL\x00 are themselves"', (s.ModelDecl("m", "raw\ttab, CR\r, NUL\x00 are themselves"),)),
    ("data synthetic", (s.DataDecl("synthetic"),)),
    ('data "data/ali ccp"', (s.DataDecl("data/ali ccp", is_path=True),)),
    ("task ctr binary label click", (s.TaskDecl("ctr", TaskKind.binary, L("click")),)),
    (
        'task t regression label "101" * b where c * "d"',
        (s.TaskDecl("t", TaskKind.regression, L(Q("101"), "b"), L("c", Q("d"))),),
    ),
    ("output ctcvr = ctr * cvr", (s.OutputDecl("ctcvr", (N("ctr"), N("cvr"))),)),
    (
        "output o = a * b * c label x * y where z",
        (s.OutputDecl("o", (N("a"), N("b"), N("c")), L("x", "y"), L("z")),),
    ),
    ("loss ctr", (s.LossDecl(N("ctr")),)),
    ("loss ctr weight 2", (s.LossDecl(N("ctr"), 2),)),
    ("loss ctr weight 0.5", (s.LossDecl(N("ctr"), 0.5),)),
    ("loss ctr where c label a * b weight 1.0", (s.LossDecl(N("ctr"), 1.0, L("a", "b"), L("c")),)),
    ("loss ctr weight 1 weight 3", (s.LossDecl(N("ctr"), 3),)),  # the last wins (nothing reports the repeat yet)
    ("embedding e { }", (s.EmbeddingDecl("e", None, ()),)),
    ("embedding e shared { dim 16 }", (s.EmbeddingDecl("e", SHARED, (P("dim", 16),)),)),
    (
        "embedding e per task { fields all  dense [] }",
        (s.EmbeddingDecl("e", PER_TASK, (P("fields", s.FieldSel("all")), P("dense", s.FieldSel(None, ())))),),
    ),
    (
        'embedding e for ctr { fields [a, "101"]  dense user  copies 4 }',
        (
            s.EmbeddingDecl(
                "e",
                s.Owner(s.OwnerKind.task, N("ctr")),
                (
                    P("fields", s.FieldSel(None, (s.Column("a"), Q("101")))),
                    P("dense", s.FieldSel("user")),
                    P("copies", 4),
                ),
            ),
        ),
    ),
    (
        'embedding beh { dim 8  fields [user, "109_14"]  pool mean }',
        (s.EmbeddingDecl("beh", None, (P("dim", 8), P("fields", s.FieldSel(None, (s.Column("user"), Q("109_14")))),
                                       P("pool", "mean"))),),
    ),
    ("embedding e { fields lists  pool sum }", (s.EmbeddingDecl("e", None, (P("fields", s.FieldSel("lists")),
                                                                           P("pool", "sum"))),)),
    (
        "experts x { count 2  input emb  mlp [256, 128]  activation relu  dropout 0.1  batch_norm true }",
        (
            s.ExpertsDecl(
                "x",
                None,
                (
                    P("count", 2), P("input", ref("emb")), P("mlp", (256, 128)), P("activation", "relu"),
                    P("dropout", 0.1), P("batch_norm", True),
                ),
            ),
        ),
    ),
    (
        "experts x shared { input sum(a, b)  mlp []  batch_norm false  dropout 0 }",
        (
            s.ExpertsDecl(
                "x",
                SHARED,
                (
                    P("input", s.InputExpr(s.InputOp.sum, (N("a"), N("b")))), P("mlp", ()),
                    P("batch_norm", False), P("dropout", 0),
                ),
            ),
        ),
    ),
    (
        "experts x { input concat(a) }",
        (s.ExpertsDecl("x", None, (P("input", s.InputExpr(s.InputOp.concat, (N("a"),))),)),),
    ),
    (
        "gate g per task { input emb  mix a  mix b[own] forward backward  batch_norm true"
        "  mix c[other] forward  mix d[cvr] backward }",
        (
            s.GateDecl(
                "g",
                PER_TASK,
                (P("input", ref("emb")), P("batch_norm", True)),
                (
                    s.RouteDecl(N("a")),
                    s.RouteDecl(N("b"), s.Selector.own, None, ("forward", "backward")),
                    s.RouteDecl(N("c"), s.Selector.other, None, ("forward",)),
                    s.RouteDecl(N("d"), s.Selector.task, N("cvr"), ("backward",)),
                ),
            ),
        ),
    ),
    ("tower per task { input g  mlp [64] }", (s.TowerDecl(None, (P("input", ref("g")), P("mlp", (64,)))),)),
    (
        "tower ctr { dropout 0.2  activation gelu }",
        (s.TowerDecl(N("ctr"), (P("dropout", 0.2), P("activation", "gelu"))),),
    ),
    ("transfer ctr -> cvr", (s.TransferDecl(N("ctr"), N("cvr"), ()),)),
    (
        "transfer ctr -> cvr { calibration 0.6  calibration 1 }",
        (s.TransferDecl(N("ctr"), N("cvr"), (P("calibration", 0.6), P("calibration", 1))),),
    ),
    (
        "levels 2 { experts e { count 1 }  gate g { mix e } }",
        (
            s.LevelsDecl(
                2, (s.ExpertsDecl("e", None, (P("count", 1),)), s.GateDecl("g", None, (), (s.RouteDecl(N("e")),)))
            ),
        ),
    ),
    (
        'train { lr 0.001  batch_size 1024  optimizer adam  monitor cvr.auc  name "x y"  amp true  tf32 false }',
        (
            s.TrainDecl(
                (
                    P("lr", 0.001), P("batch_size", 1024), P("optimizer", "adam"), P("monitor", "cvr.auc"),
                    P("name", "x y"), P("amp", True), P("tf32", False),
                )
            ),
        ),
    ),
    # A name that starts like a boolean is a name (BOOL used to match the prefix of `true_ctr`).
    (
        "train { monitor true_ctr.auc  mode falsey }",
        (s.TrainDecl((P("monitor", "true_ctr.auc"), P("mode", "falsey"))),),
    ),
    (
        "train { x 1e5  y 1.  z .5  w 007 }",  # 1e400 (infinite) is an error: tests/test_size.py
        (s.TrainDecl((P("x", 1e5), P("y", 1.0), P("z", 0.5), P("w", 7))),),
    ),
]


@pytest.mark.parametrize(("text", "items"), RULES, ids=[text[:40] for text, _ in RULES])
def test_rule(text: str, items: tuple[s.Item, ...]) -> None:
    assert_same(parse(text), s.Spec(items))


def test_rule_table_covers_every_rule_and_alias() -> None:
    """Every tree node the grammar can build (rule or `-> alias`) occurs in a RULES snippet."""
    grammar = _lark()
    nodes = {
        r.alias or r.origin.name
        for r in grammar.rules
        if not r.origin.name.startswith("_") and (r.alias or not r.options.expand1)
    }
    seen = {t.data for text, _ in RULES for t in grammar.parse(text).iter_subtrees()}
    assert nodes - seen == set()


# ---- syntax errors ----------------------------------------------------------------------------

ERRORS = [
    (
        "tower ctr { mlp [64, 32 }",
        """\
specs/x.mtl:1:25: error: unexpected '}'
   1 | tower ctr { mlp [64, 32 }
     |                         ^
  hint: expected ',' or ']'""",
    ),
    (
        "embedding e { fields [a, b,] }",
        """\
specs/x.mtl:1:28: error: unexpected ']'
   1 | embedding e { fields [a, b,] }
     |                            ^
  hint: expected a name or a string""",
    ),
    (
        "experts e { batch_norm yes }",
        """\
specs/x.mtl:1:24: error: unexpected 'yes'
   1 | experts e { batch_norm yes }
     |                        ^^^
  hint: expected true or false""",
    ),
    (
        "model m\ntask ctr binry label click",
        """\
specs/x.mtl:2:10: error: unexpected 'binry'
   2 | task ctr binry label click
     |          ^^^^^
  hint: did you mean 'binary'?""",
    ),
    (
        'model m "STEM-Net\ndata synthetic',
        """\
specs/x.mtl:1:9: error: unterminated string
   1 | model m "STEM-Net
     |         ^
  hint: strings end on the same line with '"'""",
    ),
    (
        "gate g per task {\n  input emb\n  mix experts\n",
        """\
specs/x.mtl:3:14: error: unexpected end of file
   3 |   mix experts
     |              ^
  hint: expected one of '[', 'activation', 'batch_norm', 'dropout', 'input', 'mix', 'mlp', '}', …""",
    ),
    (
        "task",
        """\
specs/x.mtl:1:5: error: unexpected end of file
   1 | task
     |     ^
  hint: expected a name""",
    ),
    (
        "gate g {\n  mix experts forward, backward\n}",
        """\
specs/x.mtl:2:22: error: unexpected ','
   2 |   mix experts forward, backward
     |                      ^
  hint: properties and route flags are separated by spaces, not commas""",
    ),
    (
        "embedding emb { dim 16; }",
        """\
specs/x.mtl:1:23: error: unexpected character ';'
   1 | embedding emb { dim 16; }
     |                       ^
  hint: statements end at the next keyword; no ';' is needed""",
    ),
    (
        "train { lr: 0.001 }",
        """\
specs/x.mtl:1:11: error: unexpected character ':'
   1 | train { lr: 0.001 }
     |           ^
  hint: write `key value` without ':'""",
    ),
    (
        "train { lr = 0.001 }",
        """\
specs/x.mtl:1:12: error: unexpected '='
   1 | train { lr = 0.001 }
     |            ^
  hint: write `key value` without '='""",
    ),
    (
        "loss ctr weight -1",
        """\
specs/x.mtl:1:17: error: unexpected character '-'
   1 | loss ctr weight -1
     |                 ^
  hint: expected a number or an integer""",
    ),
]


@pytest.mark.parametrize(("text", "rendered"), ERRORS, ids=[text[:30] for text, _ in ERRORS])
def test_syntax_error(text: str, rendered: str) -> None:
    result = parse_text(text, "specs/x.mtl")
    assert isinstance(result, list) and len(result) == 1  # LALR stops at the first error
    (diagnostic,) = result
    assert isinstance(diagnostic, Diagnostic) and diagnostic.is_error
    assert diagnostic.render() == rendered


# ---- comments and white space -----------------------------------------------------------------


def test_comments_and_white_space_are_ignored() -> None:
    messy = (
        "# header comment\r\n"
        'model m "a # is not a comment in a string"   # trailing comment\n'
        "\t\f\r\n\n"
        "embedding e{dim 16}# glued to a brace\n"
        "task ctr binary label\n\n   click   where # a comment between tokens\n c\n"
        "# the last line is a comment without a newline"
    )
    compact = 'model m "a # is not a comment in a string" embedding e { dim 16 } task ctr binary label click where c'
    assert_same(parse(messy), parse(compact))


def test_only_comments_is_an_empty_spec() -> None:
    assert_same(parse("# nothing\n   # here\n"), s.Spec(()))


# ---- shipped specs ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", sorted(SPECS.glob("*.mtl")), ids=lambda p: p.stem)
def test_shipped_spec_parses(spec: Path) -> None:
    source, result = parse_file(spec)
    assert isinstance(result, s.Spec), "\n".join(d.render() for d in result)
    assert source.path == str(spec)
    model = result.items[0]
    assert isinstance(model, s.ModelDecl) and model.name == spec.stem  # a spec is named like its model
