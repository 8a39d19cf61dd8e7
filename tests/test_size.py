"""Sizes before allocation (Note [Size limits]): the estimate is the generated module's parameter count,
every size has a limit that `check` enforces with a positioned error, and the model as a whole too."""

from __future__ import annotations

from pathlib import Path

import pytest

import mtldsl
from mtldsl.catalog import schema_for
from mtldsl.pipeline import check_text
from mtldsl.size import LIMITS, MAX_DIGITS, MAX_PARAMETERS

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.mtl"))
MMOE = (ROOT / "specs" / "mmoe.mtl").read_text()


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_estimate_is_the_built_parameter_count(spec: Path) -> None:
    checked = mtldsl.load_spec(spec)
    vocab = dict(schema_for(checked.model.data).vocab_sizes)
    model = mtldsl.build_model(checked, vocab_sizes=vocab)
    assert checked.size is not None and checked.size.embedding_rows_known
    assert checked.size.parameters == sum(p.numel() for p in model.parameters())


def _errors(text: str) -> list[str]:
    return [d.render() for d in check_text(text, "x.mtl").errors]


@pytest.mark.parametrize(("old", "new", "what"), [
    ("count 8", f"count {LIMITS['count'] + 1}", "count"),
    ("dim 16", f"dim {LIMITS['dim'] + 1}", "dim"),
    ("mlp [256, 128]", f"mlp [256, {LIMITS['width'] + 1}]", "layer width"),
])
def test_each_size_has_a_limit(old: str, new: str, what: str) -> None:
    errors = _errors(MMOE.replace(old, new, 1))
    assert len(errors) == 1 and f"{what} {LIMITS[what.split()[-1]] + 1} is above the limit" in errors[0], errors
    assert "docs/language.md" in errors[0]


def test_levels_above_the_limit_fail_fast() -> None:
    ple = (ROOT / "specs" / "ple.mtl").read_text().replace("levels 2", "levels 100000000")
    errors = _errors(ple)
    assert len(errors) == 1 and f"levels 100000000 is above the limit of {LIMITS['levels']}" in errors[0]


def test_a_literal_too_long_or_too_large_is_positioned() -> None:
    errors = _errors(MMOE.replace("count 8", "count " + "9" * 5000, 1))
    assert len(errors) == 1 and f"more than {MAX_DIGITS} digits" in errors[0] and ":12:" in errors[0]
    errors = _errors(MMOE.replace("loss ctr", "loss ctr weight 1e999", 1))
    assert len(errors) == 1 and "1e999 is too large" in errors[0] and "^^^^^" in errors[0]


def test_the_whole_model_has_a_limit() -> None:
    """Every size within its limit, the product above MAX_PARAMETERS: one error, at the largest block."""
    text = MMOE.replace("mlp [256, 128]", "mlp [32768, 32768]", 1).replace("count 8", "count 4", 1)
    errors = _errors(text)
    assert len(errors) == 1 and "above the limit of 1.0G parameters" in errors[0], errors
    assert "'experts' alone has" in errors[0] and "12 | experts experts shared" in errors[0]
    assert MAX_PARAMETERS == 10**9  # docs/language.md states this figure
