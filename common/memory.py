"""Process memory policy: big buffers go back to the OS as soon as they are freed.

glibc serves allocations above its mmap threshold with mmap and unmaps them on free, but it
raises that threshold (up to 32 MB) every time such a block is freed; after a few 10 MB model
updates, every later one comes from the heap, which fragments and never shrinks. A service
folding a thousand updates then grows by hundreds of MB although it holds one. Fixing the
threshold at 1 MiB keeps the dynamic adjustment off (mallopt(3), M_MMAP_THRESHOLD).

`settle_collector`: the cyclic garbage collector of a long-lived service that imported torch
scans ~200,000 objects (its modules) at each full collection, ~0.05-0.2 s each, several times
a round at 10,000 nodes; they live as long as the process, so they are moved out of its scans.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

M_MMAP_THRESHOLD = -3


def release_large_buffers_to_os(threshold: int = 1024 * 1024) -> bool:
    """Fix glibc's mmap threshold; False where there is no glibc (musl, macOS): no change."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def settle_collector(young: int = 10_000) -> int:
    """Collect once, then freeze what is alive (imported modules, settings: it lives as long as
    the process) out of every later collection, and collect the young generation every `young`
    allocations instead of 700 (a service receiving thousands of messages a second allocates
    in bursts whose objects mostly die young). Returns the number of objects frozen."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(young, older, oldest)
    return gc.get_freeze_count()
