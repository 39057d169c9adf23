"""Migration: copy a running session's disks (backup + changes) out while the VM keeps writing.

Like a storage vMotion: a first pass copies everything, later passes copy the blocks written meanwhile,
and the last pass runs with writes held back, so the output is the disk as it was at one instant.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import NoSpaceError, SessionError

if TYPE_CHECKING:
    from appliance.datastore.folder import SessionFolder
    from appliance.sessions.records import SessionRecord

log = logging.getLogger("bootback.migrate")
COPY_SIZE = 1 << 20
MAX_PASSES = 6


class Migration:
    def __init__(self, rec: SessionRecord, folder: SessionFolder, output: Path,
                 on_done: Callable[[Migration], None] | None = None) -> None:  # fmt: skip
        self.rec = rec
        self.folder = folder
        self.output = output
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
        folder_mode = output.is_dir() or not output.suffix
        if not folder_mode and len(folder.extents) != 1:
            raise SessionError(f"{rec.vm} has {len(folder.extents)} disks: give a directory to migrate into")
        self.folder_mode = folder_mode

    def start(self) -> None:
        self.running = True
        self._thread.start()

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def cancel(self) -> None:
        self._cancel.set()

    def status(self) -> dict:
        return {
            "output": str(self.output), "total_bytes": self.total, "copied_bytes": self.copied,
            "percent": round(100 * self.copied / self.total, 1) if self.total else 100.0,
            "passes": self.passes, "running": self.running, "error": self.error,
            "seconds": round((self.finished or time.time()) - self.started, 1),
        }  # fmt: skip

    def _run(self) -> None:
        try:
            if self.folder_mode:
                self.output.mkdir(parents=True, exist_ok=True)
            for ext in self.folder.extents:
                if self.folder.names.get(ext.key) is None:
                    continue
                target = self.output / ext.key if self.folder_mode else self.output
                self._copy_extent(ext.cache, target)
            if self.folder_mode:
                for item in (self.folder.directory / "files").iterdir():
                    if item.is_file() and not item.name.startswith(".lck"):
                        shutil.copy2(item, self.output / item.name)
        except OSError as exc:
            self.error = f"no space left writing {self.output}" if exc.errno == 28 else str(exc)
            log.error("migration of %s failed: %s", self.rec.id, self.error)
        except Exception as exc:  # noqa: BLE001 - reported through status()
            self.error = str(exc)
            log.exception("migration of %s failed", self.rec.id)
        finally:
            self.running = False
            self.finished = time.time()
            if self.on_done:
                self.on_done(self)

    def _copy_extent(self, cache, target: Path) -> None:
        bs = cache.block
        with open(target, "wb") as out:
            out.truncate(cache.size)
            fd = out.fileno()
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
            os.fsync(fd)

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
