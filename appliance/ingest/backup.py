"""Writing restore points: read source disks in chunk-aligned blocks, store new chunks, commit a manifest.

Hashing and compression run in a thread pool (hashlib and zstandard release the GIL on large buffers), the
reading stays sequential in the calling thread. All-zero chunks are recorded as None and never stored.
The manifest is committed only after every chunk is durable, so a backup killed at any moment leaves no
visible trace but unreferenced chunks, which garbage collection removes.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from appliance.errors import SourceError, UsageError
from appliance.ingest.sources import DiskSource, read_exact
from appliance.repo.backends import ChunkBatch
from appliance.repo.manifest import DiskEntry, RestorePoint, check_vm_name, new_point_id
from appliance.repo.repository import Repository

# progress(disk name, bytes done, bytes total or None)
Progress = Callable[[str, int, int | None], None]


@dataclass
class _Counters:
    bytes_read: int = 0
    bytes_zero: int = 0
    bytes_new: int = 0  # raw bytes of chunks this backup stored
    bytes_stored: int = 0  # what they take on disk, compressed and framed
    chunks: int = 0
    chunks_new: int = 0


class _Staged:
    """Chunks this backup claimed (dedup within the backup); the writer's batch holds what was written."""

    def __init__(self) -> None:
        self._claimed: set[str] = set()
        self._lock = threading.Lock()

    def claim(self, cid: str) -> bool:
        with self._lock:
            if cid in self._claimed:
                return False
            self._claimed.add(cid)
            return True


WINDOW_BYTES = 64 << 20  # source blocks read ahead of the oldest one not done yet (at least 4 per worker)


def _default_workers(repo: Repository) -> int:
    """Hashing and compressing want a thread per core. A remote store without packs wants many requests in
    flight, each worker storing its own chunk; with packs, full packs are stored by their own threads
    (``packs.UPLOADS``), and more workers than cores only fight over the GIL (measured: 16 cost ~10 % more CPU
    and twice the page faults of 3 on two cores, docs/benchmarks.md)."""
    cores = os.cpu_count() or 2
    if repo.backend.remote:
        return 16 if repo.store.indexes is None else max(3, min(8, cores + 1))
    return max(2, min(8, cores))


def backup_vm(
    repo: Repository,
    vm: str,
    sources: Sequence[DiskSource],
    vmx_text: str | None = None,
    source_info: dict | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
) -> RestorePoint:
    """Back up ``sources`` as one new restore point of ``vm``; returns it, committed, with its stats."""
    check_vm_name(vm)
    if not sources:
        raise UsageError("a backup needs at least one disk")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise UsageError(f"two disks have the same name: {names}")
    started = time.monotonic()
    counters = _Counters()
    cs = repo.config.chunk_size
    with repo.writer() as batch, ThreadPoolExecutor(workers or _default_workers(repo)) as pool:
        staged = _Staged()
        disks = [_backup_disk(repo, s, cs, batch, pool, counters, progress, staged) for s in sources]
        repo.store.publish(batch)
        elapsed = max(time.monotonic() - started, 1e-9)
        nonzero = counters.bytes_read - counters.bytes_zero
        stats = {
            "bytes_read": counters.bytes_read,
            "bytes_zero": counters.bytes_zero,
            "bytes_new": counters.bytes_new,
            "bytes_stored": counters.bytes_stored,
            "chunks": counters.chunks,
            "chunks_new": counters.chunks_new,
            "dedup_ratio": round(nonzero / counters.bytes_new, 3) if counters.bytes_new else None,
            "compression_ratio": (
                round(counters.bytes_new / counters.bytes_stored, 3) if counters.bytes_stored else None
            ),
            "seconds": round(elapsed, 3),
            "throughput_mb_s": round(counters.bytes_read / elapsed / 1e6, 1),
        }
        now = datetime.now(UTC)
        point = RestorePoint(
            vm=vm,
            id=new_point_id(now),
            time=now,
            disks=disks,
            vmx=vmx_text,
            source=source_info or {"disks": [str(s.path) if s.path else "stdin" for s in sources]},
            stats=stats,
        )
        repo.commit_point(point, batch)
    return point


def _backup_disk(
    repo: Repository,
    source: DiskSource,
    cs: int,
    batch: ChunkBatch,
    pool: ThreadPoolExecutor,
    counters: _Counters,
    progress: Progress | None,
    staged: _Staged,
) -> DiskEntry:
    zero = bytes(cs)
    store = repo.store

    def process(block: bytes | bytearray) -> tuple[str | None, int, int]:
        cid = store.chunk_id(block)
        if not staged.claim(cid):
            return cid, 0, 0  # this backup already has it (dedup within the backup)
        stored = store.stage(cid, block, batch)
        if stored is None:
            return cid, 0, 0
        return cid, len(block), stored

    chunks: list[str | None] = []
    pending: deque[tuple[Future, bytearray]] = deque()
    window = max(4 * pool._max_workers, WINDOW_BYTES // cs)  # bounded memory: at most this many blocks in flight
    # Blocks whose chunk is done are read into again: a fresh 1 MiB buffer per chunk costs zeroing and page
    # faults (~0.3 ms per MiB here, a tenth of an S3 PUT's client CPU). ``process`` keeps no reference to its
    # block once it returns (the stored object is a new, compressed buffer).
    free: list[bytearray] = []

    def drain(n: int) -> None:
        while len(pending) > n:
            future, done_block = pending[0]
            cid, new_raw, stored = future.result()
            pending.popleft()
            if len(done_block) == cs:
                free.append(done_block)
            chunks.append(cid)
            counters.chunks += 1
            if new_raw:
                counters.chunks_new += 1
                counters.bytes_new += new_raw
                counters.bytes_stored += stored

    offset = 0
    size = source.size
    what = f"source disk {source.path or source.name}"
    try:
        while size is None or offset < size:
            want = cs if size is None else min(cs, size - offset)
            block = free.pop() if free and want == cs else bytearray(want)
            got = read_exact(source.stream, block, what)
            if got < want:
                if size is not None:
                    raise SourceError(f"{what} is truncated: it ended at byte {offset + got} of {size}")
                del block[got:]
            if not block:
                break
            counters.bytes_read += len(block)
            # The block is handed to the worker as is (copying 1 MiB costs more than hashing it here), and read
            # into again only after the worker is done with it.
            if block == zero[: len(block)]:
                counters.bytes_zero += len(block)
                done: Future = Future()
                done.set_result((None, 0, 0))
                pending.append((done, block))
            else:
                pending.append((pool.submit(process, block), block))
            offset += len(block)
            drain(window)
            if progress:
                progress(source.name, offset, size)
            if size is None and got < want:
                break
        drain(0)
    finally:
        for f, _ in pending:
            f.cancel()
    return DiskEntry(
        name=source.name,
        size=offset,
        chunk_size=cs,
        chunks=chunks,
        source_format=source.format,
        adapter=source.adapter,
        geometry=source.geometry,
    )
