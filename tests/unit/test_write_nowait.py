"""The write cache's non-blocking write (``WriteCache.write_nowait``, what the NFS server does on its event loop
for an UNSTABLE WRITE): only into blocks already in the cache or whole new ones (nothing to copy in from the
backup), never waiting for the lock, never growing the disk; the same bytes as ``write``, its map persisted; and
every write, blocking or not, counted for a migration in progress."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from unittest.mock import patch

from appliance.cache.overlay import INLINE_WRITE_MAX, WriteCache

SIZE = 1024 * 1024
BLOCK = 64 * 1024


def cache_over(tmp_path: Path, base: bytes) -> WriteCache:
    return WriteCache(tmp_path, "d", lambda off, n: base[off : off + n], len(base), block_size=BLOCK)


def test_only_a_pwrite_into_cached_blocks_is_done_without_blocking(tmp_path: Path) -> None:
    base = random.Random(3).randbytes(SIZE)
    cache = cache_over(tmp_path, base)
    assert cache.write_nowait(100, b"x" * 10) is None  # block 0 is still the backup's: needs a copy-in
    cache.write(0, b"y" * 10, sync=False)  # brings block 0 in
    assert cache.write_nowait(100, b"x" * 10) == 10
    assert cache.write_nowait(BLOCK - 5, b"z" * 10) is None  # reaches block 1, not in the cache
    assert cache.write_nowait(SIZE - 5, b"z" * 10) is None  # past the end: growing is for write()
    assert cache.write_nowait(50, b"") is None
    assert cache.write_nowait(4 * BLOCK, bytes(INLINE_WRITE_MAX + 1)) is None  # large: the pool's, beside the loop
    whole = random.Random(4).randbytes(2 * BLOCK)
    with patch("appliance.cache.overlay.INLINE_WRITE_MAX", 2 * BLOCK):  # blocks as small as the limit
        assert cache.write_nowait(4 * BLOCK, whole) == 2 * BLOCK  # whole new blocks: nothing to copy in
    assert cache.cached(4) and cache.cached(5) and not cache.cached(6)
    expected = bytearray(base)
    expected[0:10] = b"y" * 10
    expected[100:110] = b"x" * 10
    expected[4 * BLOCK : 6 * BLOCK] = whole
    assert cache.read(0, SIZE) == bytes(expected)
    cache.close()  # makes the unsynced writes durable
    reopened = cache_over(tmp_path, base)
    assert reopened.read(0, SIZE) == bytes(expected)
    reopened.close()


def test_it_never_waits_for_the_lock(tmp_path: Path) -> None:
    cache = cache_over(tmp_path, bytes(SIZE))
    cache.write(0, b"a" * BLOCK, sync=False)
    held, release = threading.Event(), threading.Event()

    def commit_in_progress() -> None:
        with cache._lock:  # what commit() holds through its fsync
            held.set()
            release.wait(10)

    t = threading.Thread(target=commit_in_progress)
    t.start()
    held.wait(10)
    try:
        assert cache.write_nowait(0, b"b" * 10) is None  # returns at once: the pool's write() will wait
    finally:
        release.set()
        t.join()
    assert cache.write_nowait(0, b"b" * 10) == 10
    cache.close()


def test_every_write_is_counted_for_a_migration(tmp_path: Path) -> None:
    cache = cache_over(tmp_path, bytes(SIZE))
    cache.write(0, b"a" * 10, sync=False)  # block 0 in the cache before the migration starts
    cache.write(3 * BLOCK, b"a" * 10, sync=False)
    cache.dirty_tracker = set()
    cache.write(5, b"b" * 10, sync=True)  # a rewrite of a cached block: the migration must copy it again
    assert cache.write_nowait(3 * BLOCK + 1, b"c") == 1
    cache.write(2 * BLOCK - 1, b"d" * 2, sync=False)  # spans blocks 1 and 2, both new
    assert cache.dirty_tracker == {0, 1, 2, 3}
    cache.close()
