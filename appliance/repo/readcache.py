"""The read cache: decompressed, verified chunks of published disks kept in local sparse files.

A VM running from a backup reads the same blocks again and again, scattered over the whole disk; with 1 MiB
chunks a 4 KiB read that misses the in-memory LRU costs a 1 MiB decompression and hash. So every chunk a
session reads is also written, once, into a sparse file per (restore point, disk), at the chunk's own offset;
later reads of it are plain ``pread``s that the page cache answers (and the NFS server can serve without
leaving its event loop). This is the "hydration" Veeam and Proxmox live-restore do, kept within a byte budget.

The cache is not persistent: it is rebuilt from the repository after a restart (a crash could leave a bit set
for data that never reached the file), and it is shared by every session of the same restore point.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nfsd.filerange import FileRange, SharedFd

log = logging.getLogger("bootback.readcache")

MAX_PENDING = 64  # chunks decoded by readers and waiting to be written into the cache (64 MiB at 1 MiB chunks)
# Writing a chunk into the page cache releases the GIL; one thread keeps up with several decoding readers.
_hydrate_pool = ThreadPoolExecutor(1, thread_name_prefix="hydrate")


class ReadCache:
    """All hydrated disks of one daemon, under one directory and one byte budget."""

    def __init__(self, directory: Path, budget_bytes: int) -> None:
        self.directory = Path(directory)
        shutil.rmtree(self.directory, ignore_errors=True)  # left from an earlier run: not trusted
        self.directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.directory).free
        self.budget = max(0, min(budget_bytes, free // 2))  # never take more than half of what is free
        self.used = 0
        self._disks: dict[str, HydratedDisk] = {}
        self._lock = threading.Lock()

    def disk(self, key: str, size: int, chunk_size: int) -> HydratedDisk:
        """The hydrated file for ``key`` (restore point + disk), shared by all readers of it."""
        with self._lock:
            hd = self._disks.get(key)
            if hd is None:
                name = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
                hd = self._disks[key] = HydratedDisk(self, self.directory / f"{name}.raw", size, chunk_size)
            return hd

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.budget:
                return False
            self.used += n
            return True

    def status(self) -> dict:
        return {"path": str(self.directory), "budget": self.budget, "used": self.used, "disks": len(self._disks)}

    def close(self) -> None:
        with self._lock:
            for hd in self._disks.values():
                hd.close()
            self._disks.clear()
        shutil.rmtree(self.directory, ignore_errors=True)


class HydratedDisk:
    def __init__(self, cache: ReadCache, path: Path, size: int, chunk_size: int) -> None:
        self.cache = cache
        self.path = path
        self.size = size
        self.chunk_size = chunk_size
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        # Closed when the last reply being sent from it is gone too (``range_nowait``), not at ``close``.
        self._file: SharedFd | None = SharedFd(self._fd)
        os.ftruncate(self._fd, size)
        self._bits = bytearray((-(-size // chunk_size) + 7) // 8)
        self._enabled = True
        self._zeros_marked = False
        self._writing: set[int] = set()
        self._pending = 0
        self._queued: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    def mark_zeros(self, chunks: list[str | None]) -> None:
        """Unstored (all-zero) chunks are already right in the sparse file: mark them present, once."""
        if self._zeros_marked:
            return
        for i, cid in enumerate(chunks):
            if cid is None:
                self._bits[i >> 3] |= 1 << (i & 7)
        self._zeros_marked = True

    def has(self, index: int) -> bool:
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def store(self, index: int, data: bytes) -> None:
        """Keep chunk ``index`` (already verified) unless the budget is spent; never fails the read."""
        if self._claim(index, len(data)):
            self._write(index, data)

    def store_later(self, index: int, data: bytes) -> bool:
        """``store`` in the background: a reader that just decoded a chunk answers its client first. At most
        ``MAX_PENDING`` chunks wait (a reader faster than the disk skips the rest; a later read brings them).
        True if the chunk was taken: until it is in the file, ``queued`` has it."""
        if self._pending >= MAX_PENDING or not self._claim(index, len(data)):
            return False
        with self._lock:
            self._pending += 1
            self._queued[index] = data
        try:
            _hydrate_pool.submit(self._write_pending, index, data)
        except RuntimeError:  # the pool is shut down: the interpreter is exiting
            self._write_pending(index, data)
        return True

    def queued(self, index: int) -> bytes | None:
        """Chunk ``index`` while it waits to be written (readers use it instead of decoding it again)."""
        return self._queued.get(index)

    def _write_pending(self, index: int, data: bytes) -> None:
        try:
            self._write(index, data)
        finally:
            with self._lock:
                self._pending -= 1
                del self._queued[index]  # after its bit is set: a reader finds it in one place or the other
                if not self._pending:
                    self._idle.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until no chunk waits to be stored (for shutdown and tests); False on timeout."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    def _claim(self, index: int, n: int) -> bool:
        with self._lock:  # two readers of one chunk: one writes it, and the budget counts it once
            if not self._enabled or self.has(index) or index in self._writing or not self.cache.take(n):
                return False
            self._writing.add(index)
            return True

    def _write(self, index: int, data: bytes) -> None:
        try:
            if not self._enabled:  # closed (or failed) since the chunk was claimed
                return
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], index * self.chunk_size + done)
            # The bit is set only after the bytes are in the file, so a reader never sees a hole as data.
            self._bits[index >> 3] |= 1 << (index & 7)
        except OSError as exc:
            self._enabled = False  # e.g. the disk filled up: reads go on from the repository
            log.warning("read cache %s disabled: %s", self.path, exc)
        finally:
            with self._lock:
                self._writing.discard(index)

    def pread(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def pread_nowait(self, offset: int, length: int) -> bytes | None:
        buf = bytearray(length)
        try:
            n = os.preadv(self._fd, [buf], offset, os.RWF_NOWAIT)
        except OSError:
            return None
        return buf if n == length else None  # no copy: a 1 MiB copy costs more than the read here

    def range_nowait(self, offset: int, length: int) -> FileRange | None:
        """The hydrated bytes at ``offset`` as a ``FileRange`` to be sent with sendfile(2), if their first and
        last pages are in the page cache (else None: ``pread_nowait`` decides). A hydrated chunk never changes,
        so the bytes are still right when the connection sends them later. Pages of one range are written and
        read together, so a page evicted in the middle (sendfile would then wait for the disk on the loop) is
        the rare case this accepts."""
        file = self._file
        if file is None:
            return None
        probe = bytearray(1)
        try:
            for at in (offset, offset + length - 1):
                if os.preadv(file.fd, [probe], at, os.RWF_NOWAIT) != 1:
                    return None
        except OSError:  # EAGAIN: not in the page cache
            return None
        return FileRange(file, offset, length)

    def close(self) -> None:
        # Chunks still queued must not reach a descriptor number that the process has reused meanwhile.
        self._enabled = False
        if not self.drain(10):
            log.warning("read cache %s: stores still pending at close; its descriptor is left open", self.path)
            return
        self._file = None  # the descriptor closes when no reply holds it any more
