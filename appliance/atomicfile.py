"""Atomic file replacement: the one helper for "write a small file so readers see the old or the new, never half".

The rule (borg's SaveFile): write a temp file with a unique name in the target's directory, fsync it, rename it
over the target, fsync the directory. The unique name matters when several processes (gunicorn workers) write
the same file at once: a fixed temp name lets one writer rename the other's half-written file into place.
Concurrent writers still each replace the whole file (last rename wins); callers that read-modify-write hold a
lock around the whole cycle.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(path: Path, data: bytes, mode: int) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # mkstemp makes 0600; fchmod is exact, whatever the process umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def write_atomic(path: Path | str, data: bytes | str, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (str is UTF-8) durably and atomically; the file gets exactly ``mode``."""
    path = Path(path)
    tmp = _write_temp(path, data.encode() if isinstance(data, str) else data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def create_once(path: Path | str, data: bytes | str, mode: int = 0o600) -> bool:
    """Create ``path`` with ``data`` unless it exists; False when another writer was first (its content stays).

    For files that must be made once and then shared, like a signing key two workers may both try to create:
    ``link`` fails when the name exists, so exactly one complete file wins and nobody reads a partial one."""
    path = Path(path)
    tmp = _write_temp(path, data.encode() if isinstance(data, str) else data, mode)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True
