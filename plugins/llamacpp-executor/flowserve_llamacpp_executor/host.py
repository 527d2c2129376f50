"""What the ``llamacpp`` executor sets up in its process: the CPUs its ggml threads use, and
glibc's handling of the large buffers each step allocates."""

from __future__ import annotations

import ctypes
import os
import sys


def instance_threads() -> int:
    """The CPUs this process may run on (its affinity: what a scaler gave the instance)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


#: Buffers from this size up get a mapping of their own, unmapped when freed (glibc's M_MMAP_THRESHOLD).
MMAP_THRESHOLD = 256 * 1024
_M_MMAP_THRESHOLD = -3


def unmap_large_buffers_when_freed() -> bool:
    """Have glibc map every allocation of ``MMAP_THRESHOLD`` bytes or more on its own, and so
    give it back to the system when it is freed; whether it could (not where libc is not glibc).

    glibc's default threshold rises to the size of the first large buffer freed (up to 32 MiB),
    after which it keeps such buffers in its heaps: a step's logits rows and the sampler's work
    tensors, megabytes each, then stay resident (measured: +49 MB RSS after 8 sampled steps of
    32 sequences, all of which ``malloc_trim`` returned; docs/llamacpp.md)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
