"""Pack objects: many chunk objects in one stored object, found through index objects.

On S3 an object costs the service far more than its bytes (docs/repository-format.md, "Pack objects"), so a
repository with the ``packs`` feature stores a backup's new chunks back to back in ~16 MiB packs and, before its
restore point, one index object naming where each chunk sits. A pack body holds the chunk objects exactly as
they would be stored loose, so reading one from a pack is a ranged read followed by the same checks: an index is
a hint, never trusted for bytes.

- ``PackWriter`` fills packs and stores them through a ``put`` callable (a backup's batch, or garbage
  collection's repack), and returns where each chunk went.
- ``PackingBatch`` is the backup's ``ChunkBatch`` in such a repository: chunk objects go into packs, the dedup
  check asks the indexes, ``publish`` stores the last pack and then the index, before the point is written.
- ``IndexSet`` is a reader's view of every index object: loaded at first use, reloaded (only the new objects)
  when a chunk is not found, since a newer backup or a repack may have written it.
"""

from __future__ import annotations

import re
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from appliance.errors import IntegrityError, UnsupportedFormatError
from appliance.repo import packindex
from appliance.repo.backends import ChunkBatch, ObjectStore
from appliance.repo.objects import Envelope
from appliance.repo.packindex import RECORD, PackIndex, PackRecord

PACK_TARGET = 16 << 20  # measured: 16 MiB packs bring the gateway's CPU per MB to a bulk upload's
UPLOADS = 4  # packs stored at once by a backup to a remote store: 4 x 16 MiB in flight keep RGW busy
RELOAD_INTERVAL = 1.0  # seconds before a chunk not found after a reload causes another reload
MAX_REMEMBERED_MISSES = 4096
_PACK_KEY_RE = re.compile(r"packs/([0-9a-f]{2})/(\1[0-9a-f]{30})")
PACK_ID_AT = 32  # a record's pack id follows its 32-byte chunk id
INDEX_PREFIX = "index/"
PACK_PREFIX = "packs/"
CHUNK_PREFIX = "chunks/"
LOAD_BATCH = 16 << 20  # bytes of records of several index objects merged in memory before one PackIndex.add:
# each add rewrites the whole merged file, so one add per object made loading quadratic in their count
_SPLIT = struct.Struct(f">{packindex.CHUNK_SIZE}s{RECORD.size - packindex.CHUNK_SIZE}s")  # chunk id, the rest


