"""The worker's sandbox: rlimits, fd hygiene, privileges and the seccomp allowlist.

The only module that imports pyseccomp. The worker calls, in this order and
only after it loaded the model, allocated tensors, ran one warm-up invoke,
called ``Image.init()`` and decoded one tiny JPEG, PNG and BMP:

    harden(memory_limit_bytes=..., keep_fds=(control_socket_fd,), user=cfg.sandbox.user)
    install_filter("kill")

harden() ends with edged.privileges.drop_privileges(): a worker of a daemon
started as root runs on as an unprivileged user (``sandbox.user``, else
``nobody``) with no capabilities, in every thread.

Afterwards it can read/write/recvmsg/sendmsg on fds it holds, receive fds
(SCM_RIGHTS), mmap them without PROT_EXEC, close fds, allocate memory, wait
on futexes, read clocks and exit. Opening files, sockets, connect, bind,
exec, fork, ptrace, setuid and executable or anonymous-shared mappings kill
the whole process with SIGSYS (KILL_PROCESS: KILL_THREAD leaves a zombie).
``clone`` needs CLONE_THREAD; ``clone3`` gets ENOSYS so glibc falls back.

What kills a filtered worker that looks harmless (do it before, or never):
any lazy import (Pillow imports TiffImagePlugin the first time a JPEG has
EXIF/MPO data; ``Image.init()`` first); a warning printed by the default
``warnings`` machinery (a PNG with a bad acTL chunk makes Pillow warn) or a
traceback formatted by ``traceback``/``logger.exception`` (linecache stats
the .py files even with lookup_lines=False); ``socket.socket(fileno=...)``
(getsockopt) and socket timeouts (poll).

The allowlist itself, and how it was found, is edged.syscalls.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import resource
import threading
from collections.abc import Collection
from types import ModuleType

from edged.errors import SandboxError
from edged.privileges import PrivilegeError, capabilities, drop_privileges
from edged.syscalls import (ARCH_ALIASES, ARG_INDEX, AT_EMPTY_PATH, BATCH_EXTRA, CLONE_THREAD, ENOSYS, FCNTL,
                            FD_ONLY, GPU_EXTRA, MAP, MAP_ANONYMOUS, MAP_PRIVATE, MAP_TYPE, NO_EXEC, PLAIN, PROT_EXEC,
                            SAFE_FCNTL, SELF, TABLE, THREAD)

logger = logging.getLogger(__name__)

# BATCH_EXTRA and GPU_EXTRA (edged.syscalls) are the `extra` of install_filter(), named here for its callers
__all__ = ["BATCH_EXTRA", "GPU_EXTRA", "SandboxError", "allowed_syscalls", "capabilities", "device_fds",
           "drop_privileges", "harden", "install_filter", "seccomp_mode"]


_PR_SET_NO_NEW_PRIVS = 38

_MODES = ("kill", "log")

# RLIMIT_AS counts address space, not memory: the supervisor's pool segments
# mapped into the worker (up to pool.max_mb), each thread's 64 MiB malloc
# arena reservation and 8 MiB stack, and whatever accelerator drivers reserve.
# Measured: with a 256 MiB pool mapped, RLIMIT_AS=512 MiB made a 12 MP JPEG
# decode fail (MemoryError) while RLIMIT_DATA=512 MiB served it. RLIMIT_DATA
# counts private writable memory (heap, anonymous mmap, thread stacks): what
# a decompression bomb or a hostile model would grow. Its one gap, anonymous
# MAP_SHARED memory, is closed by the mmap rule of the filter.
_MEMORY_RLIMIT = resource.RLIMIT_DATA
_MEMORY_STATUS_KEY = "VmData"


def allowed_syscalls(arch: str | None = None) -> tuple[str, ...]:
    """Names the filter allows (some only with the argument checks of edged.syscalls) on arch.

    arch is a machine name (``x86_64``, ``aarch64``, ``armv7l``/``arm``...);
    None means the ABI of this Python process, which is what the filter
    must match (32-bit Raspberry Pi OS runs armhf on an aarch64 kernel).
    """
    key = _arch_key(arch)
    return tuple(name for name, cond, arches in TABLE if key in arches and cond != ENOSYS)


def seccomp_mode(pid: int | str = "self") -> int:
    """The Seccomp: field of /proc/<pid>/status: 0 off, 1 strict, 2 filter.

    Not callable from a filtered process (it opens a file).
    """
    path = f"/proc/{pid}/status"
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Seccomp:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError) as exc:
        raise SandboxError(f"cannot read the seccomp mode from {path}: {exc}") from exc
    return 0  # a kernel without CONFIG_SECCOMP has no such line


def harden(*, memory_limit_bytes: int | None, max_open_files: int = 64, keep_fds: Collection[int] = (),
           user: str | None = None) -> None:
    """Shed what the worker must not keep, before install_filter().

    Sets PR_SET_NO_NEW_PRIVS, RLIMIT_CORE=0, closes every fd except 0, 1, 2
    and keep_fds, then RLIMIT_NOFILE=max_open_files and, when
    memory_limit_bytes is given, RLIMIT_DATA (see _MEMORY_RLIMIT for why
    not RLIMIT_AS). Received fds count against RLIMIT_NOFILE: past it the
    kernel drops them and sets MSG_CTRUNC. Limits are set hard and soft, so
    the worker cannot raise them again. Last, drop_privileges(user).
    """
    keep = {0, 1, 2}
    for fd in keep_fds:
        if not isinstance(fd, int) or fd < 0:
            raise SandboxError(f"keep_fds holds {fd!r}, not a file descriptor")
        try:
            os.fstat(fd)
        except OSError as exc:
            raise SandboxError(f"fd {fd} in keep_fds is not open: {exc}") from exc
        keep.add(fd)
    if max_open_files < len(keep):
        raise SandboxError(f"max_open_files={max_open_files} is fewer than the {len(keep)} fds kept")
    if memory_limit_bytes is not None and memory_limit_bytes <= 0:
        raise SandboxError(f"memory_limit_bytes={memory_limit_bytes} must be positive or None")

    _set_no_new_privs()
    _prime_glibc_heap_shrink()
    _setrlimit(resource.RLIMIT_CORE, 0, "RLIMIT_CORE")
    _close_fds_except(keep)
    _setrlimit(resource.RLIMIT_NOFILE, max_open_files, "RLIMIT_NOFILE")
    if memory_limit_bytes is not None:
        used = _status_kib(_MEMORY_STATUS_KEY) * 1024
        if used >= memory_limit_bytes:
            raise SandboxError(f"memory limit {memory_limit_bytes >> 20} MiB is below the "
                               f"{used >> 20} MiB ({_MEMORY_STATUS_KEY}) the worker already uses")
        _setrlimit(_MEMORY_RLIMIT, memory_limit_bytes, "RLIMIT_DATA")
    # the filter's library is imported now: the user dropped to below may not read this venv
    try:
        _pyseccomp()
    except SandboxError:
        pass  # install_filter() says so
    # last: a process whose uid changed is no longer dumpable, and /proc/self/fd (used above) turns root-only
    try:
        became = drop_privileges(user)
    except PrivilegeError as exc:
        raise SandboxError(str(exc)) from exc
    logger.debug("hardened: no_new_privs, core 0, nofile %d, memory %s, fds kept %s, user %s",
                 max_open_files, memory_limit_bytes, sorted(keep), became or "unchanged")


def device_fds() -> list[int]:
    """This process's open fds on device nodes other than stdio (an accelerator driver's), found via /proc."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2:
            continue
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the fd listdir itself used, now closed
        if target.startswith("/dev/") and target not in ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"):
            fds.append(fd)
    return fds


