"""Shared-memory segments for the frame pool: a memfd, mapped writable by its owner, sealed for everyone else.

Stdlib only (the supervisor stays light). A worker gets a read-only fd of a
sealed memfd: it can map and read the frames, never change or resize them.
"""
from __future__ import annotations

import fcntl
import logging
import mmap
import os

log = logging.getLogger("edged.pool")

# fcntl(2) memfd seals (linux/fcntl.h); the fcntl module lacks F_SEAL_FUTURE_WRITE (Linux 5.1)
_F_ADD_SEALS, _F_GET_SEALS = 1033, 1034
_F_SEAL_SEAL, _F_SEAL_SHRINK, _F_SEAL_GROW, _F_SEAL_FUTURE_WRITE = 0x1, 0x2, 0x4, 0x10
_warned_writable = False


def seal(fd: int) -> int:
    """Seal a mapped segment's memfd against its holders; return the fd to hand out (read-only if possible).

    Called after the pool's own writable mapping exists: F_SEAL_FUTURE_WRITE
    leaves that mapping writable and refuses write(), fallocate() and new
    writable shared mappings (and mprotect to writable) through any fd,
    even one a worker re-opens via /proc (a GPU worker may open files);
    F_SEAL_GROW/F_SEAL_SHRINK refuse every size change; F_SEAL_SEAL keeps
    the seals. The fd handed out is also a new read-only open file
    description (``/proc/self/fd/N``, O_RDONLY), so write and ftruncate on
    it fail with EBADF/EINVAL even on a kernel older than 5.1; the writable
    fd is closed. With neither (an old kernel and no /proc) segments stay
    writable by workers: logged once.
    """
    global _warned_writable
    fcntl.fcntl(fd, _F_ADD_SEALS, _F_SEAL_GROW | _F_SEAL_SHRINK)
    future_write = True
    try:
        fcntl.fcntl(fd, _F_ADD_SEALS, _F_SEAL_FUTURE_WRITE)
    except OSError:  # EINVAL before Linux 5.1
        future_write = False
    fcntl.fcntl(fd, _F_ADD_SEALS, _F_SEAL_SEAL)
    try:
        ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if not future_write and not _warned_writable:
            _warned_writable = True
            log.warning("pool segments stay writable by workers: no F_SEAL_FUTURE_WRITE (Linux < 5.1) and no "
                        "read-only reopen (%s)", exc)
        return fd
    os.close(fd)
    return ro


def segment(name: str, size: int) -> tuple[int, mmap.mmap]:
    """A new sealed segment of `size` bytes: (the fd to hand out, the owner's writable mapping)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    mm = None
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
        return seal(fd), mm
    except OSError:
        if mm is not None:
            mm.close()
        os.close(fd)
        raise
