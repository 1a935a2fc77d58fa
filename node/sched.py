"""Ask the kernel for long time slices in a training process.

A busy site runs one training process per job, and a host of simulated sites runs dozens at
once (25 nodes on 2 cores in the end-to-end benchmark). With the default EEVDF slice (0.75 ms
times 1 + log2(CPUs)), each round of 25 ms of compute is cut into ~16 pieces with other
processes' in between, and each piece starts with cold L1/L2 caches: the same epochs cost
10-20% more CPU than in one process (measured in docs/performance.md). Training is batch work:
nobody waits for one of its milliseconds, so a long slice (Linux >= 6.12 takes
`sched_attr.sched_runtime` as the slice of a SCHED_OTHER task) costs nothing and lets each
process run its round mostly in one piece. The node processes keep the short default slice, so
they still preempt training at once when a message comes.

Only the calling thread is changed; threads and processes it starts later inherit the slice.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

TRAINING_SLICE_NS = 20_000_000  # 20 ms: a whole tiny-model round; the kernel clamps to 0.1-100 ms

_SYS_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}
_SCHED_OTHER = 0


def _sched_attr(slice_ns: int, nice: int) -> bytes:
    """struct sched_attr (VER1, 56 bytes): size, policy, flags, nice, priority, runtime,
    deadline, period, util_min, util_max."""
    return struct.pack("IIQiIQQQII", 56, _SCHED_OTHER, 0, nice, 0, slice_ns, 0, 0, 0, 0)


def ask_long_slice(slice_ns: int = TRAINING_SLICE_NS) -> bool:
    """Set this thread's slice to `slice_ns` (SCHED_OTHER, its nice kept); False where the kernel
    or the architecture cannot: the process then runs with the default slice, only slower."""
    number = _SYS_SCHED_SETATTR.get(platform.machine())
    if number is None:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(_sched_attr(slice_ns, os.getpriority(os.PRIO_PROCESS, 0)))
    return libc.syscall(number, 0, attr, 0) == 0