def install_filter(mode: str = "kill", extra: Collection[str] = ()) -> None:
    """Load the allowlist for this process, on every thread (TSYNC).

    mode "kill": anything else kills the whole process with SIGSYS.
    mode "log": anything else is allowed and logged by the kernel (audit
    type=1326 in dmesg): for development, never in production. clone3 fails
    with ENOSYS in both modes. A syscall of another ABI (i386 int 0x80,
    x32) kills in both modes. Call it once: seccomp() itself is not allowed.
    """
    if mode not in _MODES:
        raise SandboxError(f"seccomp mode {mode!r}: expected one of {', '.join(_MODES)}")
    sc = _pyseccomp()
    key = _arch_key(None)
    default = sc.KILL_PROCESS if mode == "kill" else sc.LOG
    names = allowed_syscalls(key)
    logger.info("loading seccomp filter: %d syscalls allowed on %s, others %s", len(names), key,
                "kill the process" if mode == "kill" else "logged")
    try:
        flt = sc.SyscallFilter(default)
        flt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
        flt.set_attr(sc.Attr.CTL_NNP, 1)
        flt.set_attr(sc.Attr.CTL_TSYNC, 1)
        for name, cond, arches in TABLE:
            if key in arches:
                _add_rules(sc, flt, name, cond)
        for name in extra:
            try:
                flt.add_rule(sc.ALLOW, name)
            except (OSError, ValueError, RuntimeError):
                logger.debug("extra syscall %s is not known on %s", name, key)
        flt.load()
    except OSError as exc:
        raise SandboxError(f"cannot load the seccomp filter ({mode}): {exc}") from exc


