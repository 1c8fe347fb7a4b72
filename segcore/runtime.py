"""Process-level settings for long-running inference on CPU.

glibc's malloc serves requests below a *dynamic* mmap threshold (which climbs to 32 MiB after the
first large free) from per-thread arenas, and keeps that memory after it is freed. A server that
decodes a 15 MiB volume in one thread and runs the model in another then holds on to every such
buffer: resident memory ratchets up request after request. Fixing the threshold sends every
buffer over it straight to mmap, so freeing it returns it to the kernel, and memory goes back to
baseline after each request. On this CPU the U-Net ran no slower with it (docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def bound_malloc(mmap_threshold: int = 4 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Fix glibc's mmap and trim thresholds (once per process); False where libc is not glibc."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    _done = ok
    if not ok:
        log.warning("mallopt refused the malloc thresholds; memory may not return to baseline between requests")
    return ok
