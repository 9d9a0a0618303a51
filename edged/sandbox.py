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

How the allowlist was found (x86-64, glibc 2.36, Python 3.11, LiteRT 2.3.0,
Pillow 13, numpy 2.4): a worker-like script (kept out of the repo) loads
mobilenet_v2_1.0_224_quant, mobilenet_v1_0.25_128_quant and
coco_ssd_mobilenet_v1_1.0_quant_2018_06_29_detect with num_threads 1 and 2,
warms up, calls ``os.getppid()`` as a marker, then serves six frames (cat
as BMP/PNG/JPEG, grace_hopper.bmp, kite_and_cold.jpg, a 2704x1800 JPEG
through draft()) that a parent sends as memfds over a socketpair: mmap.mmap,
Image.open(BytesIO).draft/convert/resize, set_tensor/invoke/get_tensor,
reset_all_variables, json.dumps, logging to the socket, sys.exit or
os._exit. ``strace -f -qq -s 40 -o trace.txt python worker_sim.py MODEL T FD``
and every syscall line of any thread after the marker gave: brk close exit
exit_group fcntl(F_DUPFD_CLOEXEC) futex getpid madvise mmap munmap
newfstatat(fd, "", AT_EMPTY_PATH) recvmsg rt_sigaction rt_sigprocmask
sendto (fcntl/newfstatat: Python's mmap dups and fstats the fd;
rt_sigaction: sys.exit restoring SIGINT; exit/madvise/rt_sigprocmask:
XNNPACK threads ending), plus getsockname/getpeername when sys.exit finds
a socket object still open (its ResourceWarning calls repr()). The table
adds the 32-bit ARM names, the other directions of socket I/O, mremap,
mprotect, clocks and sleeps, sched_yield,
what a new thread needs (clone, set_robust_list, rseq), restart_syscall,
getrandom, gettid, and tgkill to our own pid so abort() ends in SIGABRT, not
a misleading SIGSYS. The same script then ran under install_filter("kill")
(all frames right, exit 0) and "log" (no audit type=1326 line in dmesg).

fstat is allowed (metadata of an fd already held); newfstatat, fstatat64
and statx only with AT_EMPTY_PATH, which is how glibc >= 2.33 does fstat. A
hostile caller could pass a path with that flag and learn a file's size,
mode and times, never its content nor an fd.
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

logger = logging.getLogger(__name__)

__all__ = ["GPU_EXTRA", "SandboxError", "allowed_syscalls", "capabilities", "device_fds", "drop_privileges", "harden",
           "install_filter", "seccomp_mode"]


# Conditions on a row of the table; the argument index is per syscall (below).
PLAIN = ""            # allowed whatever the arguments
NO_EXEC = "no_exec"   # prot argument has PROT_EXEC clear
MAP = "map"           # mmap: PROT_EXEC clear, and not anonymous shared memory
THREAD = "thread"     # clone flags have CLONE_THREAD (a thread, not a process)
FD_ONLY = "fd_only"   # *stat*at flags have AT_EMPTY_PATH (fstat of an fd)
FCNTL = "fcntl"       # cmd is one of _SAFE_FCNTL (no F_SETOWN, leases, notify)
SELF = "self"         # tgkill aimed at our own thread group (abort, raise)
ENOSYS = "enosys"     # not allowed: fails with ENOSYS (clone3: glibc falls back to clone)

_ALL = ("x86_64", "aarch64", "arm")
_ARM = ("arm",)
_64 = ("x86_64", "aarch64")

# The allowlist: (syscall, condition, arches). One table for every arch.
_TABLE: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # I/O on fds the worker already holds (the control socket, memfds)
    ("read", PLAIN, _ALL),
    ("write", PLAIN, _ALL),
    ("recvmsg", PLAIN, _ALL),
    ("sendmsg", PLAIN, _ALL),
    ("recvfrom", PLAIN, _ALL),   # socket.recv(): glibc's recv() is recvfrom on 64-bit
    ("sendto", PLAIN, _ALL),     # socket.send()/sendall()
    ("recv", PLAIN, _ARM),
    ("send", PLAIN, _ARM),
    ("close", PLAIN, _ALL),
    ("getsockname", PLAIN, _ALL),  # repr() of a socket left open at sys.exit (ResourceWarning)
    ("getpeername", PLAIN, _ALL),
    ("fcntl", FCNTL, _ALL),      # mmap.mmap() dups the fd with F_DUPFD_CLOEXEC
    ("fcntl64", FCNTL, _ARM),
    ("fstat", PLAIN, _64),       # mmap.mmap() checks the fd's size
    ("newfstatat", FD_ONLY, _64),
    ("fstat64", PLAIN, _ARM),
    ("fstatat64", FD_ONLY, _ARM),
    ("statx", FD_ONLY, _ARM),    # 32-bit glibc's fstat with 64-bit time
    # memory
    ("brk", PLAIN, _ALL),
    ("mmap", MAP, _64),
    ("mmap2", MAP, _ARM),
    ("mprotect", NO_EXEC, _ALL),
    ("munmap", PLAIN, _ALL),
    ("mremap", PLAIN, _ALL),
    ("madvise", PLAIN, _ALL),
    # threads (XNNPACK's pool) and their synchronisation
    ("futex", PLAIN, _ALL),
    ("futex_time64", PLAIN, _ARM),
    ("sched_yield", PLAIN, _ALL),
    ("clone", THREAD, _ALL),
    ("clone3", ENOSYS, _ALL),
    ("set_robust_list", PLAIN, _ALL),
    ("rseq", PLAIN, _ALL),       # glibc >= 2.35 aborts a new thread when rseq fails
    ("exit", PLAIN, _ALL),
    ("exit_group", PLAIN, _ALL),
    # clocks and sleeps (mostly vDSO, but the syscall is the fallback)
    ("clock_gettime", PLAIN, _ALL),
    ("clock_gettime64", PLAIN, _ARM),
    ("gettimeofday", PLAIN, _ALL),
    ("clock_nanosleep", PLAIN, _ALL),
    ("clock_nanosleep_time64", PLAIN, _ARM),
    ("nanosleep", PLAIN, _ALL),
    # signals: returning from handlers, masks, sys.exit() restoring SIGINT
    ("rt_sigreturn", PLAIN, _ALL),
    ("sigreturn", PLAIN, _ARM),
    ("rt_sigprocmask", PLAIN, _ALL),
    ("rt_sigaction", PLAIN, _ALL),
    ("restart_syscall", PLAIN, _ALL),
    ("tgkill", SELF, _ALL),
    # identity and entropy
    ("getpid", PLAIN, _ALL),     # logging.LogRecord
    ("gettid", PLAIN, _ALL),
    ("getrandom", PLAIN, _ALL),
)