def _add_rules(sc: ModuleType, flt: object, name: str, cond: str) -> None:
    arg = ARG_INDEX.get(name, 0)
    add = flt.add_rule  # type: ignore[attr-defined]
    if cond == PLAIN:
        add(sc.ALLOW, name)
    elif cond == NO_EXEC:
        add(sc.ALLOW, name, sc.Arg(arg, sc.MASKED_EQ, PROT_EXEC, 0))
    elif cond == MAP:
        # MAP_SHARED|MAP_ANONYMOUS escapes RLIMIT_DATA, so allow an anonymous
        # mapping only when private; fd mappings (pool segments) either way.
        no_exec = sc.Arg(arg, sc.MASKED_EQ, PROT_EXEC, 0)
        add(sc.ALLOW, name, no_exec, sc.Arg(3, sc.MASKED_EQ, MAP_ANONYMOUS, 0))
        add(sc.ALLOW, name, no_exec, sc.Arg(3, sc.MASKED_EQ, MAP_TYPE, MAP_PRIVATE))
    elif cond == THREAD:
        add(sc.ALLOW, name, sc.Arg(arg, sc.MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
    elif cond == FD_ONLY:
        add(sc.ALLOW, name, sc.Arg(arg, sc.MASKED_EQ, AT_EMPTY_PATH, AT_EMPTY_PATH))
    elif cond == FCNTL:
        for cmd in SAFE_FCNTL:  # rules on one syscall are OR-ed
            add(sc.ALLOW, name, sc.Arg(arg, sc.EQ, cmd))
    elif cond == SELF:
        add(sc.ALLOW, name, sc.Arg(arg, sc.EQ, os.getpid()))
    elif cond == ENOSYS:
        add(sc.ERRNO(errno.ENOSYS), name)
    else:  # pragma: no cover - the table is ours
        raise AssertionError(cond)


@functools.cache
def _pyseccomp() -> ModuleType:
    try:
        import pyseccomp
    except (ImportError, RuntimeError, OSError) as exc:  # RuntimeError: no libseccomp.so
        raise SandboxError(f"seccomp is unavailable: {exc} (install libseccomp2 and pyseccomp)") from exc
    module: ModuleType = pyseccomp
    return module


def _arch_key(arch: str | None) -> str:
    if arch is None:
        sc = _pyseccomp()
        native = sc.system_arch()
        by_token = {sc.Arch.X86_64: "x86_64", sc.Arch.AARCH64: "aarch64", sc.Arch.ARM: "arm"}
        if native not in by_token:
            raise SandboxError(f"no seccomp allowlist for this ABI (libseccomp arch {native:#x})")
        return by_token[native]
    key = ARCH_ALIASES.get(arch.lower())
    if key is None:
        raise SandboxError(f"no seccomp allowlist for arch {arch!r}; known: {', '.join(sorted(ARCH_ALIASES))}")
    return key


def _set_no_new_privs() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")


def _prime_glibc_heap_shrink() -> None:
    """Make glibc read /proc/sys/vm/overcommit_memory now, while open() is allowed.

    glibc opens it (once, then caches) the first time a non-main malloc heap
    shrinks: a thread's arena, or the one malloc falls back to when the main
    arena hits RLIMIT_DATA. Under the filter that is a SIGSYS where a
    MemoryError belongs. Freeing 96 KiB blocks (past the 64 KiB trim check,
    below the mmap threshold) last-first in a thread shrinks its heap once
    the top passes the trim threshold, which glibc raises up to 64 MiB (seen:
    0.5 MiB after mobilenet v2, 2 MiB after the SSD), hence 56 MiB. Cost:
    ~5 ms and 56 MiB of non-resident heap in VmData, in a free arena that
    malloc falls back to: memory inside the cap, not lost.
    """
    libc = ctypes.CDLL(None)
    malloc, free = libc.malloc, libc.free
    malloc.restype, malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    free.restype, free.argtypes = None, (ctypes.c_void_p,)

    def churn() -> None:
        blocks = [malloc(96 * 1024) for _ in range(56 * 1024 // 96)]
        for block in reversed(blocks):
            free(block)

    old = threading.stack_size(256 * 1024)  # glibc caches a dead thread's stack: keep it small
    try:
        t = threading.Thread(target=churn, name="edged-heap-prime")
        t.start()
        t.join()
    finally:
        threading.stack_size(old)


def _setrlimit(which: int, value: int, name: str) -> None:
    _soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY and value > hard:
        logger.warning("%s: asked for %d, hard limit is %d; using %d", name, value, hard, hard)
        value = hard
    try:
        resource.setrlimit(which, (value, value))
    except (OSError, ValueError) as exc:
        raise SandboxError(f"setrlimit({name}, {value}): {exc}") from exc


def _close_fds_except(keep: set[int]) -> None:
    try:
        open_fds = {int(n) for n in os.listdir("/proc/self/fd")}
    except OSError:
        open_fds = set()
    doomed = {fd: _fd_target(fd) for fd in sorted(open_fds - keep)}
    if doomed:  # the fd listdir used is gone already: no target
        logger.debug("closing fds: %s", ", ".join(f"{fd}={t}" for fd, t in doomed.items() if t))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    top = hard if hard != resource.RLIM_INFINITY else os.sysconf("SC_OPEN_MAX")
    top = max(top, max(keep) + 1, max(open_fds, default=0) + 1)
    low = 0
    for fd in sorted(keep):  # closerange uses close_range(2): one syscall per gap
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, top)


def _fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _status_kib(key: str) -> int:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError) as exc:
        raise SandboxError(f"cannot read {key} from /proc/self/status: {exc}") from exc
    return 0
