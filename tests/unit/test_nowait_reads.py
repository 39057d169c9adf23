"""The non-blocking read path the NFS server tries on its event loop before hopping to a worker thread:
it answers only from memory (chunk cache, page cache), and then exactly what the blocking path would."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from appliance.cache.overlay import WriteCache
from appliance.errors import IntegrityError
from appliance.repo.readcache import ReadCache
from appliance.repo.reader import _read_ahead_pool
from nfsd.localfs import LocalFS
from tests.backed_up import backed_up

MiB = 1 << 20


def test_disk_reader_read_cached_only_from_the_chunk_cache(tmp_path: Path) -> None:
    rnd = random.Random(3)
    data = rnd.randbytes(2 * MiB) + bytes(MiB) + rnd.randbytes(MiB // 2)
    repo = backed_up(tmp_path, data)
    point = repo.restore_point("vm", "latest")
    reader = repo.open_disk(point, point.disks[0].name)
    reader.read_ahead = 0  # this test watches which chunks get loaded
    assert reader.read_cached(100, 4096) is None  # chunk 0 not loaded yet
    assert reader.read_cached(2 * MiB + 5, 4096) == bytes(4096)  # an all-zero chunk needs no load
    assert reader.read(100, 4096) == data[100:4196]
    assert reader.read_cached(100, 4096) == data[100:4196]
    assert reader.read_cached(MiB - 10, 20) is None  # spans chunk 1, not loaded
    reader.read(MiB, 1)
    assert reader.read_cached(MiB - 10, 20) == data[MiB - 10 : MiB + 10]
    assert reader.read_cached(len(data) - 3, 100) is None  # last chunk not loaded
    reader.read(len(data) - 1, 1)
    assert reader.read_cached(len(data) - 3, 100) == data[-3:]
    assert reader.read_cached(len(data), 100) == b""


def test_write_cache_read_nowait_matches_read(tmp_path: Path) -> None:
    base = random.Random(4).randbytes(MiB)
    loaded: set[int] = set()

    def backing(off: int, n: int) -> bytes:
        loaded.update(range(off // 65536, (off + n - 1) // 65536 + 1))
        return base[off : off + n]

    def backing_nowait(off: int, n: int) -> bytes | None:
        blocks = set(range(off // 65536, (off + n - 1) // 65536 + 1))
        return base[off : off + n] if blocks <= loaded else None

    cache = WriteCache(tmp_path, "d", backing, MiB, backing_nowait=backing_nowait)
    assert cache.read_nowait(0, 4096) is None
    cache.write(70_000, b"x" * 10_000, sync=True)  # copies block 1 in from the backing
    assert cache.read_nowait(70_000, 10_000) == b"x" * 10_000
    assert cache.read_nowait(65_536, 65_536) == cache.read(65_536, 65_536)
    assert cache.read_nowait(60_000, 20_000) is None  # block 0 still only in the (unloaded) backup
    cache.read(0, 10)
    assert cache.read_nowait(60_000, 20_000) == cache.read(60_000, 20_000)
    assert WriteCache(tmp_path / "b", "d", backing, MiB).read_nowait(0, 10) is None  # no way to try: None


def test_localfs_read_nowait_needs_an_open_file_and_sees_removal(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"hello world")
    fs = LocalFS(tmp_path)
    obj = fs.lookup(fs.root(), "f")
    assert fs.read_nowait(obj, 0, 5) is None  # not open yet: opening may touch the disk
    assert fs.read(obj, 0, 5) == (b"hello", False)
    data, eof, attr = fs.read_nowait(obj, 6, 100)
    assert bytes(data) == b"world" and eof and attr.size == 11 and attr.fileid == obj.fileid
    os.unlink(tmp_path / "f")
    assert fs.read_nowait(obj, 0, 5) is None  # the slow path answers STALE


def test_read_cache_hydrates_chunks_and_serves_them_from_the_local_file(tmp_path: Path) -> None:
    rnd = random.Random(5)
    data = rnd.randbytes(2 * MiB) + bytes(MiB) + rnd.randbytes(MiB + 7)
    repo = backed_up(tmp_path, data)
    point = repo.restore_point("vm", "latest")
    cache = ReadCache(tmp_path / "rc", budget_bytes=2 * MiB)  # room for two chunks only
    reader = repo.open_disk(point, point.disks[0].name, read_cache=cache)
    twin = repo.open_disk(point, point.disks[0].name, read_cache=cache)
    assert reader.hydrated is twin.hydrated  # sessions of one point share the hydrated file
    hd = reader.hydrated
    assert hd.has(2) and not hd.has(0)  # the zero chunk needs no hydration
    assert reader.read(MiB - 5, 10) == data[MiB - 5 : MiB + 5]  # loads chunks 0 and 1
    assert hd.drain(5)  # stored in the background, after the read answered
    assert hd.has(0) and hd.has(1) and cache.used == 2 * MiB
    repo.chunk_cache.clear()  # from now on only the hydrated file can answer without loading
    assert twin.read_cached(100, 4096) == data[100:4196]
    assert twin.read_cached(3 * MiB, 10) is None  # chunk 3: not hydrated, not in memory
    assert twin.read(3 * MiB, 10) == data[3 * MiB : 3 * MiB + 10]
    assert hd.drain(5)
    assert not hd.has(3) and cache.used == 2 * MiB  # over budget: read, not kept
    assert reader.read(0, len(data)) == data
    cache.close()
    assert not (tmp_path / "rc").exists()


def test_read_cache_never_returns_damaged_chunks(tmp_path: Path) -> None:
    repo = backed_up(tmp_path, random.Random(6).randbytes(2 * MiB))
    point = repo.restore_point("vm", "latest")
    victim = repo.store.path(point.disks[0].chunks[1])
    blob = bytearray(victim.read_bytes())
    blob[-5] ^= 0xFF
    victim.write_bytes(bytes(blob))
    reader = repo.open_disk(point, point.disks[0].name, read_cache=ReadCache(tmp_path / "rc", 8 * MiB))
    with pytest.raises(IntegrityError):
        reader.read(MiB + 10, 10)
    assert not reader.hydrated.has(1)
    with pytest.raises(IntegrityError):  # and again: the damaged chunk was not cached anywhere
        reader.read(MiB + 10, 10)


def test_sequential_reads_decode_the_next_chunks_ahead(tmp_path: Path) -> None:
    data = random.Random(7).randbytes(8 * MiB)
    repo = backed_up(tmp_path, data)
    point = repo.restore_point("vm", "latest")
    reader = repo.open_disk(point, point.disks[0].name)
    assert reader.read(0, MiB) == data[:MiB]
    assert reader.read(MiB, MiB) == data[MiB : 2 * MiB]  # now sequential: chunks 2..5 are decoded ahead
    deadline = time.monotonic() + 10
    while reader.read_cached(5 * MiB, 10) is None:
        assert time.monotonic() < deadline, "read-ahead did not load chunk 5"
        time.sleep(0.01)
    drain_read_ahead()
    assert reader.read_cached(2 * MiB, MiB) == data[2 * MiB : 3 * MiB]
    assert reader.read_cached(6 * MiB, 10) is None  # not further than READ_AHEAD
    random_reader = repo.open_disk(point, point.disks[0].name)
    repo.chunk_cache.clear()
    loads = repo.chunk_cache.misses
    for chunk in (3, 0, 6):  # jumps: no read-ahead (after 3, it would load 4 to 7)
        random_reader.read(chunk * MiB, 10)
    drain_read_ahead()  # whatever these reads queued has run now
    assert repo.chunk_cache.misses - loads == 3, "chunks were loaded besides the three read"
    assert [i for i in range(8) if random_reader.read_cached(i * MiB, 10) is not None] == [0, 3, 6]


def drain_read_ahead() -> None:
    """Return once every read-ahead queued so far has finished: a task that waits for the others is put on each
    worker thread; they can all run at once only when the FIFO queue ahead of them is done. If that made the pool
    start a thread, the busy one may still be working: again with the new count, until it holds still."""
    while True:
        workers = [t for t in threading.enumerate() if t.name.startswith("read-ahead")]
        if not workers:
            return  # nothing was ever queued: a submit starts a thread before it returns
        barrier = threading.Barrier(len(workers) + 1)
        for _ in workers:
            _read_ahead_pool.submit(barrier.wait, 10)
        barrier.wait(10)
        if len([t for t in threading.enumerate() if t.name.startswith("read-ahead")]) == len(workers):
            return


def test_hydration_happens_after_the_read_bounded_and_close_waits_for_it(tmp_path: Path) -> None:
    """A reader's decoded chunk reaches the local file in the background (the client is answered first); at most
    MAX_PENDING chunks wait in memory; a disk closed with stores queued waits for them and writes none of them
    (its descriptor number could belong to another file by then)."""
    from appliance.repo import readcache

    n = readcache.MAX_PENDING + 8
    cache = ReadCache(tmp_path / "rc", budget_bytes=64 * MiB)
    hd = cache.disk("p/disk0", n * 4096, 4096)
    chunks = [random.Random(i).randbytes(4096) for i in range(n)]
    gate = threading.Event()
    readcache._hydrate_pool.submit(gate.wait, 10)  # the store thread is busy with something else
    for i, chunk in enumerate(chunks):
        hd.store_later(i, chunk)
    assert not hd.has(0)  # queued, not written: the read that decoded it did not wait
    assert not hd.drain(0.2)
    gate.set()
    assert hd.drain(5)
    kept = [i for i in range(n) if hd.has(i)]
    assert kept == list(range(readcache.MAX_PENDING))  # the rest were skipped, not queued
    assert all(hd.pread(i * 4096, 4096) == chunks[i] for i in kept)

    gate.clear()
    readcache._hydrate_pool.submit(gate.wait, 10)
    hd.store_later(n - 1, chunks[n - 1])
    closer = threading.Thread(target=hd.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive()  # close waits for the queued store
    gate.set()
    closer.join(5)
    assert not closer.is_alive() and not hd.has(n - 1)  # and the store, coming after close, wrote nothing
    cache.close()
