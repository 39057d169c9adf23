"""Random access to a restore point's disk: ``read(offset, length)`` without restoring it.

This sits on the NFS read path, so it is lean: a chunk is fetched, verified against its hash and
decompressed once, then served from a bounded LRU shared by every reader of the repository (dedup means two
disks often share chunks). Concurrent misses of the same chunk wait for one load instead of decoding it twice.
A damaged chunk raises IntegrityError naming the chunk and the restore point; wrong bytes are never returned.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from appliance.errors import BootbackError, IntegrityError
from appliance.units import parse_size
from nfsd.filerange import MIN_RANGE, FileRange

if TYPE_CHECKING:
    from appliance.repo.manifest import DiskEntry, RestorePoint
    from appliance.repo.packindex import PackRecord
    from appliance.repo.readcache import HydratedDisk
    from appliance.repo.store import ChunkStore

DEFAULT_CACHE_BYTES = 256 * 1024 * 1024  # the floor; see default_cache_bytes()
MAX_DEFAULT_CACHE_BYTES = 2 << 30


def default_cache_bytes() -> int:
    """A sixteenth of the machine's memory, between 256 MiB and 2 GiB: random readers (a VM running from its
    backup) keep their hot chunks decompressed; a 1 MiB decompression per 4 KiB miss is what makes misses dear.
    Override with $BOOTBACK_CHUNK_CACHE (e.g. 512M)."""
    env = os.environ.get("BOOTBACK_CHUNK_CACHE")
    if env:
        return parse_size(env)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return DEFAULT_CACHE_BYTES
    return max(DEFAULT_CACHE_BYTES, min(MAX_DEFAULT_CACHE_BYTES, ram // 16))


READ_AHEAD = 4  # chunks decoded ahead of a sequential reader (a boot, a copy, a migration)
SPAN_BYTES = 16 << 20  # the most one read-ahead request fetches of a run of chunks in one pack
SPAN_GAP = 2 << 20  # bytes between two chunks of a run that are read and dropped rather than asked for apart

# Decoding (zstd, SHA-256) releases the GIL, so a shared pool of one thread a core decodes ahead on every core
# (two at least: one overlaps the reader's own work on a single core).
_read_ahead_pool = ThreadPoolExecutor(max(2, len(os.sched_getaffinity(0))), thread_name_prefix="read-ahead")
# A remote store's fetches mostly wait on the network: many in flight keep a sequential reader streaming
# (the store says how far ahead, ``ObjectStore.read_ahead``); each fetched chunk also lands in the read cache.
_fetch_ahead_pool = ThreadPoolExecutor(16, thread_name_prefix="fetch-ahead")


class ChunkCache:
    """A thread-safe cache of decompressed chunks, bounded in bytes, evicting like CLOCK (second chance).

    Hits take no lock: they only look the chunk up and mark it referenced (both atomic under the GIL), since a
    hit is the hot path of every small read. Eviction, under the lock, passes over referenced chunks once.
    """

    def __init__(self, capacity_bytes: int | None = None) -> None:
        capacity_bytes = default_cache_bytes() if capacity_bytes is None else capacity_bytes
        self.capacity = capacity_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._loading: dict[str, Future[bytes]] = {}
        self._size = 0
        self._lock = threading.Lock()
        self._referenced: set[str] = set()
        self.hits = 0
        self.misses = 0

    def lookup(self, cid: str) -> bytes | None:
        data = self._items.get(cid)
        if data is not None:
            self._referenced.add(cid)
            self.hits += 1  # approximate under threads: a statistic, not a guarantee
        return data

    def get(self, cid: str, load: Callable[[], bytes], keep: Callable[[bytes], bool] | None = None) -> bytes:
        """The chunk, loaded once however many threads ask at the same time; kept unless ``keep`` says no."""
        data = self.lookup(cid)
        if data is not None:
            return data
        with self._lock:
            data = self._items.get(cid)
            if data is not None:
                return data
            self.misses += 1
            pending = self._loading.get(cid)
            if pending is None:
                pending = self._loading[cid] = Future()
                owner = True
            else:
                owner = False
        if not owner:
            return pending.result()
        try:
            data = load()
        except BaseException as exc:
            self.settle(cid, pending, exc)
            raise
        self.settle(cid, pending, data, keep=keep is None or keep(data))
        return data

    def reserve(self, cid: str) -> Future[bytes] | None:
        """Take the load of ``cid`` on behalf of a caller that will ``settle`` it (a fetch of several chunks at
        once): readers asking meanwhile wait for it. None when it is cached or another load has it."""
        with self._lock:
            if cid in self._items or cid in self._loading:
                return None
            self.misses += 1
            pending = self._loading[cid] = Future()
            return pending

    def settle(self, cid: str, pending: Future[bytes], result: bytes | BaseException, keep: bool = True) -> None:
        """End a ``reserve``d load with its chunk (kept unless ``keep`` is False) or the error that stopped it."""
        with self._lock:
            del self._loading[cid]
            kept = keep and not isinstance(result, BaseException)
            if kept and cid not in self._items and len(result) <= self.capacity:
                self._items[cid] = result
                self._size += len(result)
                self._evict()
        if isinstance(result, BaseException):
            pending.set_exception(result)
        else:
            pending.set_result(result)

    def _evict(self) -> None:
        while self._size > self.capacity and self._items:
            cid, old = self._items.popitem(last=False)
            if cid in self._referenced:
                self._referenced.discard(cid)  # used since it was last passed over: a second chance
                self._items[cid] = old
                continue
            self._referenced.discard(cid)
            self._size -= len(old)

    def peek(self, cid: str) -> bytes | None:
        """The chunk if it is in memory, else None; never loads, never waits for a load."""
        return self.lookup(cid)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._referenced.clear()
            self._size = 0


def read_ahead_chunks(store: ChunkStore, chunk_size: int) -> int:
    """How many chunks a sequential reader keeps coming ahead of it: a remote store's own figure, and with packs
    at least two spans' worth (refilled by halves, so each refill is whole spans)."""
    backend = store.backend
    if not backend.remote:
        return READ_AHEAD
    if store.indexes is None:
        return backend.read_ahead
    return max(backend.read_ahead, 2 * SPAN_BYTES // chunk_size)


def streaming_cache_bytes(read_ahead: int, chunk_size: int) -> int:
    """In-memory cache for a reader that reads each chunk once (a restore): twice the fetch-ahead window and the
    chunk being read, at least 64 MiB. Smaller, chunks fetched ahead are evicted before use and fetched again:
    the chunks just read were referenced, so CLOCK's second chance keeps them for one more pass and evicts the
    unread ones fetched ahead first (16 chunks of 4 MiB in a 64 MiB cache: 36 GETs for 20 chunks)."""
    return max(64 << 20, 2 * (read_ahead + 1) * chunk_size)


class DiskReader:
    """Read-only random access to one disk of one restore point (checked when it was loaded). Thread-safe.

    Chunks come from ``store`` through ``cache`` (shared by the repository's readers) and, when given, the
    read cache's ``hydrated`` file. Each chunk's length is checked where it is used, so even a chunk whose
    content is right but which does not belong at this offset is refused, never served short or long."""

    def __init__(
        self,
        store: ChunkStore,
        cache: ChunkCache,
        point: RestorePoint,
        disk: DiskEntry,
        hydrated: HydratedDisk | None = None,
    ) -> None:
        if disk.chunks is None or len(disk.chunks) != disk.chunk_count:
            raise ValueError(f"DiskReader needs the chunk list of {point.ref} disk {disk.name}")  # a caller's bug
        self.store = store
        self.cache = cache
        self.hydrated = hydrated
        self.point = point
        self.disk = disk
        self.size = disk.size
        self.chunk_size = disk.chunk_size
        self._last = len(disk.chunks) - 1
        self._last_len = disk.size - self._last * disk.chunk_size
        self._zero = bytes(disk.chunk_size)
        self._context = f"restore point {point.ref}, disk {disk.name}"
        remote = store.backend.remote
        self.read_ahead = read_ahead_chunks(store, disk.chunk_size)
        self._spanning = remote and store.indexes is not None  # read ahead by runs of a pack (``runs``)
        self._pool = _fetch_ahead_pool if remote else _read_ahead_pool
        self._next_expected = -1  # the chunk a sequential reader will want next
        self._ahead_until = -1  # chunks below this are already decoded or being decoded

    def chunk(self, index: int) -> bytes:
        """The whole (decompressed, verified) chunk ``index``; zeros for an unstored all-zero chunk."""
        cid = self.disk.chunks[index]
        if cid is None:
            return self._zero
        data = self.cache.lookup(cid)  # the common case, without building the loader below
        if data is None:
            store = self.store
            data = self.cache.get(cid, lambda: store.get(cid, self._context))
        return self._checked(index, cid, data)

    def _chunk_len(self, index: int) -> int:
        return self.chunk_size if index < self._last else self._last_len

    def _all_hydrated(self, first: int, last: int) -> bool:
        hd = self.hydrated
        return hd is not None and all(hd.has(i) for i in range(first, last + 1))

    def _checked(self, index: int, cid: str, data: bytes) -> bytes:
        """``data`` if chunk ``index`` may have its length (one comparison: content was hash-checked on load)."""
        expected = self._chunk_len(index)
        if len(data) != expected:
            raise IntegrityError(
                f"chunk {cid} holds {len(data)} bytes where chunk {index} needs {expected} ({self._context})"
            )
        return data

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; shorter only at the end of the disk, empty past it."""
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length: {offset}, {length}")
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        cs = self.chunk_size
        first, last = offset // cs, (end - 1) // cs
        self._read_ahead(first, last)
        hd = self.hydrated
        if self._all_hydrated(first, last):
            return hd.pread(offset, end - offset)
        if first == last:
            start = offset - first * cs
            data = self._chunk_hydrating(first)
            return data[start : start + (end - offset)]
        parts = []
        for index in range(first, last + 1):
            data = self._chunk_hydrating(index)
            base = index * cs
            parts.append(memoryview(data)[max(offset, base) - base : min(end, base + cs) - base])
        return b"".join(parts)

    def _read_ahead(self, first: int, last: int) -> None:
        """When reads walk the disk in order, decode the next chunks in the background. Every read that is
        answered notes itself here (``read``, and ``read_cached``/``file_range`` when they answer; a miss is
        noted once, by the ``read`` that follows it): a sequential reader answered from memory or the read
        cache must keep the chunks ahead of it coming, or its next miss finds none decoded."""
        sequential = first in (self._next_expected, self._next_expected - 1)
        self._next_expected = last + 1
        if not sequential:
            return
        if self._spanning and self._ahead_until - (last + 1) > self.read_ahead // 2:
            return  # refilled by halves: each refill is long runs of a pack, one request each
        start = max(last + 1, self._ahead_until)
        stop = min(last + 1 + self.read_ahead, len(self.disk.chunks))
        wanted = [
            index
            for index in range(start, stop)
            if self.disk.chunks[index] is not None and not (self.hydrated and self.hydrated.has(index))
        ]
        for span in self.runs(wanted):
            if len(span) == 1:
                self._pool.submit(self._prefetch, span[0][0])
            else:
                self._pool.submit(self._prefetch_span, span)
        self._ahead_until = max(self._ahead_until, stop)

    def runs(self, wanted: list[int]) -> list[list[tuple[int, PackRecord | None]]]:
        """``wanted`` chunks grouped into runs that lie close together in one pack (one ranged GET each, up to
        ``SPAN_BYTES``, gaps of at most ``SPAN_GAP`` read and dropped: a backup's threads store a disk's chunks
        nearly, not exactly, in order); every other chunk alone. Only for a remote store, where a request costs
        more than its bytes. Runs come in the order a sequential reader needs them."""
        if not self._spanning:
            return [[(index, None)] for index in wanted]
        alone: list[list[tuple[int, PackRecord | None]]] = []
        by_pack: dict[bytes, list[tuple[int, PackRecord]]] = {}
        seen: set[PackRecord] = set()
        for index in wanted:
            rec = self.store.locate(self.disk.chunks[index])
            if rec is None:
                alone.append([(index, None)])
            elif rec not in seen:  # a chunk twice in the disk: fetched once, both readers wait for it
                seen.add(rec)
                by_pack.setdefault(rec.pack, []).append((index, rec))
        runs: list[list[tuple[int, PackRecord | None]]] = []
        for items in by_pack.values():
            items.sort(key=lambda item: item[1].offset)
            run: list[tuple[int, PackRecord | None]] = []
            for index, rec in items:
                if run:
                    start, end = run[0][1].offset, run[-1][1].offset + run[-1][1].length  # type: ignore[union-attr]
                    if rec.offset - end > SPAN_GAP or rec.offset + rec.length - start > SPAN_BYTES:
                        runs.append(run)
                        run = []
                run.append((index, rec))
            runs.append(run)
        return sorted(alone + runs, key=lambda run: min(index for index, _ in run))

    def _prefetch_span(self, span: list[tuple[int, PackRecord | None]]) -> None:
        """Fetch a run of chunks by one ranged read, then hand each to the readers waiting for it; a chunk another
        load already had is skipped. A chunk that fails its check, or all of them if the run cannot be read, is
        loaded alone, so a reader gets exactly the error (or the bytes) a read of that chunk alone gives."""
        chunks = self.disk.chunks
        taken = [(index, rec, self.cache.reserve(chunks[index])) for index, rec in span]
        if all(pending is None for _, _, pending in taken):
            return
        datas = self._run_objects([index for index, _, _ in taken], [rec for _, rec, _ in taken])  # type: ignore[misc]
        hd = self.hydrated
        for (index, _, pending), data in zip(taken, datas, strict=True):
            if pending is None:
                continue
            cid = chunks[index]
            try:
                data = self._checked(index, cid, data if data is not None else self.store.get(cid, self._context))
            except Exception as exc:  # noqa: BLE001 - handed to the readers waiting for this chunk
                self.cache.settle(cid, pending, exc)
                continue
            self.cache.settle(cid, pending, data, keep=hd is None or not hd.store_later(index, data))

    def _run_objects(self, indices: list[int], recs: list[PackRecord]) -> list[bytes | None]:
        """Chunks ``indices`` (their records ``recs``, apart, in pack order) by one ranged read, each checked:
        None for one that fails its check, and for all of them when the run cannot be read. Callers read those
        alone, which gives each its own error."""
        try:
            return self.store.get_span([self.disk.chunks[i] for i in indices], recs, self._context)
        except Exception:  # noqa: BLE001 - each chunk is read alone by the caller, with its own error
            return [None] * len(indices)

    def _prefetch(self, index: int) -> None:
        try:
            self._chunk_hydrating(index)
        except Exception:  # noqa: BLE001 - the foreground read of this chunk reports the error
            pass

    def hydrate(self, index: int) -> None:
        """Fetch chunk ``index`` into the read cache around the in-memory cache (a whole-disk warm-up, ``prefetch``,
        must not evict what a VM is using); nothing if it is there already or unstored."""
        hd, cid = self.hydrated, self.disk.chunks[index]
        if hd is None or cid is None or hd.has(index):
            return
        data = self.cache.peek(cid)
        if data is None:
            data = self.store.get(cid, self._context)
        hd.store(index, self._checked(index, cid, data))

    def hydrate_run(self, run: list[tuple[int, PackRecord | None]]) -> list[BootbackError]:
        """``hydrate`` each chunk of ``run`` (one of ``runs``) that is not there yet: a run of a pack by one ranged
        read. A chunk that fails its check, or every chunk if the run cannot be read, is fetched alone, so its
        error is exactly what ``hydrate`` gives; the errors are returned, the other chunks stored."""
        hd, chunks = self.hydrated, self.disk.chunks
        if hd is None:
            raise ValueError("hydrate_run needs a reader with a read cache")  # a caller's bug
        todo = [(index, rec) for index, rec in run if not hd.has(index)]
        datas: list[bytes | None] = [None] * len(todo)
        if len(todo) > 1 and all(rec is not None for _, rec in todo):
            datas = self._run_objects([index for index, _ in todo], [rec for _, rec in todo])  # type: ignore[misc]
        errors: list[BootbackError] = []
        for (index, _), data in zip(todo, datas, strict=True):
            try:
                if data is None:
                    self.hydrate(index)
                else:
                    hd.store(index, self._checked(index, chunks[index], data))
            except BootbackError as exc:
                errors.append(exc)
        return errors

    def _chunk_hydrating(self, index: int) -> bytes:
        """``chunk``, and into the read cache with it. A chunk on its way there is not also kept in the chunk
        cache: once written, reads of it are page-cache reads, and its buffer is freed for the next chunk,
        where keeping it meant fresh memory (page faults, zeroing) for every chunk a published disk reads."""
        hd, cid = self.hydrated, self.disk.chunks[index]
        if hd is None or cid is None:
            return self.chunk(index)
        data = hd.queued(index)
        if data is not None:
            return data
        if hd.has(index):  # a read that also needs chunks not hydrated yet: this one is in the file
            return hd.pread(index * self.chunk_size, self._chunk_len(index))
        data = self.cache.lookup(cid)
        if data is not None:
            hd.store_later(index, self._checked(index, cid, data))
            return data
        store = self.store
        return self.cache.get(
            cid,
            lambda: self._checked(index, cid, store.get(cid, self._context)),
            keep=lambda data: not hd.store_later(index, data),
        )

    def file_range(self, offset: int, length: int) -> FileRange | None:
        """The bytes of a large read (``MIN_RANGE`` or more) as a ``FileRange`` of the read cache, for the NFS
        connection to send with sendfile(2): when every chunk is hydrated and in the page cache, else None."""
        end = min(offset + length, self.size)
        hd = self.hydrated
        if hd is None or end - offset < MIN_RANGE or offset < 0:
            return None
        cs = self.chunk_size
        first, last = offset // cs, (end - 1) // cs
        if not self._all_hydrated(first, last):
            return None
        found = hd.range_nowait(offset, end - offset)
        if found is not None:
            self._read_ahead(first, last)
        return found

    def read_cached(self, offset: int, length: int) -> bytes | None:
        """``read`` when every chunk it needs is in memory, else None (for callers that must not block)."""
        end = min(offset + length, self.size)
        if offset >= end:
            return b"" if offset >= 0 and length >= 0 else None
        cs = self.chunk_size
        first, last = offset // cs, (end - 1) // cs
        hd = self.hydrated
        if self._all_hydrated(first, last):
            found = hd.pread_nowait(offset, end - offset)
            if found is not None:
                self._read_ahead(first, last)
            return found
        parts = []
        for index in range(first, last + 1):
            cid = self.disk.chunks[index]
            if cid is None:
                data = self._zero
            else:
                data = hd.queued(index) if hd is not None else None
                if data is None:
                    data = self.cache.peek(cid)
            if data is None:
                return None
            if cid is not None:
                self._checked(index, cid, data)
            base = index * cs
            parts.append(memoryview(data)[max(offset, base) - base : min(end, base + cs) - base])
        self._read_ahead(first, last)
        return parts[0] if len(parts) == 1 else b"".join(parts)  # a view of an immutable chunk: no copy

    def is_zero(self, index: int) -> bool:
        return self.disk.chunks[index] is None
