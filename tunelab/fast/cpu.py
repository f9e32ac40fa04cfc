"""Process settings that make training fast on a CPU: keep freed memory for reuse instead of unmapping it.

glibc serves allocations above its mmap threshold with fresh mmap()s and unmaps them on free, so every
large activation of every step page-faults its memory in again (a 100 MB fp32 chunk: ~90 ms of faults
for ~10 ms of work). Serving everything from the heap and not trimming it keeps freed pages mapped and
reused; together with THP_MEM_ALLOC_ENABLE (set in tunelab/__init__.py) this made a LoRA step on the
bundled model ~1.4x faster at a similar peak RSS (measured 5.9 GB vs 6.2 GB). Intel's CPU tuning guides
get the same effect by preloading jemalloc or tcmalloc; this needs neither.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys

import torch

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
MADV_NOHUGEPAGE = 15  # madvise advice (linux/mman.h)


@functools.cache
def _glibc():
    """The C library with glibc's malloc controls, or None (not Linux, musl, ...). Looked up once:
    `find_library` runs ldconfig, and `release_free_memory` is called after every micro-batch."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not all(hasattr(libc, f) for f in ("mallopt", "malloc_trim", "madvise")):
            return None
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """On glibc: no mmap for large blocks, no trimming of the heap below 1 GiB free. False elsewhere."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def release_free_memory() -> bool:
    """On glibc: give the heap's free pages back to the system (malloc_trim). False elsewhere."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


def no_huge_pages(t: torch.Tensor) -> bool:
    """Ask Linux to back the whole pages inside `t`'s memory with base (4 KiB) pages, before it is first touched.

    torch puts blocks of 2 MiB and more on transparent huge pages (THP_MEM_ALLOC_ENABLE). On a machine whose
    THP defrag setting is `madvise`, the first touch of each huge page may compact memory synchronously: a
    fresh 531 MB block took 1-2.7 s to fill here, against 0.13 s on small pages. For a block written once
    per micro-batch, like the activation arena, small pages are the cheaper choice. False where not possible."""
    libc = _glibc()
    if libc is None or t.device.type != "cpu":
        return False
    ptr, n = t.data_ptr(), t.untyped_storage().nbytes()
    page = mmap.PAGESIZE
    start, end = -(-ptr // page) * page, (ptr + n) // page * page
    return end > start and libc.madvise(start, end - start, MADV_NOHUGEPAGE) == 0
