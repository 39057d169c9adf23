"""Opening a path under a directory descriptor without ever following a symlink (STYLE.md rule 13).

A client's names are never joined into a host path: an export is a directory descriptor, and a path under it
is walked from that descriptor. With ``openat2`` (Linux 5.6+) one call does it under
``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS``; without it (older kernels, or a seccomp
filter that answers ENOSYS/EPERM) every component is opened with ``O_PATH | O_DIRECTORY | O_NOFOLLOW`` relative
to the previous one. Both refuse a symlink anywhere but the last component (ELOOP or ENOTDIR); the last one is
opened with ``O_NOFOLLOW``, so with ``O_PATH`` a symlink yields a descriptor of the link itself, never of its
target. Components are single names: empty, ``.``, ``..`` and anything with ``/`` or NUL are refused, so a walk
cannot climb out even without ``RESOLVE_BENEATH``.

The kernel takes at most ``PATH_MAX`` (4096) bytes per path, so a deep path is opened ``STEP_BYTES`` at a
time, each step from the previous step's directory descriptor with the same flags: any depth the file system
allows is usable (the backend bounds depth itself).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence

from nfsd.names import check_name
from nfsd.vfs import Status

SYS_OPENAT2 = 437  # the same number on every architecture (the syscall table was unified at 403+)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
STEP_BYTES = 4000  # below PATH_MAX (4096 with its NUL) for one openat2 path


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def component(name: str) -> str:
    """``name`` if it is one directory entry's name (nfsd.names' rule; '.' and '..' never walk here), else
    NFSError naming it."""
    return check_name(name, Status.INVAL)


def openat2(dir_fd: int, path: str, flags: int, resolve: int = RESOLVE) -> int:
    """The raw ``openat2`` system call; raises OSError (ENOSYS where the kernel lacks it)."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    fd = _syscall(SYS_OPENAT2, ctypes.c_int(dir_fd), os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"openat2 {path!r}: {os.strerror(err)}")
    return fd


def _probe() -> bool:
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY)
    try:
        os.close(openat2(fd, ".", DIR_FLAGS))
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
            return False  # no openat2 here (or a sandbox forbids it): walk component by component
        raise
    finally:
        os.close(fd)


HAVE_OPENAT2 = _probe()


def open_beneath(root_fd: int, parts: Sequence[str], flags: int, use_openat2: bool = HAVE_OPENAT2) -> int:
    """Open ``parts`` (a list of names) under the directory ``root_fd``, following no symlink on the way and
    not the last component either (``O_NOFOLLOW`` is always added). An empty list opens ``root_fd`` itself."""
    for name in parts:
        component(name)
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if not parts:
        return os.open(".", flags, dir_fd=root_fd)
    if use_openat2:
        return _openat2_steps(root_fd, [os.fsencode(n) for n in parts], flags)
    fd = root_fd
    try:
        for name in parts[:-1]:
            nxt = os.open(name, DIR_FLAGS, dir_fd=fd)
            if fd != root_fd:
                os.close(fd)
            fd = nxt
        return os.open(parts[-1], flags, dir_fd=fd)
    finally:
        if fd != root_fd:
            os.close(fd)


def _steps(names: list[bytes]) -> list[list[bytes]]:
    """``names`` cut into runs whose joined path fits ``STEP_BYTES`` (a name is at most NAME_MAX, 255)."""
    out: list[list[bytes]] = [[]]
    size = 0
    for name in names:
        if out[-1] and size + 1 + len(name) > STEP_BYTES:
            out.append([])
            size = -1
        out[-1].append(name)
        size += 1 + len(name)
    return out


def _openat2_steps(root_fd: int, names: list[bytes], flags: int) -> int:
    steps = _steps(names)
    fd = root_fd
    try:
        for step in steps[:-1]:
            nxt = openat2(fd, os.fsdecode(b"/".join(step)), DIR_FLAGS)
            if fd != root_fd:
                os.close(fd)
            fd = nxt
        return openat2(fd, os.fsdecode(b"/".join(steps[-1])), flags)
    finally:
        if fd != root_fd:
            os.close(fd)
