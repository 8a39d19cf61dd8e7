"""What a name may be, and the class name made from it; used by validate.py and codegen.py alike.

Takes a name as written in a spec (or made from one: an instance, a tower, a transfer module); gives
back `name_problem(name, local)`, why it cannot be an identifier in generated code, or None, and
`class_name(model_name)`, the generated module's class.
"""

from __future__ import annotations

import builtins
import keyword
import re

# Note [Safe names]
# ~~~~~~~~~~~~~~~~~
# Every name that reaches generated code matches NAME_PATTERN, is at most MAX_NAME_LENGTH long, has
# no '__' (Python's marker for special names), is not a Python keyword, not a torch.nn.Module
# attribute, not a name the generated code uses itself, and does not start with its local-variable
# prefix. The generated forward() binds every embedding, expert group and gate instance, task and
# derived output as a local variable (`emb_ctr = self.emb_ctr(sparse, None)`, `ctr = torch.sigmoid(...)`),
# so these share one namespace with each other, with `h_<task>` (a tower's input) and with the
# module's own names (`mix`, `torch`); towers (`self.tower_<task>`) and transfers
# (`self.transfer_<src>_<dst>`) are attributes only.
#
# validate.py reports every spec name, instance name, tower and transfer name that breaks the rule;
# codegen's `ident` filter re-checks every name it places into code with the same `name_problem`
# and refuses to emit one that fails, so a gap in validation is a CodegenError, never unsafe code.

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")
MAX_NAME_LENGTH = 64

# Public attributes of torch.nn.Module and of an instance (`training`), from torch 2.13:
# sorted(n for n in dir(torch.nn.Module()) if not n.startswith("_")). Hard-coded: the front end must not
# import torch. NN_MODULE_PREFIXES covers the families torch keeps growing.
NN_MODULE_ATTRIBUTES = frozenset({
    "T_destination", "add_module", "apply", "bfloat16", "buffers", "call_super_init", "children", "compile",
    "cpu", "cuda", "double", "dump_patches", "eval", "extra_repr", "float", "forward", "get_buffer",
    "get_extra_state", "get_parameter", "get_submodule", "half", "ipu", "load_state_dict", "modules", "mtia",
    "named_buffers", "named_children", "named_modules", "named_parameters", "parameters",
    "register_backward_hook", "register_buffer", "register_forward_hook", "register_forward_pre_hook",
    "register_full_backward_hook", "register_full_backward_pre_hook", "register_load_state_dict_post_hook",
    "register_load_state_dict_pre_hook", "register_module", "register_parameter",
    "register_state_dict_post_hook", "register_state_dict_pre_hook", "requires_grad_", "set_extra_state",
    "set_submodule", "share_memory", "state_dict", "to", "to_empty", "train", "training", "type", "xpu",
    "zero_grad",
})
NN_MODULE_PREFIXES = ("named_", "register_")

# Names the generated module uses itself: forward()'s argument and locals, the module's imports and
# functions (runtime/layers.py's standalone part), and builtins it may call.
GENERATED_NAMES = frozenset({
    "batch", "self", "sparse", "dense", "torch", "nn", "math", "mix", "super", "dict", "str", "int", "float",
    "len", "range", "zip", "list", "tuple", "object", "isinstance",
})
# Prefixes of the generated forward's own local variables: h_<task> is a tower's input.
GENERATED_PREFIXES = ("h_",)
# Words with a meaning of their own in a spec: `experts[own]`, `sum(...)`, `monitor mean.auc`.
LANGUAGE_NAMES = frozenset({"own", "other", "sum", "concat", "mean"})
SOFT_KEYWORDS = frozenset({"_", "case", "match", "type"})
# Classes a generated file defines or imports (runtime/layers.py's standalone part); the model's class
# name must differ: a model named `gate` would become `class Gate` and shadow the layer.
# The constants it defines are listed too: `a_c_t_i_v_a_t_i_o_n_s` makes the class `ACTIVATIONS`.
GENERATED_CLASSES = frozenset({"Tensor", "Module", "FusedEmbedding", "MLP", "BatchedExperts", "Gate", "Tower",
                               "InfoTransfer", "_Lookup",  # _Lookup: no spec name can make it, listed for the test
                               "ACTIVATIONS"})


def class_name(model_name: str) -> str:
    """`me_mmoe` -> `MeMmoe`: the generated module's class (validate.py checks it with class_problem)."""
    return "".join(part.capitalize() for part in model_name.split("_") if part) or "Model"


def class_problem(model_name: str) -> str | None:
    """Why the class made from a valid model name cannot be the generated class, or None: it completes
    "model name 'none' makes the class 'None', which {reason}". The transform capitalises, so a name
    that is safe in lower case may make a keyword (`none`, `true`, `false`), a builtin the generated
    code may call (`value_error` makes `ValueError`, which layers.py raises) or one of its own classes."""
    cls = class_name(model_name)
    if keyword.iskeyword(cls):
        return "is a Python keyword"
    if cls in dir(builtins):
        return "is a Python builtin"
    if cls in GENERATED_CLASSES:
        return "the generated code already uses"
    return None


def name_problem(name: str, local: bool = True) -> tuple[str, str | None] | None:
    """Why `name` cannot be an identifier in generated code, as (reason, hint), or None when it can.

    `local`: the generated forward binds the name as a local variable (block instances, tasks, outputs:
    everything but the model and the implied tower and transfer attributes), so it must not start with
    one of GENERATED_PREFIXES either (Note [Safe names]).

    The reason completes "task name 'x' {reason}": "is a Python keyword", "is longer than 64 characters".
    """
    if len(name) > MAX_NAME_LENGTH:
        return f"is longer than {MAX_NAME_LENGTH} characters", f"shorten it to at most {MAX_NAME_LENGTH} characters"
    if not NAME_PATTERN.fullmatch(name):
        fixed = re.sub(r"_+", "_", re.sub(r"[^a-z0-9_]", "_", name.lower())).strip("_")
        suggestion = f"; try '{fixed}'" if fixed and fixed != name and name_problem(fixed) is None else ""
        return "is not a valid name", "names are lower-case letters, digits and '_', starting with a letter" + suggestion
    if "__" in name:
        return "contains '__'", "'__' marks Python's special names; use a single '_'" + \
            (f", e.g. '{re.sub(r'_+', '_', name)}'" if name_problem(re.sub(r"_+", "_", name), local) is None else "")
    if keyword.iskeyword(name) or keyword.issoftkeyword(name) or name in SOFT_KEYWORDS:
        return "is a Python keyword", f"rename it, e.g. '{name}_1'"
    if name in NN_MODULE_ATTRIBUTES or name.startswith(NN_MODULE_PREFIXES):
        return "is a torch.nn.Module attribute", f"the generated module would shadow it; rename it, e.g. '{name}_1'"
    if name in GENERATED_NAMES:
        return "is a name the generated code uses", f"rename it, e.g. '{name}_1'"
    if name in LANGUAGE_NAMES:
        return "is a word of the language", f"rename it, e.g. '{name}_1'"
    if local and name.startswith(GENERATED_PREFIXES):
        return f"starts with '{name[:2]}', a prefix of the generated code's variables", \
            "the generated forward() names a tower's input h_<task>; rename it"
    return None
