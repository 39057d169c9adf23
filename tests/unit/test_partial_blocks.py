"""Partly written blocks of the write cache (map version 2): a write of whole 4 KiB sectors into a block still in
the backup writes only those sectors, never reading the backup (so the NFS server can do it on its event loop);
a sector cut by an unaligned write is the only thing copied in; a block whose sectors are all written becomes a
whole block; masks survive a reopen, a truncation and a kill -9 (and a model: tests/unit/test_cache_overlay.py); a
version 1 cache keeps working."""

from __future__ import annotations

import random
import struct
from pathlib import Path
from unittest.mock import patch

import pytest

from appliance.cache.overlay import SECTOR, WriteCache
from appliance.errors import IntegrityError

BLOCK = 64 * 1024
SIZE = 16 * BLOCK + 3000  # the last block is short, and so is its last sector


class Backing:
    """The backup underneath, counting what the cache asks of it."""

    def __init__(self, size: int) -> None:
        self.data = random.Random(7).randbytes(size)
        self.calls: list[tuple[int, int]] = []

    def __call__(self, offset: int, n: int) -> bytes:
        self.calls.append((offset, n))
        return self.data[offset : offset + n]


def open_cache(tmp_path: Path, backing: Backing) -> WriteCache:
    return WriteCache(tmp_path, "d", backing, SIZE, block_size=BLOCK, backing_nowait=backing)


def test_whole_sectors_are_written_without_reading_the_backup(tmp_path: Path) -> None:
    backing = Backing(SIZE)
    cache = open_cache(tmp_path, backing)
    model = bytearray(backing.data)
    for offset in (0, 3 * SECTOR, BLOCK + 5 * SECTOR, 2 * BLOCK + 2 * SECTOR):
        data = random.Random(offset).randbytes(2 * SECTOR)
        assert cache.write_nowait(offset, data) == len(data)  # on the loop: nothing to copy in
        model[offset : offset + len(data)] = data
    assert backing.calls == [], "an aligned write read the backup"
    assert cache.cached_blocks() == 0 and cache.changed_bytes() == 8 * SECTOR
    assert cache.read(0, SIZE) == bytes(model)
    # the non-blocking read merges the same way
    assert bytes(cache.read_nowait(BLOCK, BLOCK)) == bytes(model[BLOCK : 2 * BLOCK])
    cache.close()
    again = open_cache(tmp_path, backing)
    assert again.read(0, SIZE) == bytes(model) and again.changed_bytes() == 8 * SECTOR
    again.close()


def test_an_unaligned_write_copies_in_only_the_sectors_it_cuts(tmp_path: Path) -> None:
    backing = Backing(SIZE)
    cache = open_cache(tmp_path, backing)
    model = bytearray(backing.data)
    offset = 4 * BLOCK + SECTOR + 100
    data = b"u" * (2 * SECTOR)  # from inside sector 1 to inside sector 3
    assert cache.write_nowait(offset, data) is None  # a copy-in is the pool's work
    assert backing.calls == []
    cache.write(offset, data, sync=True)
    model[offset : offset + len(data)] = data
    assert sorted(backing.calls) == [(4 * BLOCK + SECTOR, SECTOR), (4 * BLOCK + 3 * SECTOR, SECTOR)]
    assert cache.changed_bytes() == 3 * SECTOR
    assert cache.read(4 * BLOCK, BLOCK) == bytes(model[4 * BLOCK : 5 * BLOCK])


