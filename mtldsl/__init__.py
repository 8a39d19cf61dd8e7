"""mtldsl: a declarative language and compiler for multi-task recommendation models.

The Python API mirrors the CLI: `load_spec` (check), `compile_spec` (generate source),
`build_model` (instantiate the generated nn.Module). Importing mtldsl does not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .pipeline import Checked

__all__ = ["__version__", "build_model", "compile_spec", "load_module", "load_spec"]


def load_spec(path: str | Path, *, data_dir: str | None = None) -> Checked:
    """Parse, lower and validate a spec; raise SpecError listing every error."""
    from .pipeline import load_spec as _load

    return _load(path, data_dir=data_dir)


def _checked(spec: str | Path | Checked) -> Checked:
    from .pipeline import Checked

    return spec if isinstance(spec, Checked) else load_spec(spec)


def compile_spec(spec: str | Path | Checked) -> str:
    """The generated module's source text for a spec (path or checked spec)."""
    from .codegen import render

    from .diagnostics import SpecError

    checked = _checked(spec)
    if not checked.ok:  # a checked spec with errors never reaches a template
        raise SpecError(checked.diagnostics)
    assert checked.model is not None and checked.graph is not None
    return render(checked.model, checked.graph, checked.source.text)


def load_module(source: str, name: str = "mtldsl_generated") -> Any:
    """Execute generated source as a fresh module object (what `import generated.x` would give)."""
    import types

    module = types.ModuleType(name)
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)  # noqa: S102 - our own generated code
    return module


def build_model(spec: str | Path | Checked, vocab_sizes: Mapping[str, int] | int = 100, *,
                sparse_grad: bool = False) -> Any:
    """Compile a spec and instantiate its nn.Module; `vocab_sizes` may be one size for every field."""
    from .codegen import class_name

    checked = _checked(spec)
    assert checked.model is not None
    module = load_module(compile_spec(checked), f"mtldsl_{checked.model.name}")
    cls = getattr(module, class_name(checked.model.name))
    fields = (*cls.SPARSE_FIELDS, *getattr(cls, "LIST_FIELDS", ()))
    sizes = {f: vocab_sizes for f in fields} if isinstance(vocab_sizes, int) else dict(vocab_sizes)
    return cls(sizes, sparse_grad=sparse_grad)
