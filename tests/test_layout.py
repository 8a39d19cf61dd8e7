"""The package's shape (STYLE.md, Layout): one job per module, checked by its proxies.

No module of mtldsl/ over 800 lines, no function over 120, no import cycle inside the package (lazy
imports inside functions included), validation never parses the source, the front end never imports
torch, and every `Note [Title]` a comment refers to is written down somewhere.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mtldsl"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 120
FRONT_END = ("diagnostics", "vocab", "names", "resources", "sources", "size", "syntax_errors", "syntax", "parser", "printer", "ir", "lower", "graph", "validate",
             "codegen", "pipeline", "catalog")


def _name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: list[Path] = MODULES, root: Path = ROOT) -> set[str]:
    """Modules among `modules` that `path` imports anywhere in its body (lazy imports too)."""
    known = {_name(p, root) for p in modules}
    own = _name(path, root)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            submodules = {f"{module}.{a.name}" for a in node.names} & known
            found |= submodules or ({module} & known)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & known
    return found - {own}


def _cycles(modules: list[Path] = MODULES, root: Path = ROOT) -> list[list[str]]:
    """Import cycles, leaving out a package and its own submodules (cli/__init__ registers cli/run's commands)."""
    graph = nx.DiGraph()
    for path in modules:
        graph.add_edges_from((_name(path, root), target) for target in _imports(path, modules, root))
    return [c for c in nx.simple_cycles(graph)
            if not all(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:] + c[:1]))]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_and_functions_are_small(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.name}: split it by job"
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(text))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_import_cycle() -> None:
    assert not _cycles(), "import cycles"


def test_the_cycle_check_can_fail(tmp_path: Path) -> None:
    """Two modules that import each other, one of them lazily, make a cycle."""
    (tmp_path / "mtldsl").mkdir()
    a, b = tmp_path / "mtldsl" / "a.py", tmp_path / "mtldsl" / "b.py"
    a.write_text("def f():\n    from .b import g\n")
    b.write_text("from . import a\n")
    assert [sorted(c) for c in _cycles([a, b], tmp_path)] == [["mtldsl.a", "mtldsl.b"]]
    b.write_text("import os\n")
    assert _cycles([a, b], tmp_path) == []


def test_validation_never_parses() -> None:
    """Positions come from the IR (Note [Spans in the IR]); validate.py never reads the source again."""
    validate = PACKAGE / "validate.py"
    assert not ({"mtldsl.parser", "mtldsl.printer"} & _imports(validate))
    text = validate.read_text(encoding="utf-8")
    assert not re.search(r"^\s*(import|from)\s+(lark|re)\b", text, re.M)


def test_front_end_never_imports_torch() -> None:
    for name in FRONT_END:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text(encoding="utf-8"))
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "torch" not in imported and "runtime" not in imported, name


def test_every_note_referred_to_is_written() -> None:
    sources = [*MODULES, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "templates").glob("*.j2")),
               *sorted((ROOT / "benchmarks").glob("*.py"))]
    written: set[str] = set()
    referred: dict[str, str] = {}
    for path in sources:
        for line in path.read_text(encoding="utf-8").splitlines():
            heading = re.match(r"\s*(?:#+\s*)?Note \[([^\]]+)\](?::|\s*$)", line)  # a line that opens with it
            if heading:
                written.add(heading.group(1))
            for title in re.findall(r"Note \[([^\]]+)\]", line):
                referred.setdefault(title, path.name)
    missing = {t: where for t, where in referred.items() if t not in written}
    assert not missing, f"Notes referred to but never written: {missing}"


def test_readme_layout_names_every_module() -> None:
    """README's Layout section names each module of mtldsl/, and names none that is gone."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout"):]
    named = set(re.findall(r"`(?:cli/)?([a-z_]+)(?:\.py)?`", layout.split("\n## ")[0]))
    modules = {p.stem for p in MODULES if not p.stem.startswith("__")}
    assert modules <= named, f"not in README's Layout: {sorted(modules - named)}"
    folders = {p.name for p in ROOT.iterdir() if p.is_dir()}
    benchmarks = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    assert named <= modules | folders | benchmarks, \
        f"README's Layout names what is not there: {sorted(named - modules - folders - benchmarks)}"
