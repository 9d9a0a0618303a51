"""A compromised worker against the pool segments it maps (issue 17, point 2).

A real `edged.worker` subprocess, sandboxed as the daemon starts it, gets real
pool segments (the base one and a grown one) over its control socket. Code
loaded into it (the launcher below patches Worker.frame, as a hostile model or
decoder exploit would run code in that process) uses only what the sandbox
allows: write() on every fd that holds a segment, a writable shared mmap of
it, mprotect of its own read-only mapping to writable. Without the sandbox
(the GPU profile may open files) it also re-opens the fd writable through
/proc and tries ftruncate and fallocate. The supervisor side then checks that
host shared memory did not grow, that the frame in flight is byte for byte
what it was, and that the worker still serves it with the same answer.
"""
from __future__ import annotations

import hashlib
import os
import queue
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import BUNDLED, ROOT
from edged import protocol
from edged.pool import FramePool
from edged.workers import WorkerHandle

ATTACK = "application/x-edged-attack"

# Runs as the worker process: the real worker, with frame() patched to attack
# when a frame has the ATTACK content type. Everything it needs is imported
# and created before the filter goes on (it is loaded at start, like a model).
LAUNCHER = r'''
import ctypes, errno, mmap, os, stat, sys
import numpy as np
from edged import protocol, worker

ATTACK = "application/x-edged-attack"
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
SANDBOXED = sys.argv[2] == "1"
real_frame = worker.Worker.frame


def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))


def attack_fd(fd, size):
    out = {"size": size,
           "write": attempt(lambda: os.write(fd, b"\xee" * 4096)),  # at offset 0: over the first frame
           "mmap_shared_write": attempt(lambda: mmap.mmap(fd, size).close())}
    if not SANDBOXED:  # the filter kills these calls outright; unfiltered, the seals must refuse them
        out["ftruncate_grow"] = attempt(lambda: os.ftruncate(fd, size + (64 << 20)))
        out["ftruncate_shrink"] = attempt(lambda: os.ftruncate(fd, 4096))
        out["fallocate"] = attempt(lambda: os.posix_fallocate(fd, size, 64 << 20))
        out["pwrite_past_end"] = attempt(lambda: os.pwrite(fd, b"\xee" * 4096, size))
        try:
            rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        except OSError as exc:
            out["reopen_rw"] = errno.errorcode.get(exc.errno, str(exc.errno))
        else:
            out["reopen_rw"] = "ok"
            out["rw_write"] = attempt(lambda: os.write(rw, b"\xee" * 4096))
            out["rw_ftruncate"] = attempt(lambda: os.ftruncate(rw, size + (64 << 20)))
            out["rw_mmap_shared_write"] = attempt(lambda: mmap.mmap(rw, size).close())
            os.close(rw)
    return out


def attack(self, msg):
    report = {"fds": {}, "mprotect": {}}
    sizes = {len(m) for m in self.segments.values()}
    for fd in range(3, 256):
        if fd == self.sock.fileno():
            continue
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size in sizes:
            report["fds"][str(fd)] = attack_fd(fd, st.st_size)
    for seg_id, m in self.segments.items():
        addr = np.frombuffer(m, np.uint8).ctypes.data
        rc = libc.mprotect(addr, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE)
        report["mprotect"][str(seg_id)] = "ok" if rc == 0 else errno.errorcode.get(ctypes.get_errno(), "?")
        if rc == 0:
            libc.memset(addr, 0xEE, mmap.PAGESIZE)
    protocol.send(self.sock, protocol.Result(msg.seq, {"outputs": [report]}))


def frame(self, msg):
    if msg.content_type == ATTACK:
        return attack(self, msg)
    return real_frame(self, msg)


worker.Worker.frame = frame
os._exit(worker.main(sys.argv[:2]))
'''


class AttackingWorker(WorkerHandle):
    """The real worker process, started through LAUNCHER instead of `python -m edged.worker`."""

    sandboxed = True

    def _spawn_worker(self, child: socket.socket) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(child.fileno()),
                                          "1" if self.sandboxed else "0"],
                                         pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, env=env)
        finally:
            child.close()


def init_msg(tmp: Path, sandboxed: bool) -> protocol.Init:
    cfg = {"device_id": "seal", "model": {"path": str(BUNDLED / "digits.tflite"),
                                          "labels": str(BUNDLED / "digits_labels.txt"), "task": "classify"}}
    path = tmp / "edged.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return protocol.Init(config_text=path.read_text(), config_name=str(path), config_base=str(tmp),
                         sandbox=sandboxed, sandbox_mode="kill", memory_limit=1 << 30, batch_max=1, batch_wait_ms=0.0,
                         max_fds=64, log_level=30)


