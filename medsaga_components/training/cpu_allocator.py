"""CPU training without a page-fault storm: glibc keeps freed memory for reuse.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mapping
and unmaps it when the tensor is freed, so each step's large activations are paid for again
with one page fault per 4 KiB. The default medsaga bundle run (LiteMedSAM at 256 px, batch 2,
memory-efficient mode) counted 236 million minor page faults and spent 28 % of its CPU time in
the kernel. With :func:`keep_freed_cpu_memory` every allocation comes from the heap and freed
memory stays there for the next step: 0.5 million faults, and the run took 11 min 31 s instead
of 16 min 8 s. The memory is not handed back between steps, so peak RSS can move either way:
that run peaked at 2.02 GB instead of 2.38 GB, while at batch 4 (``medsaga benchmark
--cpu_allocator heap``) the kept heap fragments and the memory-efficient mode peaked at 2,798
MiB instead of 2,452 MiB. Bundles expose it as ``keep_freed_cpu_memory`` (true by default).
"""

from __future__ import annotations

import ctypes
import logging
import sys

from medsaga_components.config_values import as_bool

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# freed memory kept at the heap's top (``medsaga benchmark --cpu_allocator heap`` sets the same)
TRIM_THRESHOLD_BYTES = 1 << 30


def keep_freed_cpu_memory(enabled: bool = True, trim_threshold_bytes: int = TRIM_THRESHOLD_BYTES) -> bool:
    """Make glibc serve all allocations from its heap and keep up to ``trim_threshold_bytes``
    of freed memory at the heap's top instead of returning it to the system.

    Returns True when glibc took the settings; False when ``enabled`` is False or the C library
    is not glibc (then nothing changes). The settings last for the rest of the process; call
    it once, before training, in a process that trains (not in a long-lived server, which
    would then keep its peak memory).
    """
    if not as_bool(enabled, "keep_freed_cpu_memory") or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    taken = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold_bytes)) == 1
    if taken:
        logger.info("CPU allocator: freed memory kept for reuse (glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=%d)",
                    trim_threshold_bytes)
    return taken
