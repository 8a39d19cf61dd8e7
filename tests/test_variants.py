"""--set variants (workbench/variants.py, Note [Variant values]): syntax-tree edits printed by the printer."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtldsl.parser import parse_file, parse_text
from mtldsl.pipeline import check_text
from mtldsl.workbench.diff import diff_checked
from mtldsl.workbench.variants import SetError, expand, parse_set

SPECS = Path(__file__).resolve().parents[1] / "specs"


def _spec(name: str):  # type: ignore[no-untyped-def]
    return parse_file(SPECS / f"{name}.mtl")[1]


def test_grid_over_two_settings_in_order() -> None:
    variants = expand(_spec("stem"), "stem", [parse_set("experts_shared.count=1,2"),
                                              parse_set("g.experts[other]=forward,forward+backward")])
    assert [v.label for v in variants] == [
        "stem experts_shared.count=1 g.experts[other]=forward",
        "stem experts_shared.count=1 g.experts[other]=forward+backward",
        "stem experts_shared.count=2 g.experts[other]=forward",
        "stem experts_shared.count=2 g.experts[other]=forward+backward"]
    for v in variants:  # printed text parses back to the same tree and is a valid spec
        assert parse_text(v.text) == v.spec
        assert check_text(v.text).ok


def test_each_setting_changes_exactly_what_it_names() -> None:
    base = check_text((SPECS / "stem.mtl").read_text())
    cases = {
        "experts_shared.count=2": ["~ experts experts_shared: count 1 -> 2"],
        "experts.mlp=[64, 32]": ["~ experts experts_ctr: mlp [256, 128] -> [64, 32]",
                                 "~ experts experts_cvr: mlp [256, 128] -> [64, 32]"],
        "g.experts[other]=forward+backward": ["~ route experts_ctr -> gate g_cvr: forward only -> forward+backward",
                                              "~ route experts_cvr -> gate g_ctr: forward only -> forward+backward"],
        "g.experts[other]=off": ["- route experts_ctr -> gate g_cvr (forward only)",
                                 "- route experts_cvr -> gate g_ctr (forward only)"],
    }
    for text, expected in cases.items():
        (variant,) = expand(_spec("stem"), "stem", [parse_set(text)])
        assert [str(c) for c in diff_checked(base, check_text(variant.text))] == expected, text
    (user_side,) = expand(_spec("stem"), "stem", [parse_set("emb.fields=user"), parse_set("emb_shared.fields=user")])
    checked = check_text(user_side.text)
    assert checked.ok
    user = ", ".join(checked.model.embeddings[1].fields)
    assert len(checked.model.embeddings[1].fields) < len(base.model.embeddings[1].fields)
    assert [str(c) for c in diff_checked(base, checked)] == [
        f"~ embedding {t}: fields [{', '.join(base.model.embeddings[1].fields)}] -> [{user}]"
        for t in ("emb_ctr", "emb_cvr", "emb_shared")]


def test_a_new_route_and_a_declaration_inside_levels() -> None:
    (variant,) = expand(_spec("me_ple"), "me_ple", [parse_set("g.experts[other]=forward")])
    assert "mix experts[other] forward\n" in variant.text
    (deep,) = expand(_spec("ple"), "ple", [parse_set("specific.count=2")])
    assert "experts specific per task { count 2" in deep.text and check_text(deep.text).ok


def test_values_with_commas_inside_brackets() -> None:
    assert parse_set("experts.mlp=[64, 32],[16]").values == ("[64, 32]", "[16]")


@pytest.mark.parametrize(("text", "message"), [
    ("experts.count", "expected NAME.PROP=V1,V2"),
    ("experts.count=1,,2", "an empty value"),
])
def test_malformed_set(text: str, message: str) -> None:
    with pytest.raises(SetError, match=message):
        parse_set(text)


@pytest.mark.parametrize(("text", "message"), [
    ("experts.count=two", "--set experts.count=two: unexpected 'two' (expected an integer)"),
    ("emb.owner=everyone", "owner is shared or per_task"),
    ("g.input2=emb", "unknown property 'input2' of gate 'g' (did you mean 'input'?)"),
])
def test_bad_values_name_the_setting(text: str, message: str) -> None:
    with pytest.raises(SetError) as info:
        expand(_spec("stem"), "stem", [parse_set(text)])
    assert message in str(info.value)
