"""runtime/host.py: glibc's malloc thresholds (Note [Page faults])."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from mtldsl.runtime import host

ROOT = Path(__file__).resolve().parents[1]
glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt is glibc's")


class FakeLibc:
    def __init__(self, result: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.result = result

        def mallopt(param: int, value: int) -> int:
            self.calls.append((param, value))
            return self.result

        self.mallopt = mallopt


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeLibc:
    libc = FakeLibc()
    monkeypatch.setattr(host, "_done", False)
    monkeypatch.setattr(host.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(host.platform, "system", lambda: "Linux")
    monkeypatch.setattr(host.platform, "libc_ver", lambda: ("glibc", "2.36"))
    for name in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    return libc


def test_both_thresholds_are_set_once(fake: FakeLibc) -> None:
    assert host.keep_freed_memory()
    assert fake.calls == [(-3, host.MMAP_THRESHOLD), (-1, host.TRIM_THRESHOLD)]
    assert host.keep_freed_memory()
    assert len(fake.calls) == 2  # idempotent


def test_a_users_setting_is_kept(fake: FakeLibc, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert host.keep_freed_memory()
    assert fake.calls == []
    monkeypatch.setattr(host, "_done", False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    assert host.keep_freed_memory()
    assert fake.calls == [(-1, host.TRIM_THRESHOLD)]


def test_refused_or_elsewhere_is_false(fake: FakeLibc, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.result = 0  # mallopt refused the value
    assert not host.keep_freed_memory()
    assert not host._done
    monkeypatch.setattr(host.platform, "libc_ver", lambda: ("", ""))  # musl, say
    fake.calls.clear()
    assert not host.keep_freed_memory()
    assert fake.calls == []


FAULTS = """
import json, resource, torch
from mtldsl.runtime.host import keep_freed_memory

def step():  # a sliding window of growing blocks, as a training step's activations are made and freed
    window = []
    for mib in (1, 2, 3, 4, 6, 8, 12):
        window.append(torch.ones(mib << 18))
        if len(window) > 2:
            window.pop(0)

def faults():
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
print(json.dumps({"default": default, "set": keep_freed_memory(), "kept": faults()}))
"""


@glibc
def test_freed_blocks_are_reused_without_faults() -> None:
    out = subprocess.run([sys.executable, "-c", FAULTS], check=True, capture_output=True, text=True, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["set"]
    assert got["default"] >= 1000, got  # glibc's defaults give 4 KiB pages back and fault them in again
    assert got["kept"] <= 16, got
