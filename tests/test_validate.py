"""validate.py: tests/bad/*.mtl beside the exact output of `mtldsl check`, shipped specs, single checks."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mtldsl import names
from mtldsl import validate as v
from mtldsl.diagnostics import Severity, render_all
from mtldsl.graph import build_graph
from mtldsl.lower import lower
from mtldsl.pipeline import resolve_schema
from mtldsl.parser import parse_text
from mtldsl.pipeline import Checked, check_text

ROOT = Path(__file__).resolve().parent.parent
BAD = ROOT / "tests" / "bad"
SPECS = ROOT / "specs"
BAD_SPECS = sorted(BAD.glob("*.mtl"))


def check_bad(path: Path) -> str:
    """What `mtldsl check tests/bad/NAME.mtl` prints from the repository root (`data "tests/data/shop"` is read there)."""
    rel = path.relative_to(ROOT).as_posix()
    with contextlib.chdir(ROOT):
        return render_all(check_text(path.read_text(encoding="utf-8"), rel).diagnostics) + "\n"


@pytest.mark.parametrize("spec", BAD_SPECS, ids=lambda p: p.stem)
def test_bad_spec(spec: Path, update_golden: bool) -> None:
    expected_file = spec.with_suffix(".err")
    actual = check_bad(spec)
    if update_golden:
        expected_file.write_text(actual, encoding="utf-8")
        return
    assert expected_file.exists(), f"missing {expected_file.name}: run `pytest --update-golden` and read it"
    expected = expected_file.read_text(encoding="utf-8")
    assert actual == expected, f"{expected_file.name} is stale: run `pytest --update-golden` and review the diff"


def test_bad_specs_come_in_pairs() -> None:
    assert len(BAD_SPECS) >= 35
    orphans = sorted(p.name for p in BAD.glob("*.err") if not p.with_suffix(".mtl").exists())
    assert not orphans, f"expected output without a spec: {orphans}"


@pytest.mark.parametrize("spec", BAD_SPECS, ids=lambda p: p.stem)
def test_bad_spec_is_reported_where_it_is(spec: Path) -> None:
    """Every bad spec yields a diagnostic, each span lies in the text and covers something."""
    text = spec.read_text(encoding="utf-8")
    with contextlib.chdir(ROOT):
        checked = check_text(text, spec.name)
    assert checked.diagnostics, "a bad spec must produce at least one diagnostic"
    for d in checked.diagnostics:
        assert d.span.within(text)
        assert d.message[:1] == d.message[:1].lower(), "messages start in lower case"


@pytest.mark.parametrize("spec", sorted(SPECS.glob("*.mtl")), ids=lambda p: p.stem)
def test_shipped_spec_is_clean(spec: Path) -> None:
    checked = check_text(spec.read_text(encoding="utf-8"), f"specs/{spec.name}")
    assert not checked.diagnostics, "a shipped spec has no errors and no warnings:\n" + render_all(checked.diagnostics)


@pytest.mark.parametrize("spec", sorted(SPECS.glob("*.mtl")), ids=lambda p: p.stem)
def test_validate_without_source(spec: Path) -> None:
    """The checks read positions from the IR alone: without the source text they still find nothing."""
    parsed = parse_text(spec.read_text(encoding="utf-8"))
    schema, problems = resolve_schema(parsed)
    model, diags = lower(parsed, schema)
    assert not problems
    assert not diags
    assert v.validate(model, build_graph(model), None) == []


def test_list_spec_is_clean_and_validates_without_source() -> None:
    """tests/golden/shop_lists.mtl pools list fields in every mode; positions come from the IR alone."""
    with contextlib.chdir(ROOT):
        checked = check_text((ROOT / "tests/golden/shop_lists.mtl").read_text(encoding="utf-8"), "shop_lists.mtl")
    assert not checked.diagnostics, render_all(checked.diagnostics)
    assert checked.model is not None and checked.graph is not None
    assert [(e.name, e.lists, e.weighted, e.pool.value if e.pool else None, e.width) for e in checked.model.embeddings] == [
        ("emb", ("clicked_items",), ("clicked_items",), "mean", 33), ("beh", ("109_14", "tags"), (), "mean", 16),
        ("clicks", ("clicked_items",), ("clicked_items",), "sum", 8), ("peak", ("tags", "109_14"), (), "max", 24)]
    assert v.validate(checked.model, checked.graph, None) == []


# ---- helpers -------------------------------------------------------------------------------------


def check(text: str) -> Checked:
    return check_text(textwrap.dedent(text), "t.mtl")


def messages(checked: Checked, severity: Severity | None = None) -> list[str]:
    return [d.message for d in checked.diagnostics if severity is None or d.severity is severity]


MMOE = """
    model t "test"
    task ctr binary label click
    task cvr binary label purchase
    embedding emb { dim 8  fields all }
    experts experts { count 2  input emb  mlp [16] }
    gate g per task { input emb  mix experts }
    tower per task { input g  mlp [8] }
    loss ctr
    loss cvr
