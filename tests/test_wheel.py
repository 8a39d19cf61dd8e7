"""A real install (issue 9, part 1): the wheel carries the grammar, the templates and the paper specs
(Note [Packaged resources]), and the installed `mtldsl` checks and compiles from another folder.

Offline: the wheel is built from a copy of the checkout with `pip wheel --no-build-isolation` (setuptools
from the test extra), and installed with `--no-deps` into a fresh venv whose dependencies come from this
environment's site-packages through a .pth line (a path line only: this environment's editable install,
a .pth hook of its own, is not loaded there, so `import mtldsl` can only find the wheel's copy).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.name for p in (ROOT / "specs").glob("*.mtl"))


def _run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ folder of a fresh venv with the wheel of this checkout installed."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("mtldsl", "grammars", "templates", "specs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    dist = base / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(dist), str(src)], cwd=base)
    wheel = next(dist.glob("mtldsl-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert {"mtldsl/grammars/mtl.lark", "mtldsl/templates/model.py.j2", "mtldsl/templates/_blocks.py.j2"} <= names
    assert {f"mtldsl/specs/{n}" for n in SHIPPED} <= names

    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=base)
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=base)
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib.stdout.strip()) / "_mtldsl_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], cwd=base)
    return venv / "bin"


def test_the_wheel_is_what_runs(installed: Path, tmp_path: Path) -> None:
    found = _run([str(installed / "python"), "-c", "import mtldsl; print(mtldsl.__file__)"], cwd=tmp_path)
    assert Path(found.stdout.strip()).is_relative_to(installed.parent), found.stdout


def test_installed_check_and_compile_from_another_folder(installed: Path, tmp_path: Path) -> None:
    mtldsl = str(installed / "mtldsl")
    listed = _run([mtldsl, "specs"], cwd=tmp_path).stdout
    assert [line.split()[0] for line in listed.splitlines()] == [n.removesuffix(".mtl") for n in SHIPPED]
    assert "PLE, 2 levels" in listed

    checked = _run([mtldsl, "check", "stem", "ple"], cwd=tmp_path)
    assert "stem: ok (" in checked.stdout and "ple: ok (" in checked.stdout

    # A packaged spec compiles to the committed golden file, byte for byte.
    _run([mtldsl, "compile", "ple", "-o", "out"], cwd=tmp_path)
    assert (tmp_path / "out" / "ple.py").read_text() == (ROOT / "generated" / "ple.py").read_text()

    # A spec file of the user's own, by path, from a folder that is not the checkout.
    own = tmp_path / "mine" / "mmoe.mtl"
    own.parent.mkdir()
    shutil.copy(ROOT / "specs" / "mmoe.mtl", own)
    _run([mtldsl, "check", "mine/mmoe.mtl"], cwd=tmp_path)
    _run([mtldsl, "compile", "mine/mmoe.mtl", "-o", "out"], cwd=tmp_path)
    assert "class Mmoe(nn.Module)" in (tmp_path / "out" / "mmoe.py").read_text()

    bad = _run([mtldsl, "check", "nope"], cwd=tmp_path, check=False)
    assert bad.returncode == 1 and "nope: error: no such spec file" in bad.stderr and "Traceback" not in bad.stderr
