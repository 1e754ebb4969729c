"""run.malloc: glibc's allocator kept from handing pages back, in the training process and its data workers."""

from __future__ import annotations

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def tune_malloc(mode: str = "keep") -> bool:
    """mode "keep": make glibc's malloc serve every allocation from its heap and keep freed memory for reuse
    (`mallopt`: no mmap, a trim threshold of 1 GiB, the heap grown 64 MiB at a time; with only the first
    two, repeated 64 MiB tensors still faulted in most of their pages). Returns True if applied. Fork
    inherits the settings, so DataLoader workers started afterwards get them too.

    Why (bench/malloc.py; BENCHMARKS.md): by default glibc gives each allocation above its mmap threshold
    (at most 32 MiB) fresh pages and returns them on free, and it trims the heap. So every step's
    activations are faulted in and zero-filled again. For ResNet-50@224 training that was 404k page faults
    and ~1 s of system time per 2.1 s step; with "keep" it trains 1.65-1.72x faster. The cost: the process
    keeps its peak heap (its RSS does not shrink after a peak). "system" leaves glibc's defaults. Not
    glibc (macOS): nothing to do."""
    import ctypes
    import platform
    import sys

    if mode != "keep" or sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return all(libc.mallopt(param, value) == 1 for param, value in
               ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20)))
