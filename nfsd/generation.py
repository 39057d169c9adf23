"""An inode's generation: what tells a file apart from an earlier one that had the same inode number.

ext4 (and xfs, btrfs) reuse a removed file's inode number for the next file at once, so a handle naming only
the inode would read and write whoever got the number next. The handle's ``generation`` carries:

* for regular files and directories, the inode's own generation (``FS_IOC_GETVERSION``; ext4 draws it at
  random for each new inode). The ioctl needs a real descriptor: the object's ``O_PATH`` descriptor is
  reopened through ``/proc/self/fd`` (exactly that inode, never a path) read-only and non-blocking;
* for other types (symlinks, FIFOs, sockets, devices: never opened) and on file systems without the ioctl
  (tmpfs, overlayfs...), the birth time from ``statx`` on the ``O_PATH`` descriptor, folded to 32 bits;
* 0 where neither is available (the file system keeps no birth time, or we may not open the object: not
  root and no read permission, or no ``/proc``). 0 means "unchecked": handles issued before generations
  existed carry 0 and keep resolving, by inode alone, as they always did.

The source depends only on the file system and the object's type, which never change for one inode, so the
same object always gets the same value.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct

FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long)
_NO_IOCTL = (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)

SYS_STATX = 332 if os.uname().machine == "x86_64" else 291  # x86_64; 291 is the generic table (arm64, riscv)
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
STATX_BTIME = 0x800


class _Statx(ctypes.Structure):
    # Only the head we need, then room for the rest: the kernel fills at most 256 bytes.
    _fields_ = [
        ("mask", ctypes.c_uint32),
        ("blksize", ctypes.c_uint32),
        ("attributes", ctypes.c_uint64),
        ("nlink", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32),
        ("mode", ctypes.c_uint16),
        ("_pad0", ctypes.c_uint16),
        ("ino", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("blocks", ctypes.c_uint64),
        ("attributes_mask", ctypes.c_uint64),
        ("atime", ctypes.c_int64 * 2),
        ("btime_sec", ctypes.c_int64),
        ("btime_nsec", ctypes.c_uint32),
        ("_rest", ctypes.c_uint8 * 160),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def birth_generation(fd: int) -> int:
    """The birth time of the object ``fd`` (any descriptor, O_PATH too) folded to 32 bits; 0 if unknown."""
    buf = _Statx()
    rc = _syscall(
        SYS_STATX,
        ctypes.c_int(fd),
        b"",
        ctypes.c_int(AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW),
        ctypes.c_uint(STATX_BTIME),
        ctypes.byref(buf),
    )
    if rc < 0 or not buf.mask & STATX_BTIME:
        return 0
    ns = buf.btime_sec * 1_000_000_000 + buf.btime_nsec
    return (ns ^ (ns >> 32)) & 0xFFFFFFFF


def _ioctl_generation(fd: int) -> int:
    return struct.unpack("=q", fcntl.ioctl(fd, FS_IOC_GETVERSION, bytes(8)))[0] & 0xFFFFFFFF


def generation(fd: int, st: os.stat_result, opened: bool = False) -> int:
    """The generation of the object ``fd`` refers to (``st`` its fstat). ``fd`` is an O_PATH descriptor unless
    ``opened`` (a real descriptor of a regular file or directory, used as it is)."""
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return birth_generation(fd)
    real = fd
    try:
        if not opened:
            real = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        return _ioctl_generation(real)
    except OSError as exc:
        if exc.errno in _NO_IOCTL:
            return birth_generation(fd)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.ENOENT):
            return 0  # may not open it (not root), or no /proc: unchecked, as before generations
        raise
    finally:
        if real != fd:
            os.close(real)


def same(issued: int, current: int) -> bool:
    """Whether a handle's generation ``issued`` admits the object now found with ``current``: 0 on either side
    is "unchecked" (an old handle, or a file system that gives nothing)."""
    return issued == 0 or current == 0 or issued == current
