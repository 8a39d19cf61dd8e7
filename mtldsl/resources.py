"""The files mtldsl ships besides its code: the grammar, the templates and the paper specs.

Gives `grammar_text()`, `template_text(name)` and `packaged_specs()` (name -> PackagedSpec), read with
importlib.resources from the data packages the wheel carries (Note [Packaged resources]). No torch.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

# Note [Packaged resources]
# ~~~~~~~~~~~~~~~~~~~~~~~~~
# grammars/, templates/ and specs/ stay at the top of the checkout (the required layout); pyproject.toml
# maps them to the packages mtldsl.grammars, mtldsl.templates and mtldsl.specs, so a wheel carries
# them inside mtldsl/ and an editable install finds them where they are. Everything reads them through
# importlib.resources here, never through a path relative to this file: that path exists in a
# checkout only. A packaged spec is known by its bare name (`ple`) and shown as `specs/ple.mtl`, its
# path in the checkout, so that compiling it from a wheel gives the bytes of generated/ple.py.

GRAMMARS = "mtldsl.grammars"
TEMPLATES = "mtldsl.templates"
SPECS = "mtldsl.specs"


class ResourceError(RuntimeError):
    """mtldsl's packaged files are not importable: an install that predates them, or a broken one."""


def _files(package: str) -> Traversable:
    try:
        return resources.files(package)
    except ModuleNotFoundError:
        raise ResourceError(f"mtldsl's packaged files ({package}) are missing: reinstall mtldsl "
                            "(`pip install -e .` in a checkout)") from None


def grammar_text() -> str:
    return _files(GRAMMARS).joinpath("mtl.lark").read_text(encoding="utf-8")


def template_text(name: str) -> str | None:
    """A template's text, or None when there is no such template (jinja2.FunctionLoader's contract)."""
    file = _files(TEMPLATES).joinpath(name)
    return file.read_text(encoding="utf-8") if file.is_file() else None


@dataclass(frozen=True)
class PackagedSpec:
    name: str  # `ple`
    display: str  # `specs/ple.mtl`: the path diagnostics and generated headers show
    description: str  # the model's doc string, or the spec's first comment line
    data: bytes


_DOC = re.compile(r'^\s*model\s+\w+\s+"([^"]*)"', re.M)


def _description(text: str) -> str:
    """The model's doc string (`model ple "PLE, 2 levels"`), else the spec's first comment line."""
    doc = _DOC.search(text)
    if doc:
        return doc[1]
    first = next((line for line in text.splitlines() if line.strip()), "")
    return first.lstrip("#").strip() if first.startswith("#") else ""


@functools.cache
def packaged_specs() -> dict[str, PackagedSpec]:
    """The shipped specs by bare name, in name order."""
    found: dict[str, PackagedSpec] = {}
    for file in sorted(_files(SPECS).iterdir(), key=lambda f: f.name):
        if file.is_file() and file.name.endswith(".mtl"):
            data = file.read_bytes()
            name = file.name.removesuffix(".mtl")
            found[name] = PackagedSpec(name, f"specs/{file.name}", _description(data.decode("utf-8")), data)
    return found