def shm_footprint(pool: FramePool) -> list[tuple[int, int, int]]:
    """(id, st_size, st_blocks) of every segment's memfd, as the host sees it."""
    return [(sid, os.fstat(fd).st_size, os.fstat(fd).st_blocks) for sid, fd, _size in pool.segments()]


@pytest.mark.parametrize("sandboxed", [True, False], ids=["sandboxed", "unfiltered"])
def test_worker_attacking_its_segment_fds_cannot_write_or_resize_host_memory(tmp_path, sandboxed):
    results: queue.Queue[dict[str, Any]] = queue.Queue()
    sample = (BUNDLED / "digits_sample.png").read_bytes()
    with FramePool(initial_bytes=64 << 10, segment_bytes=256 << 10, max_bytes=4 << 20) as pool:
        first = pool.write(sample)                 # the frame in flight, at offset 0 of the base segment
        pool.alloc((64 << 10) - first.size)        # fills the base: the next block grows segment 1
        second = pool.write(sample)
        assert first is not None and second is not None and (first.segment, second.segment) == (0, 1)
        assert first.offset == 0 and second.offset == 0
        with pool.view(first) as mv:
            before = hashlib.sha256(mv).hexdigest()
        footprint = shm_footprint(pool)

        AttackingWorker.sandboxed = sandboxed
        h = AttackingWorker(0, init_msg(tmp_path, sandboxed), lambda _h, m: results.put(protocol.as_dict(m)), lambda _h: None)
        info = h.start(timeout=60)
        try:
            assert info["sandboxed"] is sandboxed
            for sid, fd, size in pool.segments():
                assert h.ensure_segment(sid, fd, size)

            def ask(seq: int, block: Any, content_type: str | None) -> dict[str, Any]:
                assert h.send(protocol.FrameJob(seq, block.segment, block.offset, block.length, content_type))
                msg = results.get(timeout=30)
                assert msg["t"] == "r" and msg["seq"] == seq, msg
                return msg

            answer = ask(1, first, None)["body"]     # served before the attack
            assert answer["classes"], answer
            report = ask(2, first, ATTACK)["body"]["outputs"][0]

            # the worker held both segments and tried each of them
            assert {rep["size"] for rep in report["fds"].values()} == {64 << 10, 256 << 10}, report
            # (re-opening through /proc works unfiltered; what it gives must be refused too)
            tried = {k: v for rep in report["fds"].values() for k, v in rep.items() if k not in ("size", "reopen_rw")}
            assert tried and "ok" not in tried.values(), report
            assert set(report["mprotect"]) == {"0", "1"} and "ok" not in report["mprotect"].values(), report
            if not sandboxed:
                assert {"ftruncate_grow", "fallocate", "rw_write"} <= set(tried), report

            assert shm_footprint(pool) == footprint  # host shared memory neither grew nor shrank
            with pool.view(first) as mv:
                assert hashlib.sha256(mv).hexdigest() == before  # the frame in flight is intact
            assert ask(3, first, None)["body"] == answer  # and served as before, by the same live worker
            assert ask(4, second, None)["body"] == answer
            assert h.proc is not None and h.proc.poll() is None
        finally:
            h.stop()


def test_pool_segment_fds_are_sealed_read_only_and_pool_still_writes():
    import errno
    import fcntl
    import mmap

    with FramePool(initial_bytes=64 << 10, segment_bytes=64 << 10, max_bytes=1 << 20) as pool:
        pool.alloc(64 << 10)
        block = pool.write(b"frame")                   # grown: announced fds go the same way
        assert block is not None and block.segment == 1
        for _sid, fd, size in pool.segments():
            assert os.fstat(fd).st_size == size
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            # F_SEAL_SEAL, SHRINK, GROW, FUTURE_WRITE (0x10, Linux >= 5.1; this kernel is newer)
            assert seals & 0x17 == 0x17, hex(seals)
            for call in (lambda fd=fd: os.write(fd, b"x"), lambda fd=fd, size=size: os.ftruncate(fd, 2 * size),
                         lambda fd=fd, size=size: mmap.mmap(fd, size)):
                with pytest.raises(OSError) as exc:
                    call()
                assert exc.value.errno in (errno.EBADF, errno.EINVAL, errno.EACCES, errno.EPERM)
            rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)  # what a worker allowed to open files could do
            try:
                for call in (lambda rw=rw: os.write(rw, b"x"), lambda rw=rw, n=2 * size: os.ftruncate(rw, n),
                             lambda rw=rw, size=size: mmap.mmap(rw, size)):
                    with pytest.raises(PermissionError):
                        call()
            finally:
                os.close(rw)
        with pool.view(block) as mv:                   # the pool's own mapping stays writable
            mv[:5] = b"FRAME"
        fd = pool.segments()[1][1]
        assert os.pread(fd, 5, block.offset) == b"FRAME"