"""


# ---- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ctr", "g_ctr", "x", "a1_b2", "experts_shared", "e" * 64])
def test_valid_names(name: str) -> None:
    assert names.name_problem(name) is None


@pytest.mark.parametrize("name, reason", [
    ("CTR", "is not a valid name"), ("_x", "is not a valid name"), ("__import__", "is not a valid name"),
    ("1x", "is not a valid name"), ("", "is not a valid name"), ("e" * 65, "is longer than 64 characters"),
    ("class", "is a Python keyword"), ("match", "is a Python keyword"), ("type", "is a Python keyword"),
    ("forward", "is a torch.nn.Module attribute"), ("training", "is a torch.nn.Module attribute"),
    ("state_dict", "is a torch.nn.Module attribute"), ("named_things", "is a torch.nn.Module attribute"),
    ("to", "is a torch.nn.Module attribute"), ("cuda", "is a torch.nn.Module attribute"),
    ("batch", "is a name the generated code uses"), ("torch", "is a name the generated code uses"),
    ("self", "is a name the generated code uses"), ("mix", "is a name the generated code uses"),
    ("sparse", "is a name the generated code uses"), ("h_ctr", "starts with 'h_'"),
    ("os_system__x", "contains '__'"), ("a__", "contains '__'"),
    ("own", "is a word of the language"), ("mean", "is a word of the language"),
])
def test_invalid_names(name: str, reason: str) -> None:
    problem = names.name_problem(name)
    assert problem is not None and problem[0].startswith(reason)


def test_module_attributes_are_current() -> None:
    """The hard-coded set covers every public attribute of this torch's nn.Module."""
    torch = pytest.importorskip("torch")
    public = {n for n in dir(torch.nn.Module()) if not n.startswith("_")}
    missing = sorted(n for n in public if n not in names.NN_MODULE_ATTRIBUTES and not n.startswith(names.NN_MODULE_PREFIXES))
    assert not missing, f"add to NN_MODULE_ATTRIBUTES: {missing}"


