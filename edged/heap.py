"""The supervisor's C heap: keep big freed buffers out of RSS (glibc only; a no-op elsewhere).

Big MQTT payloads pass through paho's buffers on the C heap. glibc raises its mmap
threshold after the first big free and then keeps freed pages (FIELD-NOTES: 82 MiB
kept, 12 MiB after malloc_trim), so RSS would not come back after a burst.
"""
from __future__ import annotations

from typing import Any


def _libc() -> Any:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only; musl has none
    except OSError:
        return None


_LIBC = _libc()
M_MMAP_THRESHOLD = -3


def pin_mmap_threshold(nbytes: int = 256 << 10) -> None:
    """Serve every malloc above nbytes by mmap, so a freed frame-sized buffer goes straight back to the kernel.

    glibc raises its mmap threshold after the first big free (up to 32 MiB), after
    which MB-sized MQTT payloads live on the heap and stay in RSS; a fixed threshold
    stops that drift.
    """
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(M_MMAP_THRESHOLD, nbytes)


def trim() -> None:
    """Give the heap's free pages back to the kernel (malloc_trim)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
