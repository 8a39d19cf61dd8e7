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


HEAP = """
import json, torch
from mtldsl.runtime.host import keep_freed_memory

def heap() -> int:  # bytes of the main arena's heap ([heap] in /proc/self/maps)
    with open("/proc/self/maps") as f:
        spans = [line.split()[0].split("-") for line in f if line.rstrip().endswith("[heap]")]
    return sum(int(b, 16) - int(a, 16) for a, b in spans)

def grows(mib: int) -> tuple[int, int]:  # the heap's growth for a block of `mib` MiB, and once it is freed
    before = heap()
    block = torch.ones(mib << 18)
    held = heap() - before
    del block
    return held, heap() - before

got = {"default": grows(24)}
got["set"] = keep_freed_memory()
got["kept"] = grows(28)  # above the 24 MiB glibc raised its threshold to when the first block was freed
print(json.dumps(got))
"""


@glibc
def test_a_freed_block_stays_in_the_heap_for_the_next_step() -> None:
    out = subprocess.run([sys.executable, "-c", HEAP], check=True, capture_output=True, text=True, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["default"][0] < 4 << 20, got  # glibc's defaults: a fresh mmap of its own, given back when freed
    assert got["set"]
    held, after_free = got["kept"]
    assert held >= 24 << 20 and after_free >= 24 << 20, got  # from the heap (less what it had free), kept once freed
