"""Opening repository files without trusting what sits at their names.

A repository may be damaged or hostile: a FIFO where a chunk should be blocks a reader forever, a symlink to
/dev/zero or a huge sparse file makes it read without end. So every repository file is opened here: the last
component is never followed if it is a symlink, the open never blocks, and a file is read only if it is a
regular file no larger than what it may legitimately hold (one fstat per open).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from appliance.errors import IntegrityError

OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC


def open_regular(path: Path, name: str) -> tuple[int, int]:
    """(descriptor, size) of ``path`` if it is a regular file; IntegrityError naming ``name`` if it is anything
    else (symlink, FIFO, device, directory, socket); FileNotFoundError if it is absent."""
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise IntegrityError(f"{name}: {path} is a symbolic link, not a regular file") from None
        if exc.errno == errno.ENXIO:  # a socket (or a FIFO nobody writes, on some systems)
            raise IntegrityError(f"{name}: {path} is not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"{name}: {path} is not a regular file (mode {stat.filemode(st.st_mode)})")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_regular(path: Path, name: str, limit: int) -> bytes:
    """The whole of regular file ``path`` if it holds at most ``limit`` bytes; refused before reading otherwise."""
    fd, size = open_regular(path, name)
    try:
        if size > limit:
            raise IntegrityError(f"{name}: {path} holds {size} bytes, more than the {limit} it may hold")
        data = os.read(fd, size)
        if len(data) == size:
            return data
        parts = [data]
        got = len(data)
        while got < size:  # short reads: rare on regular files, but allowed
            more = os.read(fd, size - got)
            if not more:
                break  # shrank meanwhile: the object's own checks refuse what is missing
            parts.append(more)
            got += len(more)
        return b"".join(parts)
    finally:
        os.close(fd)