def test_a_block_with_every_sector_written_becomes_whole(tmp_path: Path) -> None:
    backing = Backing(SIZE)
    cache = open_cache(tmp_path, backing)
    model = bytearray(backing.data)
    order = list(range(BLOCK // SECTOR))
    random.Random(3).shuffle(order)
    for sector in order:
        data = bytes([sector + 1]) * SECTOR
        cache.write(BLOCK + sector * SECTOR, data, sync=False)
        model[BLOCK + sector * SECTOR : BLOCK + (sector + 1) * SECTOR] = data
    assert cache.cached_blocks() == 1 and cache.changed_bytes() == BLOCK
    # the last block: 3000 bytes, one short sector
    cache.write(16 * BLOCK, b"t" * 3000, sync=False)
    model[16 * BLOCK :] = b"t" * 3000
    assert cache.cached_blocks() == 2 and backing.calls == []
    cache.commit()
    cache.close()
    again = open_cache(tmp_path, backing)  # the masks left in the file lose to the map's bits
    assert again.cached_blocks() == 2 and again.changed_bytes() == 2 * BLOCK
    assert again.read(0, SIZE) == bytes(model)
    again.close()


def test_truncating_through_a_partial_block_then_growing(tmp_path: Path) -> None:
    backing = Backing(SIZE)
    cache = open_cache(tmp_path, backing)
    cache.write(2 * BLOCK, b"a" * SECTOR, sync=True)
    cache.write(3 * BLOCK + SECTOR, b"b" * SECTOR, sync=True)  # beyond the cut: forgotten
    cut = 2 * BLOCK + 2 * SECTOR + 10
    cache.truncate(cut)
    cache.truncate(5 * BLOCK)
    expected = backing.data[: 2 * BLOCK] + b"a" * SECTOR + backing.data[2 * BLOCK + SECTOR : cut]
    expected += bytes(5 * BLOCK - cut)
    assert cache.read(0, 5 * BLOCK) == expected
    cache.close()
    again = open_cache(tmp_path, backing)
    assert again.read(0, 5 * BLOCK) == expected
    assert again.changed_bytes() == BLOCK  # the cut block, made whole
    again.close()


def test_a_version_1_cache_keeps_whole_block_copy_ins(tmp_path: Path) -> None:
    backing = Backing(SIZE)
    open_cache(tmp_path, backing).close()
    # what an earlier release left: a version 1 map and no sectors file
    with open(tmp_path / "d.map", "r+b") as f:
        f.seek(4)
        f.write(struct.pack(">B", 1))
    (tmp_path / "d.sectors").unlink()
    cache = open_cache(tmp_path, backing)
    cache.write(BLOCK, b"v" * SECTOR, sync=True)
    assert backing.calls == [(BLOCK, BLOCK)] and cache.cached_blocks() == 1
    cache.close()
    again = open_cache(tmp_path, backing)
    assert again.read(BLOCK, BLOCK) == b"v" * SECTOR + backing.data[BLOCK + SECTOR : 2 * BLOCK]
    assert not (tmp_path / "d.sectors").exists()
    assert (tmp_path / "d.map").read_bytes()[4] == 1  # still readable by the release that made it
    again.close()


def test_a_version_2_map_without_its_sectors_file_is_refused(tmp_path: Path) -> None:
    backing = Backing(SIZE)
    cache = open_cache(tmp_path, backing)
    cache.write(0, b"s" * SECTOR, sync=True)
    cache.close()
    (tmp_path / "d.sectors").unlink()
    with pytest.raises(IntegrityError, match=r"sectors file .*d\.sectors is missing"):
        open_cache(tmp_path, backing)


def test_partial_blocks_are_bounded_then_blocks_come_in_whole(tmp_path: Path) -> None:
    backing = Backing(SIZE)
    model = bytearray(backing.data)
    with patch("appliance.cache.overlay.MAX_PARTIAL_BLOCKS", 3):
        cache = open_cache(tmp_path, backing)
        for index in range(6):  # one sector in each of six blocks: three stay partial, three come in whole
            cache.write(index * BLOCK + SECTOR, b"p" * SECTOR, sync=True)
            model[index * BLOCK + SECTOR : index * BLOCK + 2 * SECTOR] = b"p" * SECTOR
        assert cache.cached_blocks() == 3 and cache.changed_bytes() == 3 * BLOCK + 3 * SECTOR
        assert cache.read(0, SIZE) == bytes(model)
        cache.close()
        assert open_cache(tmp_path, backing).read(0, SIZE) == bytes(model)
    damaged = pytest.raises(IntegrityError, match=r"more than 2 partly written blocks")
    with patch("appliance.cache.overlay.MAX_PARTIAL_BLOCKS", 2), damaged:  # more than any release writes
        open_cache(tmp_path, backing)
