"""Process-wide settings of the host that training, inference and `data prepare` run faster with: glibc's
malloc thresholds.

`keep_freed_memory()` is called by train, evaluate and predict (trainer.py) and by prepare_ali_ccp; it is
idempotent, and a no-op where the C library is not glibc or where the user has set the thresholds through
the environment.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

# Note [Page faults]
# ~~~~~~~~~~~~~~~~~~
# PyTorch allocates CPU tensors with the C library's malloc. glibc serves blocks above M_MMAP_THRESHOLD with
# a fresh mmap and returns them to the kernel when they are freed, and it gives back the top of the heap once
# more than M_TRIM_THRESHOLD of it is free. Both thresholds start at 128 KiB and only creep up. A training
# step allocates and frees the same activations every time: (1024, 2048) bf16, 4 MiB, for MMoE's first
# expert layer. So every step faults the same pages in again: the kernel zeroes each 4 KiB page, ~3.9 us on
# this VM. The trainer took a median 511 minor faults a step on MMoE, a bare step loop 2,400. The time is
# charged to whichever op first writes the page, usually a copy_ or a GEMM's bias broadcast, and costs more
# than the faults' count says (the pages also arrive cold): MMoE trained at 30.0k samples/s with the fix
# against 24.1k without, PLE at 40.1k against 32.0k (medians of alternating processes, benchmarks/RESULTS.md).
#
# keep_freed_memory() fixes both thresholds: blocks up to MMAP_THRESHOLD (32 MiB, glibc's maximum on 64-bit)
# come from the heap, and freed heap memory is kept up to TRIM_THRESHOLD. The trainer's faults go to 0 a
# step after the first few. Peak RSS is unchanged (MMoE on 1M rows: 628 against 629 MB): a freed block is
# reused by the next step rather than returned. This is what LD_PRELOADing jemalloc or tcmalloc (PyTorch's
# CPU tuning advice) achieves, without a second allocator to install. A user who sets MALLOC_MMAP_THRESHOLD_,
# MALLOC_TRIM_THRESHOLD_ or glibc.malloc tunables in GLIBC_TUNABLES keeps their setting.

MMAP_THRESHOLD = 32 << 20  # bytes: blocks up to this size come from the heap (glibc's DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30  # bytes of free heap top kept before glibc returns it to the kernel

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
_done = False


def _user_set(env_name: str, tunable: str) -> bool:
    return env_name in os.environ or tunable in os.environ.get("GLIBC_TUNABLES", "")


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (Note [Page faults]), but not one the user set.

    False where the C library is not glibc or mallopt refuses; then the process keeps glibc's defaults.
    """
    global _done
    if _done:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
                (_M_TRIM_THRESHOLD, TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"))
    ok = True
    for param, value, env_name, tunable in settings:
        if not _user_set(env_name, tunable):
            ok = mallopt(param, value) == 1 and ok  # mallopt returns 1 on success
    _done = ok
    return ok
