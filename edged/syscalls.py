"""The seccomp allowlist as data: each syscall a worker may make, the check on its arguments, per architecture.

edged.sandbox turns these tables into the filter (install_filter) and is the
only module that imports pyseccomp; this one is plain data, so the table can be
read, listed (sandbox.allowed_syscalls) and checked on any machine. TABLE is the
base set every worker gets; BATCH_EXTRA and GPU_EXTRA are added for a batching
worker and a worker whose model runs on the GPU; ARCH_ALIASES maps machine names
to the three ABIs the table covers (x86_64, aarch64, 32-bit arm).

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

# Conditions on a row of the table; the argument index is per syscall (below).
PLAIN = ""            # allowed whatever the arguments
NO_EXEC = "no_exec"   # prot argument has PROT_EXEC clear
MAP = "map"           # mmap: PROT_EXEC clear, and not anonymous shared memory
THREAD = "thread"     # clone flags have CLONE_THREAD (a thread, not a process)
FD_ONLY = "fd_only"   # *stat*at flags have AT_EMPTY_PATH (fstat of an fd)
FCNTL = "fcntl"       # cmd is one of SAFE_FCNTL (no F_SETOWN, leases, notify)
SELF = "self"         # tgkill aimed at our own thread group (abort, raise)
ENOSYS = "enosys"     # not allowed: fails with ENOSYS (clone3: glibc falls back to clone)

_ALL = ("x86_64", "aarch64", "arm")
_ARM = ("arm",)
_64 = ("x86_64", "aarch64")

# The allowlist: (syscall, condition, arches). One table for every arch.
TABLE: tuple[tuple[str, str, tuple[str, ...]], ...] = (
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
ARG_INDEX = {"mmap": 2, "mmap2": 2, "mprotect": 2, "clone": 0, "newfstatat": 3,
              "fstatat64": 3, "statx": 2, "fcntl": 1, "fcntl64": 1, "tgkill": 0}

PROT_EXEC = 0x4
MAP_TYPE = 0x0F
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20  # the same value on x86-64, aarch64 and arm
CLONE_THREAD = 0x00010000
AT_EMPTY_PATH = 0x1000
SAFE_FCNTL = (0, 1, 2, 3, 4, 1030)  # F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC

ARCH_ALIASES = {
    "x86_64": "x86_64", "amd64": "x86_64",
    "aarch64": "aarch64", "arm64": "aarch64",
    "arm": "arm", "armhf": "arm", "armv6l": "arm", "armv7l": "arm", "armv8l": "arm",
}

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
