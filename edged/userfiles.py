"""Files a user names in the config (config, model, labels, password, keys): regular files only, bounded reads.

A path in the config may name anything: /dev/zero, a FIFO nobody writes, a
directory, a file of many GiB. Each one is opened with O_NONBLOCK (opening a
FIFO never waits for a writer), checked with fstat on the open fd to be a
regular file, and read up to a size cap: whatever it names costs at most the
cap in memory and one open(). Errors are ``FileRefused`` (an OSError with a
readable message), which each caller turns into its own ConfigError or
ModelError naming the key.

Also here: what a file's mode says about a secret (``exposure``).
"""
from __future__ import annotations

import mmap
import os
import stat

from edged.errors import EdgedError

CONFIG_MAX_BYTES = 1 << 20    # the shipped config with all its comments is 7 KiB
LABELS_MAX_BYTES = 16 << 20   # 1,000 ImageNet labels are 10 KiB
SECRET_MAX_BYTES = 64 << 10   # a password file, a PEM key or certificate chain

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


class FileRefused(EdgedError, OSError):
    """The path cannot be used: it is missing, unreadable, not a regular file or too large (an OSError too)."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(why)
        self.path = path
        self.why = why  # without the path: "a FIFO, not a regular file", "No such file or directory"

    def __str__(self) -> str:
        return f"{self.path}: {self.why}"


def kind(mode: int) -> str:
    """What a stat mode names, in words ("a regular file", "a character device", ...)."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def not_regular(path: str) -> str | None:
    """Why an existing path is not a regular file (e.g. "/dev/zero is a character device"), else None.

    A missing or unreachable path gives None: the reader says so when it needs the file.
    Symlinks are followed, as open() would.
    """
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return None if stat.S_ISREG(st.st_mode) else f"{path} is {kind(st.st_mode)}, not a regular file"


def open_regular(path: str | os.PathLike[str]) -> int:
    """An fd open for reading on the regular file at path (raises FileRefused); the caller closes it."""
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise FileRefused(p, exc.strerror or str(exc)) from None
    except ValueError as exc:  # a NUL byte in the path
        raise FileRefused(repr(p), str(exc)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FileRefused(p, f"{kind(mode)}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path: str | os.PathLike[str], limit: int, *, regular: bool = True) -> bytes:
    """The whole content of the regular file at path, refused past `limit` bytes (raises FileRefused).

    regular=False: any file that can be read (a pipe: ``edged send /dev/stdin``), opened
    as open() would (a FIFO waits for its writer), still refused past `limit`.
    """
    p = os.fspath(path)
    if regular:
        fd = open_regular(p)
    else:
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        except (OSError, ValueError) as exc:
            raise FileRefused(p, getattr(exc, "strerror", None) or str(exc)) from None
    try:
        st = os.fstat(fd)
        size = st.st_size if stat.S_ISREG(st.st_mode) else 0
        if stat.S_ISDIR(st.st_mode):
            raise FileRefused(p, "a directory")
        if size > limit:
            raise FileRefused(p, f"{size} bytes, more than the {limit} allowed")
        chunks, got = [], 0
        while got <= limit:  # the file may grow after fstat: read one byte past the cap at most
            chunk = os.read(fd, min(1 << 20, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as exc:
        if isinstance(exc, FileRefused):
            raise
        raise FileRefused(p, exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if got > limit:  # a regular file that grew after fstat, or a device or pipe that kept giving
        raise FileRefused(p, f"more than the {limit} bytes allowed")
    return b"".join(chunks)


def first_line(path: str | os.PathLike[str], limit: int = SECRET_MAX_BYTES) -> str:
    """The first line of a small regular text file (a password file), without its line end."""
    data = read_bytes(path, limit)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileRefused(os.fspath(path), f"not UTF-8 text (byte {exc.start})") from None
    return text.split("\n", 1)[0].rstrip("\r")


def map_regular(path: str | os.PathLike[str]) -> mmap.mmap | None:
    """A read-only mapping of the regular file at path (None when it is empty; raises FileRefused).

    For model files: they can be large, so they are mapped, never read into memory.
    """
    p = os.fspath(path)
    fd = open_regular(p)
    try:
        if os.fstat(fd).st_size == 0:
            return None
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        if isinstance(exc, FileRefused):
            raise
        raise FileRefused(p, getattr(exc, "strerror", None) or str(exc)) from None
    finally:
        os.close(fd)


def exposure(path: str) -> str | None:
    """Why a secret's file mode lets other users at it ("readable by every user (mode 0644)"), else None.

    World-readable or world-writable files, and a folder above them that any user
    may write to (they could swap the file), are exposed; group access is not (the
    installed config is root:edged 0640). A missing file gives None.
    """
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    perm = stat.S_IMODE(st.st_mode)
    what = [w for bit, w in ((stat.S_IROTH, "readable"), (stat.S_IWOTH, "writable")) if perm & bit]
    if what:
        return f"{path} is {' and '.join(what)} by every user (mode {perm:04o})"
    parent = os.path.dirname(os.path.realpath(path))
    try:
        pst = os.stat(parent)
    except OSError:
        return None
    if pst.st_mode & stat.S_IWOTH and not pst.st_mode & stat.S_ISVTX:
        return f"{path} lies in {parent}, which every user may write to (mode {stat.S_IMODE(pst.st_mode):04o})"
    return None