# Which argument a condition looks at, per syscall (MAP also checks flags, arg 3).
_ARG_INDEX = {"mmap": 2, "mmap2": 2, "mprotect": 2, "clone": 0, "newfstatat": 3,
              "fstatat64": 3, "statx": 2, "fcntl": 1, "fcntl64": 1, "tgkill": 0}

_PROT_EXEC = 0x4
_MAP_TYPE = 0x0F
_MAP_PRIVATE = 0x02
_MAP_ANONYMOUS = 0x20  # the same value on x86-64, aarch64 and arm
_CLONE_THREAD = 0x00010000
_AT_EMPTY_PATH = 0x1000
_SAFE_FCNTL = (0, 1, 2, 3, 4, 1030)  # F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC
_PR_SET_NO_NEW_PRIVS = 38

_ARCH_ALIASES = {
    "x86_64": "x86_64", "amd64": "x86_64",
    "aarch64": "aarch64", "arm64": "aarch64",
    "arm": "arm", "armhf": "arm", "armv6l": "arm", "armv7l": "arm", "armv8l": "arm",
}
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
    """Names the filter allows (some only with the argument checks above) on arch.

    arch is a machine name (``x86_64``, ``aarch64``, ``armv7l``/``arm``...);
    None means the ABI of this Python process, which is what the filter
    must match (32-bit Raspberry Pi OS runs armhf on an aarch64 kernel).
    """
    key = _arch_key(arch)
    return tuple(name for name, cond, arches in _TABLE if key in arches and cond != ENOSYS)


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


#: A worker that batches waits for the next frame with a timeout (poll on its control socket).
BATCH_EXTRA = ("poll", "ppoll")

# What a GPU driver (Vulkan/WebGPU) still does after warm-up, only for a worker
# whose model runs on the GPU: ioctl submits work, poll/epoll/eventfd wait for
# fences. Traced on the lent H100 (tools/trace_worker.py under strace, NVIDIA
# 580 driver): per served frame the driver also re-opens /dev/nvidiactl
# (openat) and calls getuid, so a GPU worker can open files. Sockets, exec,
# fork, ptrace and setuid stay refused; the unit's ProtectSystem/ProtectHome/
# PrivateTmp/DevicePolicy bound what it could open. Reported in status
# (workers[].sandbox_profile = "gpu").
GPU_EXTRA = ("ioctl", "poll", "ppoll", "epoll_wait", "epoll_pwait", "epoll_ctl", "eventfd2",
             "sched_getaffinity", "pread64", "lseek", "dup", "dup3", "openat", "getuid")


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
        for name, cond, arches in _TABLE:
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
    arg = _ARG_INDEX.get(name, 0)
    add = flt.add_rule  # type: ignore[attr-defined]
    if cond == PLAIN:
        add(sc.ALLOW, name)
    elif cond == NO_EXEC:
        add(sc.ALLOW, name, sc.Arg(arg, sc.MASKED_EQ, _PROT_EXEC, 0))
    elif cond == MAP:
        # MAP_SHARED|MAP_ANONYMOUS escapes RLIMIT_DATA, so allow an anonymous
        # mapping only when private; fd mappings (pool segments) either way.
        no_exec = sc.Arg(arg, sc.MASKED_EQ, _PROT_EXEC, 0)
        add(sc.ALLOW, name, no_exec, sc.Arg(3, sc.MASKED_EQ, _MAP_ANONYMOUS, 0))
        add(sc.ALLOW, name, no_exec, sc.Arg(3, sc.MASKED_EQ, _MAP_TYPE, _MAP_PRIVATE))
    elif cond == THREAD:
        add(sc.ALLOW, name, sc.Arg(arg, sc.MASKED_EQ, _CLONE_THREAD, _CLONE_THREAD))
    elif cond == FD_ONLY:
        add(sc.ALLOW, name, sc.Arg(arg, sc.MASKED_EQ, _AT_EMPTY_PATH, _AT_EMPTY_PATH))
    elif cond == FCNTL:
        for cmd in _SAFE_FCNTL:  # rules on one syscall are OR-ed
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
    key = _ARCH_ALIASES.get(arch.lower())
    if key is None:
        raise SandboxError(f"no seccomp allowlist for arch {arch!r}; known: {', '.join(sorted(_ARCH_ALIASES))}")
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
