"""Leaving root and capabilities behind: what a worker of a root daemon sheds before seccomp.

``drop_privileges(user)`` is called by ``sandbox.harden()`` (last, just before
the filter): started as root, the worker runs on as ``user`` (default
``nobody``, never uid 0) with that user's groups; started with capabilities,
it drops them. Afterwards no thread holds a capability or uid/gid 0, and the
process is no longer dumpable (the kernel resets that on a uid change), so
other processes of the same user cannot ptrace it. It may be called earlier
(before the model loads, so that the model's code never runs privileged; then
the model files must be readable by that user); a second call finds nothing
to drop. Everything it needs from the disk (NSS for the user, imports) must
be loaded before: the user may not read the venv.
"""
from __future__ import annotations

import ctypes
import errno
import os
import pwd
from typing import Any

from edged.errors import EdgedError

__all__ = ["DEFAULT_USER", "PrivilegeError", "capabilities", "drop_privileges"]

DEFAULT_USER = "nobody"
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CAP_VERSION_3 = 0x20080522  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set


class PrivilegeError(EdgedError):
    """Root or a capability could not be dropped (the worker must not go on)."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def capabilities(task: str = "self") -> dict[str, Any]:
    """Credentials in /proc/<task>/status ("self", a pid, "self/task/TID").

    CapInh/CapPrm/CapEff/CapBnd/CapAmb as integers, Uid/Gid as (real, effective, saved, fs) tuples.
    """
    caps: dict[str, Any] = {}
    try:
        with open(f"/proc/{task}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.startswith("Cap"):
                    caps[name] = int(value, 16)
                elif name in ("Uid", "Gid"):
                    caps[name] = tuple(int(v) for v in value.split())
    except (OSError, ValueError) as exc:
        raise PrivilegeError(f"cannot read capabilities from /proc/{task}/status: {exc}") from exc
    return caps


def drop_privileges(user: str | None = None) -> str | None:
    """Run on without root and without capabilities; return the user switched to (None: uid unchanged).

    Started as root (any of real, effective, saved uid 0): the bounding and
    ambient capability sets are emptied (that needs CAP_SETPCAP, so first), then
    the groups, gid and uid become those of `user` (default ``nobody``). glibc's
    setresuid applies to every thread of the process, and a uid leaving 0
    clears each thread's permitted and effective sets. Not root but holding
    capabilities: they are cleared (capset acts on one thread: call it before
    other threads start). Checks every thread afterwards; PrivilegeError if any
    still holds a capability or uid 0.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    became = None
    if 0 in os.getresuid() or 0 in os.getresgid():
        name = user or DEFAULT_USER
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise PrivilegeError(f"cannot run the worker as {name!r}: no such user (sandbox.user)") from None
        if pw.pw_uid == 0:
            raise PrivilegeError(f"cannot run the worker as {name!r}: it is uid 0")
        _drop_bounding_set(libc)
        try:
            os.initgroups(name, pw.pw_gid)  # the user's groups only: e.g. the device groups of an `edged` user
            os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
            os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
        except OSError as exc:
            raise PrivilegeError(f"cannot switch the worker to user {name!r}: {exc}") from exc
        became = name
    if libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
        raise PrivilegeError(f"prctl(PR_CAP_AMBIENT_CLEAR_ALL): {os.strerror(ctypes.get_errno())}")
    if any(capabilities()[k] for k in ("CapPrm", "CapEff", "CapInh")):  # left only when not started as root
        header = _CapHeader(_CAP_VERSION_3, 0)
        data = (_CapData * 2)()  # all zero: no capability in any set
        if libc.capset(ctypes.byref(header), data) != 0:
            raise PrivilegeError(f"capset: {os.strerror(ctypes.get_errno())}")
    _check_unprivileged()
    return became


def _drop_bounding_set(libc: ctypes.CDLL) -> None:
    try:
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 63
    for cap in range(last + 1):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err == errno.EINVAL:  # past the kernel's last capability
                break
            raise PrivilegeError(f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(err)}")


def _check_unprivileged() -> None:
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError as exc:
        raise PrivilegeError(f"cannot list this process's threads: {exc}") from exc
    for tid in tasks:
        task = f"self/task/{tid}"
        try:
            caps = capabilities(task)
        except PrivilegeError:
            continue  # the thread ended meanwhile
        # the bounding set only limits what execve could grant: no_new_privs and the filter rule that out
        held = {k: hex(v) for k, v in caps.items() if k.startswith("Cap") and k != "CapBnd" and v}
        if held:
            raise PrivilegeError(f"thread {tid} still holds capabilities {held} after dropping them "
                               "(drop_privileges must run before other threads start)")
        if 0 in caps.get("Uid", ()) or 0 in caps.get("Gid", ()):
            raise PrivilegeError(f"thread {tid} still runs as uid/gid 0 after dropping privileges")