def test_validate_does_not_import_torch() -> None:
    code = ("import sys; from mtldsl.pipeline import check_file; c = check_file('specs/stem.mtl'); "
            "assert c.ok; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_doc_with_quotes_and_backslashes_is_allowed() -> None:
    """A doc may say anything on one line; escaping it is the code generator's job."""
    checked = check(MMOE.replace('"test"', r'"a \"quoted\" doc with \\ and \"\"\" and {{ }} # %s"'))
    assert checked.ok, render_all(checked.diagnostics)
    assert checked.model is not None and '"""' in checked.model.doc


@pytest.mark.parametrize("doc", [r'"line one\nimport os"', r'"a\tb"', '"\x0c\r form feed, carriage return"'])
def test_doc_with_control_characters_is_allowed(doc: str) -> None:
    """codegen writes the doc with repr(), so control characters cannot break out (tests/test_codegen.py)."""
    checked = check(MMOE.replace('"test"', doc))
    assert checked.ok, render_all(checked.diagnostics)


def test_model_class_name_must_not_shadow_generated_classes() -> None:
    checked = check(MMOE.replace('model t "test"', 'model fused_embedding "x"'))
    assert messages(checked) == ["model name 'fused_embedding' makes the class 'FusedEmbedding', which the generated "
                                 "code already uses"]


@pytest.mark.parametrize(("name", "cls", "reason"), [
    ("none", "None", "is a Python keyword"), ("true", "True", "is a Python keyword"),
    ("false", "False", "is a Python keyword"), ("value_error", "ValueError", "is a Python builtin"),
    ("a_c_t_i_v_a_t_i_o_n_s", "ACTIVATIONS", "the generated code already uses"),
])
def test_model_names_that_make_a_reserved_class(name: str, cls: str, reason: str) -> None:
    """The class-name transform capitalises: a safe lower-case name may make a reserved class name."""
    checked = check(MMOE.replace('model t "test"', f'model {name} "x"'))
    assert messages(checked) == [f"model name '{name}' makes the class '{cls}', which {reason}"]
    from_file = check_text(MMOE.replace('model t "test"\n', ""), f"specs/{name}.mtl")
    assert [d.message for d in from_file.errors] == \
        [f"model name '{name}', taken from the file name, makes the class '{cls}', which {reason}"]


def test_local_prefix_applies_to_instances_not_to_the_model() -> None:
    """`h` per task makes `h_ctr`, the generated name of the ctr tower's input; a model may be called h_x."""
    assert names.name_problem("h_x", local=False) is None
    per_task_h = MMOE.replace("experts experts {", "experts h per task {").replace("mix experts", "mix h")
    checked = check(per_task_h)
    assert messages(checked) == ["expert group 'h' makes an instance named 'h_ctr', which starts with 'h_', "
                                 "a prefix of the generated code's variables"]
    assert checked.diagnostics[0].hint == "rename 'h'"
    assert check(MMOE.replace('model t "test"', 'model h_x "test"')).ok


def test_tasks_and_blocks_share_one_namespace() -> None:
    """forward() binds both as local variables: a task 'ctr' would overwrite an embedding 'ctr'."""
    checked = check(MMOE.replace("embedding emb ", "embedding ctr ").replace("input emb ", "input ctr "))
    assert messages(checked) == ["embedding 'ctr' has the same name as task 'ctr'"]


def test_reserved_names_cover_the_generated_module() -> None:
    """Every name runtime/layers.py's standalone part defines is reserved (classes for the model's class name)."""
    import ast

    from mtldsl.codegen import CodegenError, class_name, standalone_layers

    tree = ast.parse(standalone_layers())
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            assert node.name in names.GENERATED_CLASSES, node.name
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                assert isinstance(target, ast.Name) and target.id in names.GENERATED_CLASSES, ast.dump(target)
        elif isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            assert names.name_problem(node.name) is not None, node.name
    for name in ("me_mmoe", "stem", "a_b2", "x_"):
        assert names.class_name(name) == class_name(name)
    with pytest.raises(CodegenError):  # codegen re-checks the model name (Note [Safe names])
        class_name("a__b")


def test_empty_embedding_is_reported() -> None:
    for sel in ("fields none", "fields []"):
        checked = check(MMOE.replace("fields all", sel))
        assert messages(checked) == ["embedding 'emb' yields no features"], sel


def test_instance_names_are_checked_once() -> None:
    """A per-task declaration whose name is bad is reported once, not once per instance."""
    checked = check(MMOE.replace("gate g per task", "gate Gate per task").replace("input g ", "input Gate "))
    assert messages(checked) == ["gate name 'Gate' is not a valid name"]


# ---- references, kinds, structure --------------------------------------------------------------


def test_unknown_block_in_a_per_task_tower_is_reported_once() -> None:
    checked = check(MMOE.replace("input g ", "input gg "))
    assert messages(checked) == ["tower per task reads unknown block 'gg'"]
    assert checked.diagnostics[0].hint == "did you mean 'g'?"


def test_esmm_cvr_without_direct_loss_is_legal() -> None:
    checked = check("""
        model esmm "ESMM"
        task ctr binary label click
        task cvr binary label purchase where click
        output ctcvr = ctr * cvr label click * purchase
        embedding emb { dim 8  fields all }
        tower per task { input emb  mlp [8] }
        loss ctr
        loss ctcvr
    """)
    assert not checked.diagnostics, render_all(checked.diagnostics)


def test_copies_feed_a_group_of_that_count_or_one() -> None:
    spec = """
        model me "ME"
        task ctr binary label click
        embedding emb { dim 8  fields all  copies 4 }
        experts experts { count COUNT  input emb  mlp [16] }
        gate g for ctr { input emb  mix experts }
        tower ctr { input g  mlp [8] }
        loss ctr
    """
    assert check(spec.replace("COUNT", "4")).ok
    assert check(spec.replace("COUNT", "1")).ok
    assert messages(check(spec.replace("COUNT", "2"))) == ["embedding 'emb' has 4 copies but expert group 'experts' has 2 experts"]


def test_bottom_with_count_one_feeds_a_tower_directly() -> None:
    shared_bottom = MMOE.replace("count 2", "count 1").replace("input g ", "input experts ")
    shared_bottom = shared_bottom.replace("gate g per task { input emb  mix experts }\n", "")
    checked = check(shared_bottom)
    assert not checked.diagnostics, render_all(checked.diagnostics)


def test_hand_written_stacking_outside_levels_is_legal() -> None:
    checked = check("""
        model stack "two hand-written layers"
        task ctr binary label click
        embedding emb { dim 8  fields all }
        experts e1 { count 2  input emb  mlp [16] }
        gate g1 for ctr { input emb  mix e1 }
        experts e2 { count 2  input g1  mlp [16] }
        gate g2 for ctr { input g1  mix e2 }
        tower ctr { input g2  mlp [8] }
        loss ctr
    """)
    assert not checked.diagnostics, render_all(checked.diagnostics)


def test_explicit_mean_auc_needs_a_binary_output() -> None:
    spec = """
        model reg "regression only"
        task watch regression label purchase
        embedding emb { dim 8  fields all }
        tower watch { input emb  mlp [8] }
        loss watch
    """
    assert check(spec).ok  # the default monitor is not the user's choice
    checked = check(spec + "train { monitor mean.auc }\n")
    assert messages(checked) == ["monitor 'mean.auc': auc needs a binary output, and every output is regression"]
    assert check(spec + "train { monitor mean.mse }\n").ok


# ---- gradient reachability -------------------------------------------------------------------------

FORWARD_ONLY = """
    model fwd "per-task experts mixed forward only"
    task ctr binary label click
    task cvr binary label purchase
    embedding emb { dim 8  fields all }
    embedding emb_own per task { dim 8  fields all }
    experts experts_shared { count 2  input emb  mlp [16] }
    experts experts per task { count 1  input emb_own  mlp [16] }
    gate g per task {
      input emb
      mix experts_shared
      mix experts[own] ROUTE
    }
    tower per task { input g  mlp [8] }
    loss ctr
    loss cvr
"""


def test_stop_gradient_leaves_per_task_experts_unreachable() -> None:
    checked = check(FORWARD_ONLY.replace("ROUTE", "forward"))
    assert checked.ok
    warnings = [d for d in checked.diagnostics if d.severity is Severity.warning]
    assert [d.message for d in warnings] == [
        "stop-gradient leaves embedding 'emb_own_ctr' unreachable by any loss",
        "stop-gradient leaves embedding 'emb_own_cvr' unreachable by any loss",
        "stop-gradient leaves expert group 'experts_ctr' unreachable by any loss",
        "stop-gradient leaves expert group 'experts_cvr' unreachable by any loss",
    ]
    experts_ctr = next(d for d in warnings if "experts_ctr" in d.message)
    assert experts_ctr.hint == "'g_ctr' mixes it `forward` only; add `backward` to one of those routes if it should learn"
    emb = next(d for d in warnings if "emb_own_ctr" in d.message)
    assert emb.hint == "it feeds only blocks that get no gradient: 'experts_ctr'"
    assert (experts_ctr.span.line, experts_ctr.span.column) == (8, 9)  # the name in `experts experts per task`


def test_full_gradient_has_no_warning() -> None:
    assert not check(FORWARD_ONLY.replace("ROUTE", "forward backward")).diagnostics


def test_unused_block_is_not_a_stop_gradient() -> None:
    checked = check(MMOE + "embedding spare { dim 8  fields user }\n")
    assert messages(checked) == ["embedding 'spare' is unused: no loss depends on it"]
    assert checked.ok


def test_gradient_warnings_wait_for_errors() -> None:
    """While the spec has errors, a missing edge would make every warning a consequence."""
    checked = check(FORWARD_ONLY.replace("ROUTE", "forward").replace("loss cvr", "loss cvrr"))
    assert messages(checked, Severity.warning) == []


# ---- API -------------------------------------------------------------------------------------------


def test_checks_run_on_model_and_graph_alone() -> None:
    parsed = parse_text(textwrap.dedent(MMOE.replace("mix experts", "mix exprts")))
    model, _ = lower(parsed)
    graph = build_graph(model)
    for check_fn in (*v.CHECKS, v.check_gradients):
        assert isinstance(check_fn(model, graph), list)
    found = v.check_references(model, graph)  # once per instance; validate() drops the repeat
    assert [d.message for d in found] == ["gate 'g' mixes unknown expert group 'exprts'",
                                          "gate 'g' mixes unknown expert group 'exprts'"]
    assert [(d.span.line, d.span.column) for d in found] == [(7, 34)] * 2  # `exprts`: the IR knows where


def test_ir_equality_ignores_spans() -> None:
    """Note [Spans in the IR]: the same spec laid out differently lowers to equal models."""
    a, b = check(MMOE).model, check("\n\n" + MMOE.replace("  ", " ")).model
    assert a is not None and b is not None
    assert a == b and hash(a) == hash(b)
    assert a.tasks[0].name_span != b.tasks[0].name_span
    assert a.gates[0].input.written[0].span != b.gates[0].input.written[0].span