class PackWriter:
    """Appends chunk objects to the pack being filled and stores each pack once it reaches ``target`` bytes;
    thread-safe. ``records`` holds where every appended chunk went (RECORD-packed).

    By default the thread whose object fills a pack stores it, outside the lock, so packs go out in parallel
    while other threads keep appending. With ``uploads`` (a remote store), full packs are stored by that many
    threads of their own, at most ``uploads`` packs given to them at once (an appender that fills one more
    waits with it: memory holds at most uploads + appenders full packs): the appending threads (hashing and
    compressing, CPU-bound) do not wait on the network while a slot is free, nor does the reader behind them
    wait on a thread stuck in a PUT. A failed store is raised by every later ``add`` and by ``flush``."""

    def __init__(self, put: Callable[[str, bytes], None], target: int = PACK_TARGET, uploads: int = 0) -> None:
        self._put = put
        self._target = target
        self._lock = threading.Lock()
        self._pack = packindex.new_pack_id()
        self._parts: list[bytes] = []
        self._size = 0
        self.records = bytearray()
        self.count = 0
        self._pool = ThreadPoolExecutor(uploads, thread_name_prefix="pack-upload") if uploads else None
        self._slots = threading.BoundedSemaphore(uploads) if uploads else None
        self._failed: BaseException | None = None

    def add(self, chunk: bytes, blob: bytes) -> None:
        """Append the stored object ``blob`` of chunk ``chunk`` (its 32-byte id)."""
        self._raise_failed()
        with self._lock:
            self.records += RECORD.pack(chunk, self._pack, self._size, len(blob))
            self.count += 1
            self._parts.append(blob)
            self._size += len(blob)
            full = self._take() if self._size >= self._target else None
        if full is not None:
            self._store(*full)

    def flush(self) -> None:
        """Store the pack being filled, if it holds anything, and wait until every pack is stored (callers: after
        every ``add`` has returned)."""
        with self._lock:
            full = self._take() if self._parts else None
        if full is not None:
            self._store(*full)
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # every pack submitted is stored, or its failure recorded
        self._raise_failed()

    def _take(self) -> tuple[str, list[bytes]]:
        key, parts = packindex.pack_key(self._pack), self._parts
        self._pack, self._parts, self._size = packindex.new_pack_id(), [], 0
        return key, parts

    def _store(self, key: str, parts: list[bytes]) -> None:
        slots = self._slots
        if self._pool is None or slots is None:
            self._put(key, b"".join(parts))  # joined outside the lock: 16 MiB of copying would stall appenders
            return
        slots.acquire()  # bounded memory: at most ``uploads`` packs given to the upload threads
        try:
            self._raise_failed()
            future = self._pool.submit(self._upload, key, parts)
        except BaseException:
            slots.release()  # the next appender waiting for a slot must see the failure too, not hang
            raise
        future.add_done_callback(lambda _f: slots.release())

    def _upload(self, key: str, parts: list[bytes]) -> None:
        try:
            self._put(key, b"".join(parts))
        except BaseException as exc:
            with self._lock:
                self._failed = self._failed or exc
            raise

    def _raise_failed(self) -> None:
        if self._failed is not None:
            raise self._failed

    def close(self) -> None:
        """Stop the upload threads (a backup that failed: packs not stored yet are dropped, as its other garbage)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def iter_records(self) -> Iterator[PackRecord]:
        for i in range(0, len(self.records), RECORD.size):
            yield PackRecord(*RECORD.unpack_from(self.records, i))


def write_indexes(
    records: list[PackRecord] | Iterator[PackRecord],
    envelope: Envelope,
    put: Callable[[str, bytes], None],
    writer: str | None = None,
) -> list[str]:
    """Store ``records`` as index objects of at most MAX_RECORDS each (named by ``writer``, a fresh uuid by
    default); returns their keys."""
    writer = writer or uuid.uuid4().hex
    ordered = sorted(records, key=lambda r: r.chunk)
    keys = []
    for seq, start in enumerate(range(0, len(ordered), packindex.MAX_RECORDS)):
        key = packindex.index_key(writer, seq)
        put(key, packindex.encode_index(ordered[start : start + packindex.MAX_RECORDS], envelope, key))
        keys.append(key)
    return keys


class PackingBatch(ChunkBatch):
    """A backup's batch in a repository with packs, around the store's own batch (``inner``): chunk objects
    are appended to packs staged through ``inner``; ``publish`` stages the last pack, then this backup's index,
    then publishes ``inner`` (a directory renames them in that order; S3 has them stored already), so an index
    never names a pack that is not stored. A backup that dies leaves packs no index names: garbage, collected
    after the grace period."""

    def __init__(self, inner: ChunkBatch, indexes: IndexSet, envelope: Envelope) -> None:
        self.inner = inner
        self.indexes = indexes
        self.envelope = envelope
        self.writer = PackWriter(inner.stage, PACK_TARGET, UPLOADS if indexes.backend.remote else 0)
        indexes.refresh()  # backups made since this process first read them (the daemon, the page) count too
        self._packs: set[str] | None = None
        self._packs_lock = threading.Lock()

    def stage(self, key: str, blob: bytes) -> None:
        self.writer.add(_chunk_of(key), blob)

    def has(self, key: str) -> bool:
        # The indexes as loaded when the backup started (a chunk another backup adds meanwhile is at worst
        # stored twice); loose chunk objects count too (the same format: copied in from a loose repository).
        rec = self.indexes.find(_chunk_of(key), reload=False)
        return (rec is not None and rec.pack_key in self._stored_packs()) or self.inner.has(key)

    def _stored_packs(self) -> set[str]:
        """The packs stored when first asked: one listing per backup, as the loose chunks' own. A record whose
        pack is gone (lost; or its index made durable before it by a crash) is no copy: the chunk is stored again."""
        if self._packs is None:
            with self._packs_lock:
                if self._packs is None:
                    self._packs = {info.key for info in self.indexes.backend.list(PACK_PREFIX)}
        return self._packs

    def publish(self) -> None:
        self.writer.flush()
        if self.writer.count:
            write_indexes(self.writer.iter_records(), self.envelope, self.inner.stage)
        self.inner.publish()

    def check_alive(self) -> None:
        self.inner.check_alive()

    def close(self) -> None:
        self.writer.close()

    def write_point(self, key: str, data: bytes) -> None:
        self.inner.write_point(key, data)


def _chunk_of(key: str) -> bytes:
    """The 32-byte id of chunk key ``chunks/<pp>/<hex>``."""
    return bytes.fromhex(key.rsplit("/", 1)[-1])


class IndexSet:
    """Every index object of one repository, merged into one ``PackIndex``; thread-safe. Index objects are
    immutable, so a reload reads only the names it has not read yet; names that vanished (a garbage collection
    consolidated them) make the next reload a full rebuild, so no record of a deleted pack stays."""

    def __init__(self, backend: ObjectStore, envelope: Envelope, max_length: int) -> None:
        self.backend = backend
        self.envelope = envelope
        self.max_length = max_length
        self._index: PackIndex | None = None
        self._loaded: set[str] = set()
        self._lock = threading.Lock()
        self._last_reload = self._last_rebuild = float("-inf")
        self._missing: dict[bytes, float] = {}  # chunk -> when it was last not found after a reload
        self.damaged: dict[str, str] = {}  # index objects that cannot be read -> why

    def find(self, chunk: bytes, reload: bool = True) -> PackRecord | None:
        """Where chunk ``chunk`` is stored, or None. With ``reload``, a miss first reads the index objects
        written since (a newer backup's): misses in several threads share one reload, and a chunk that missed
        after a reload misses again without one for RELOAD_INTERVAL (a damaged point read in a loop cannot
        make every read list the index objects)."""
        index = self._current()
        rec = index.find(chunk)
        if rec is None and reload:
            missed = time.monotonic()
            with self._lock:
                if self._last_reload < missed and self._missing.get(chunk, float("-inf")) + RELOAD_INTERVAL < missed:
                    self._refresh(rebuild=False)
                assert self._index is not None
                rec = self._index.find(chunk)
                if rec is None:
                    self._remember_missing(chunk)
        return rec

    def _remember_missing(self, chunk: bytes) -> None:
        if len(self._missing) >= MAX_REMEMBERED_MISSES:
            self._missing.clear()
        self._missing[chunk] = time.monotonic()

    def refresh(self) -> None:
        """Read the index objects written since the last load (a backup does, before it deduplicates)."""
        with self._lock:
            self._refresh(rebuild=self._index is None)

    def rebuild(self) -> None:
        """Read every index object again from scratch."""
        with self._lock:
            self._refresh(rebuild=True)

    def moved(self, rec: PackRecord, since: float) -> PackRecord | None:
        """Where chunk ``rec.chunk`` is now that ``rec``'s pack is gone (a repack moved it; the read began at
        ``since``, monotonic): every index object is read again, unless a rebuild began after ``since`` or this
        chunk was looked for that way within RELOAD_INTERVAL. None when it is nowhere else."""
        with self._lock:
            recent = self._missing.get(rec.chunk, float("-inf")) + RELOAD_INTERVAL >= since
            if self._last_rebuild < since and not recent:
                # Only records of stored packs: the first record of a chunk may name a lost pack while a
                # later backup stored the chunk again elsewhere.
                self._refresh(rebuild=True, stored=self._stored_packs())
            assert self._index is not None
            found = self._index.find(rec.chunk)
            if found is None or found == rec:
                self._remember_missing(rec.chunk)
                return None
            return found

    def keys(self) -> set[str]:
        """The index objects loaded (garbage collection deletes exactly these after consolidating them)."""
        self._current()
        return set(self._loaded)

    def records(self) -> Iterator[PackRecord]:
        index = self._current()
        return index.records()

    def close(self) -> None:
        with self._lock:
            if self._index is not None:
                self._index.close()
                self._index = None
            self._loaded = set()

    def _current(self) -> PackIndex:
        index = self._index  # ``is None``, not falsiness: an empty PackIndex is false
        return index if index is not None else self._load(rebuild=False)

    def _load(self, rebuild: bool) -> PackIndex:
        with self._lock:
            if self._index is None:
                self._refresh(rebuild)
            assert self._index is not None
            return self._index

    def _stored_packs(self) -> set[bytes]:
        """The ids of the packs stored now (one listing)."""
        return {bytes.fromhex(info.key[-32:]) for info in self.backend.list(PACK_PREFIX) if is_pack_key(info.key)}

    def _refresh(self, rebuild: bool, stored: set[bytes] | None = None) -> None:
        """Under ``_lock``: add the index objects not loaded yet (all of them, into a new index, if ``rebuild``);
        with ``stored``, only their records naming one of those packs."""
        self._last_reload = time.monotonic()
        if rebuild:
            self._last_rebuild = self._last_reload
        names = [info.key for info in self.backend.list(INDEX_PREFIX) if is_index_key(info.key)]
        if not rebuild and not self._loaded <= set(names):
            # Index objects vanished: a garbage collection consolidated them and may have deleted packs they
            # named. Their records must go, or a backup deduplicates against chunks that are gone.
            rebuild = True
            self._last_rebuild = self._last_reload
        index = PackIndex() if rebuild or self._index is None else self._index
        fresh = index is not self._index
        loaded = set() if fresh else self._loaded
        damaged = {} if fresh else self.damaged
        pending: list[tuple[str, bytes]] = []  # read, not added yet
        held = 0
        try:
            for key in names:
                if key in loaded:
                    continue
                try:
                    blob = self.backend.get(key, f"index {key}", packindex.MAX_INDEX_OBJECT)
                    payload = packindex.decode_index(blob, self.envelope, key, self.max_length)
                except FileNotFoundError:
                    continue  # consolidated and deleted since the listing: its records are in the new one
                except (IntegrityError, UnsupportedFormatError) as exc:
                    # One damaged index must not make the whole repository unreadable: its chunks read as
                    # missing (naming it), a new backup stores them again, garbage collection refuses to run.
                    damaged[key] = str(exc)
                    loaded.add(key)
                    continue
                if stored is not None:
                    payload = _records_in(payload, stored)
                if pending and held + len(payload) > LOAD_BATCH:
                    held = _add_all(index, pending, loaded)
                pending.append((key, payload))
                held += len(payload)
            _add_all(index, pending, loaded)
        except BaseException:
            if index is not self._index:
                index.close()
            raise
        # A replaced index is not closed: a reader in another thread may be searching it; it closes its file
        # when the last reference goes.
        self._index = index
        self._loaded = loaded
        self.damaged = damaged


def is_pack_key(key: str) -> bool:
    """Whether ``key`` names a pack (``packs/<pp>/<32 lowercase hex digits>``); anything else there is a stray."""
    return _PACK_KEY_RE.fullmatch(key) is not None


def _records_in(payload: bytes, packs: set[bytes]) -> bytes:
    """The records of ``payload`` (sorted, as decoded) whose pack is one of ``packs``, still sorted."""
    size, at = RECORD.size, PACK_ID_AT
    return b"".join(
        payload[i : i + size] for i in range(0, len(payload), size) if payload[i + at : i + at + 16] in packs
    )


def _add_all(index: PackIndex, pending: list[tuple[str, bytes]], loaded: set[str]) -> int:
    """Add the payloads of ``pending`` (key, payload) to ``index`` in one merge (the first listed wins a chunk id),
    mark their keys loaded, and empty ``pending``; returns 0, the bytes it now holds."""
    if len(pending) > 1:
        merged: dict[bytes, bytes] = {}
        for _, payload in reversed(pending):
            merged.update(_SPLIT.iter_unpack(payload))
        ids = sorted(merged)
        index.add(b"".join(map(bytes.__add__, ids, map(merged.__getitem__, ids))))
    elif pending:
        index.add(pending[0][1])
    loaded.update(key for key, _ in pending)
    pending.clear()
    return 0


def is_index_key(key: str) -> bool:
    return key.startswith(INDEX_PREFIX) and key.endswith(".idx") and "/" not in key[len(INDEX_PREFIX) :]


def check_pack_record(rec: PackRecord, max_length: int, name: str) -> None:
    """A record as a reader may follow it (``decode_index`` checked it already; kept as the reader's bound)."""
    if not 0 < rec.length <= max_length:
        raise IntegrityError(
            f"{name}: the index gives it {rec.length} bytes, a chunk object holds at most {max_length}"
        )
