"""Hypothesis strategies: `spec_trees()` draws a syntax.Spec that is valid by construction; `architectures()`
draws the text of a spec that mostly passes `check` (for the compile property in tests/test_fuzz.py).

Every node type and every option the parser records appears: owners omitted, `shared`, `per task`,
`for T`; route selectors and flag sequences as written; quoted and unquoted columns; ints, floats
and booleans (as the parser reads them: at most MAX_DIGITS digits, finite); strings with every escape
and raw control characters. Names come from a small pool with the grammar's keywords removed; the
keywords are read from the grammar's string literals, so the pool stays in sync with the grammar.
"""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import strategies as st

from mtldsl import syntax as s
from mtldsl.size import MAX_DIGITS
from mtldsl.vocab import TaskKind

GRAMMAR = Path(__file__).resolve().parent.parent / "grammars" / "mtl.lark"


def grammar_keywords(grammar: str) -> frozenset[str]:
    """Identifier-shaped string literals of a Lark grammar (`"task"`, `"true"`, ...), comments ignored."""
    code = "\n".join(line.split("//", 1)[0] for line in grammar.splitlines())
    return frozenset(re.findall(r'"([A-Za-z_][A-Za-z0-9_]*)"', code))


KEYWORDS = grammar_keywords(GRAMMAR.read_text())

# Near misses of keywords on purpose: a lexer that matched a keyword as a prefix would split them.
_CANDIDATES = (
    "a", "b", "ctr", "cvr", "click", "purchase", "emb", "emb_shared", "experts", "g", "g_ctr", "bottom",
    "x1", "_tmp", "CamelCase", "all", "relu", "tasks", "per_task", "shared_experts", "forwarded",
    "backward_", "truth", "falsey", "true_ctr", "mixer", "owner", "fortune", "labels", "sums",
)
NAMES: tuple[str, ...] = tuple(n for n in _CANDIDATES if n not in KEYWORDS)

names = st.sampled_from(NAMES)
dotted_names = st.lists(names, min_size=2, max_size=3).map(".".join)
# Any text: the quote, backslash, newline and tab must be escaped, everything else stands for itself.
strings = st.text(st.sampled_from('ab1 "\\\n\t\r\x00#{}é') | st.characters(exclude_categories=("Cs",)), max_size=10)
# Literals the parser reads (Note [Size limits]): at most MAX_DIGITS digits, finite floats (1e400 is an error).
ints = st.integers(min_value=0, max_value=10**6) | st.integers(min_value=0, max_value=10**MAX_DIGITS - 1)
floats = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False).map(abs) | st.sampled_from(
    [0.0, 1.0, 1e-05, 1e16, 1.7976931348623157e308]
)
numbers = ints | floats


def _tuples(elements: st.SearchStrategy, min_size: int = 0, max_size: int = 3) -> st.SearchStrategy:
    return st.lists(elements, min_size=min_size, max_size=max_size).map(tuple)


name_refs = st.builds(s.NameRef, names)
columns = st.builds(s.Column, names, st.just(False)) | st.builds(s.Column, strings, st.just(True))
label_exprs = st.builds(s.LabelExpr, _tuples(columns, 1))
owners = st.sampled_from([None, s.Owner(s.OwnerKind.shared), s.Owner(s.OwnerKind.per_task)]) | st.builds(
    s.Owner, st.just(s.OwnerKind.task), name_refs
)
field_sels = st.builds(s.FieldSel, names) | st.builds(s.FieldSel, st.none(), _tuples(columns))
input_exprs = st.builds(s.InputExpr, st.just(s.InputOp.ref), _tuples(name_refs, 1, 1)) | st.builds(
    s.InputExpr, st.sampled_from([s.InputOp.sum, s.InputOp.concat]), _tuples(name_refs, 1)
)


def _prop(key: str, values: st.SearchStrategy) -> st.SearchStrategy[s.Prop]:
    return st.builds(s.Prop, st.just(key), values)


mlp_props = _prop("mlp", _tuples(ints)) | _prop("activation", names) | _prop("dropout", numbers) | _prop(
    "batch_norm", st.booleans()
)
input_props = _prop("input", input_exprs)
pool_modes = st.sampled_from(["sum", "mean", "max"]) | names  # lower.py checks the mode, the grammar takes any name
embedding_props = _prop("dim", ints) | _prop("fields", field_sels) | _prop("dense", field_sels) | _prop(
    "copies", ints) | _prop("pool", pool_modes)
experts_props = _prop("count", ints) | input_props | mlp_props
gate_props = input_props | mlp_props
tower_props = gate_props
train_values = numbers | st.booleans() | names | dotted_names | strings | st.sampled_from(sorted(KEYWORDS))

selectors = st.tuples(st.sampled_from([s.Selector.all, s.Selector.own, s.Selector.other]), st.none()) | st.tuples(
    st.just(s.Selector.task), name_refs
)
flags = _tuples(st.sampled_from(["forward", "backward"]))
routes = st.builds(
    lambda group, selector, flags: s.RouteDecl(group, selector[0], selector[1], flags), name_refs, selectors, flags
)

