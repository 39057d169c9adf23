"""Migration: copy a running session's disks (backup + changes) out while the VM keeps writing.

Like a storage vMotion: a first pass copies everything, later passes copy the blocks written meanwhile,
and the last pass runs with writes held back, so the output is the disk as it was at one instant.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import NoSpaceError, SessionError
from appliance.sessions.confine import ConfinedDir, NewFile

if TYPE_CHECKING:
    from appliance.datastore.folder import SessionFolder
    from appliance.sessions.records import SessionRecord

log = logging.getLogger("bootback.migrate")
COPY_SIZE = 1 << 20
MAX_PASSES = 6
WHAT = "migration output"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Migration:
    def __init__(
        self,
        rec: SessionRecord,
        folder: SessionFolder,
        output: str | Path,
        roots: Sequence[Path],
        overwrite: bool = False,
        on_done: Callable[[Migration], None] | None = None,
    ) -> None:
        """Checks and opens the output now, under the configured ``roots`` (confine.py), so a refused output
        is the caller's error at once; copying starts with ``start``."""
        self.rec = rec
        self.folder = folder
        self.overwrite = overwrite
        self.on_done = on_done
        self.total = sum(e.cache.size for e in folder.extents)
        self.copied = 0
        self.passes = 0
        self.error: str | None = None
        self.started = time.time()
        self.finished: float | None = None
        self.running = False
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"migrate-{rec.id}", daemon=True)
        self._file: NewFile | None = None  # file mode: the one disk's output, created now
        parent, name = ConfinedDir.open_parent(roots, output, WHAT)
        self.output = parent.path / name if name else parent.path
        try:
            self.folder_mode = name is None or parent.is_dir(name) or not Path(name).suffix
            if self.folder_mode:
                self._dir = parent.subdir(name, True, WHAT) if name else parent
                for planned in [e.key for e in folder.extents] + self._file_names():
                    self._dir.check_new(planned, overwrite, WHAT)
            else:
                if len(folder.extents) != 1:
                    raise SessionError(f"{rec.vm} has {len(folder.extents)} disks: give a directory to migrate into")
                self._dir = parent
                self._file = parent.create(name, overwrite, WHAT)
        finally:
            if parent is not getattr(self, "_dir", None):
                parent.close()

    def _file_names(self) -> list[str]:
        return sorted(n for n in os.listdir(self.folder.directory / "files") if not n.startswith(".lck"))

    def start(self) -> None:
        self.running = True
        self._thread.start()

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def cancel(self) -> None:
        self._cancel.set()

    def status(self) -> dict:
        return {
            "output": str(self.output),
            "total_bytes": self.total,
            "copied_bytes": self.copied,
            "percent": round(100 * self.copied / self.total, 1) if self.total else 100.0,
            "passes": self.passes,
            "running": self.running,
            "error": self.error,
            "seconds": round((self.finished or time.time()) - self.started, 1),
        }

    def _run(self) -> None:
        current: NewFile | None = self._file
        try:
            for ext in self.folder.extents:
                if self.folder.names.get(ext.key) is None:
                    continue
                if self.folder_mode:
                    current = self._dir.create(ext.key, self.overwrite, WHAT)
                self._copy_extent(ext.cache, current.fd)
                current.commit()
                current = None
            if self.folder_mode:
                self._copy_files()
        except OSError as exc:
            self.error = f"no space left writing {self.output}" if exc.errno == 28 else str(exc)
            log.error("migration of %s failed: %s", self.rec.id, self.error)
        except Exception as exc:  # noqa: BLE001 - reported through status()
            self.error = str(exc)
            log.exception("migration of %s failed", self.rec.id)
        finally:
            if current is not None:
                current.abort()
            self._dir.close()
            self.running = False
            self.finished = time.time()
            if self.on_done:
                self.on_done(self)

    def _copy_files(self) -> None:
        """The folder's real files (.vmx, descriptors, nvram ...), which NFS clients wrote: regular files are
        copied, symbolic links copied as links (never followed), anything else skipped."""
        written = {e.key for e in self.folder.extents}
        src = os.open(self.folder.directory / "files", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for name in self._file_names():
                if name in written:
                    continue
                try:
                    st = os.stat(name, dir_fd=src, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISLNK(st.st_mode):
                    self._dir.symlink(os.readlink(name, dir_fd=src), name, self.overwrite, WHAT)
                elif stat.S_ISREG(st.st_mode):
                    self._copy_file(src, name)
        finally:
            os.close(src)

    def _copy_file(self, src_dir: int, name: str) -> None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=src_dir)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOENT):
                return  # replaced by a link or removed since it was listed
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return
            out = self._dir.create(name, self.overwrite, WHAT)
            try:
                while chunk := os.read(fd, COPY_SIZE):
                    _write_all(out.fd, chunk)
                os.utime(out.fd, ns=(st.st_atime_ns, st.st_mtime_ns))
                out.commit()
            except BaseException:
                out.abort()
                raise
        finally:
            os.close(fd)

    def _copy_extent(self, cache, fd: int) -> None:
        bs = cache.block
        os.ftruncate(fd, cache.size)
        cache.dirty_tracker = set()
        try:
            for offset in range(0, cache.size, COPY_SIZE):
                if self._cancel.is_set():
                    raise SessionError("migration cancelled")
                self._copy_range(cache, fd, offset, min(COPY_SIZE, cache.size - offset), sparse=True)
                self.copied += min(COPY_SIZE, cache.size - offset)
            self.passes = 1
            while True:
                with cache._lock:
                    dirty, cache.dirty_tracker = cache.dirty_tracker, set()
                    last = len(dirty) * bs < 64 * COPY_SIZE or self.passes >= MAX_PASSES
                    if last:
                        # final pass with writes held back: the output is one instant of the disk
                        for index in sorted(dirty):
                            self._copy_range(cache, fd, index * bs, min(bs, cache.size - index * bs))
                        os.ftruncate(fd, cache.size)
                        break
                for index in sorted(dirty):
                    self._copy_range(cache, fd, index * bs, min(bs, cache.size - index * bs))
                self.passes += 1
            self.passes += 1
        finally:
            cache.dirty_tracker = None

    @staticmethod
    def _copy_range(cache, fd: int, offset: int, length: int, sparse: bool = False) -> None:
        if length <= 0:
            return
        data = cache.read(offset, length)
        if sparse and data.count(0) == len(data):
            return  # the first pass writes into a fresh sparse file: zeros need no writing
        try:
            os.pwrite(fd, data, offset)
        except OSError as exc:
            if exc.errno == 28:
                raise NoSpaceError(f"no space left writing migration output at offset {offset}") from exc
            raise