model_decls = st.builds(s.ModelDecl, names, st.none() | strings)
data_decls = st.builds(s.DataDecl, names, st.just(False)) | st.builds(s.DataDecl, strings, st.just(True))
kinds = st.sampled_from(list(TaskKind))
task_decls = st.builds(s.TaskDecl, names, kinds, label_exprs, st.none() | label_exprs)
output_decls = st.builds(s.OutputDecl, names, _tuples(name_refs, 2), st.none() | label_exprs, st.none() | label_exprs)
loss_decls = st.builds(s.LossDecl, name_refs, st.none() | numbers, st.none() | label_exprs, st.none() | label_exprs)
embedding_decls = st.builds(s.EmbeddingDecl, names, owners, _tuples(embedding_props))
experts_decls = st.builds(s.ExpertsDecl, names, owners, _tuples(experts_props, max_size=6))
gate_decls = st.builds(s.GateDecl, names, owners, _tuples(gate_props), _tuples(routes))
tower_decls = st.builds(s.TowerDecl, st.none() | name_refs, _tuples(tower_props))
transfer_decls = st.builds(s.TransferDecl, name_refs, name_refs, _tuples(_prop("calibration", numbers), max_size=2))
levels_decls = st.builds(s.LevelsDecl, ints, _tuples(experts_decls | gate_decls))
train_decls = st.builds(s.TrainDecl, _tuples(st.builds(s.Prop, names, train_values), max_size=5))

items = st.one_of(
    model_decls, data_decls, task_decls, output_decls, loss_decls, embedding_decls, experts_decls,
    gate_decls, tower_decls, transfer_decls, levels_decls, train_decls,
)


def spec_trees() -> st.SearchStrategy[s.Spec]:
    """A syntax.Spec the parser could have produced: any sequence of any statements."""
    return st.builds(s.Spec, _tuples(items, max_size=8))


# ---- architectures: spec text that mostly checks clean -----------------------------------------------

# Model names a user may well write, with the ones whose class name is reserved (`none` -> `None`).
MODEL_NAMES = ("m", "none", "true", "false", "value_error", "gate", "tower", "mlp", "tensor", "module", "int",
               "list", "type_error", "a_c_t_i_v_a_t_i_o_n_s", "fused_embedding", "my_model", "x_")
_ACTIVATIONS = ("relu", "leaky_relu", "sigmoid", "tanh", "gelu", "prelu")


@st.composite
def _mlp(draw: st.DrawFn, min_layers: int = 0) -> str:
    dims = draw(st.lists(st.integers(1, 6), min_size=min_layers, max_size=2))
    extra = draw(st.sampled_from(["", f"  activation {draw(st.sampled_from(_ACTIVATIONS))}", "  batch_norm true",
                                  "  dropout 0.1"]))
    return f"mlp [{', '.join(map(str, dims))}]{extra}"


@st.composite
def architectures(draw: st.DrawFn) -> str:
    """An MMoE/PLE/STEM/AITM-shaped spec on the synthetic dataset with drawn names, sizes and visibility."""
    model = draw(st.sampled_from(MODEL_NAMES))
    tasks = ["ctr", "cvr"][: draw(st.integers(1, 2))]
    lines = [f'model {model} "drawn"'] if draw(st.booleans()) or model == "m" else []
    lines += [f"task {t} binary label {lab}" for t, lab in zip(tasks, ["click", "purchase"])]
    dim = draw(st.integers(1, 4))
    per_task_emb = draw(st.booleans())
    lines.append(f"embedding emb shared {{ dim {dim}  fields {draw(st.sampled_from(['all', 'user', 'item']))} }}")
    if per_task_emb:
        lines.append(f"embedding emb_t per task {{ dim {dim}  fields all  dense all }}")
    width = draw(st.integers(1, 5))
    levels = draw(st.integers(1, 3)) if len(tasks) > 1 else 1
    flags = st.sampled_from(["", " forward", " forward backward"])
    body = [f"experts shared_x shared {{ count {draw(st.integers(1, 3))}  input emb  mlp [{width}] }}",
            f"experts own_x per task {{ count {draw(st.integers(1, 3))}  input {'emb_t' if per_task_emb else 'emb'}  "
            f"mlp [{width}] }}",
            f"gate g per task {{ input emb  mix shared_x{draw(flags)}  mix own_x[own]{draw(flags)}"
            + (f"  mix own_x[other]{draw(flags)}" if len(tasks) > 1 and draw(st.booleans()) else "")
            + f"  {draw(_mlp())} }}"]
    if levels > 1:
        body.append("gate gs shared { input emb  mix shared_x  mix own_x }")
        lines.append(f"levels {levels} {{\n  " + "\n  ".join(body) + "\n}")
    else:
        lines += body
    lines.append(f"tower per task {{ input g  {draw(_mlp())} }}")
    if len(tasks) > 1 and draw(st.booleans()):
        lines.append("transfer ctr -> cvr")
    if len(tasks) > 1 and draw(st.booleans()):
        lines.append("output ctcvr = ctr * cvr label click * purchase")
        lines.append("loss ctcvr")
    lines += [f"loss {t}" for t in tasks]
    return "\n".join(lines) + "\n"
