"""Hostile review of the write cache's pending log and held-back map changes (the crash-image model is in
tests/unit/test_write_cache_power_cut.py): the partial-block bound across a kill -9 and a power cut."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from appliance.cache import overlay
from appliance.cache.overlay import SECTOR, WriteCache

SIZE = 1024 * 1024 + 3000
BLOCK = 16 * 1024  # four sectors


def _cache(directory: Path, base: bytes, **kw) -> WriteCache:
    return WriteCache(directory, "d", lambda o, n: base[o : o + n], SIZE, block_size=BLOCK, **kw)


def _kill(cache: WriteCache) -> None:
    """kill -9: the descriptors go, nothing is synced; the page cache keeps what was written."""
    for fd in (cache._data_fd, cache._map_fd, cache._sectors_fd, cache._pending_fd):
        if fd >= 0:
            os.close(fd)
    cache._closed = True


@pytest.mark.parametrize("order", ["whole first", "partial first"])
def test_the_partial_block_bound_survives_a_kill_with_held_back_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, order: str
) -> None:
    """A block made whole by an unstable copy-in keeps its old mask in the sectors file while its bit waits in
    the log; a new partial block then takes its place in the bound. Reopened after a kill -9, the file holds
    one mask more than the bound and the log replays in the order the writes came: neither is damage."""
    monkeypatch.setattr(overlay, "MAX_PARTIAL_BLOCKS", 4)
    base = random.Random(1).randbytes(SIZE)
    cache = _cache(tmp_path, base)
    model = bytearray(base)

    def write(offset: int, n: int) -> None:
        data = random.Random(offset).randbytes(n)
        cache.write(offset, data, sync=False)
        model[offset : offset + n] = data

    for index in range(3):
        write(index * BLOCK, SECTOR)  # aligned: masks in the file at once
    if order == "partial first":
        write(5 * BLOCK + 100, 10)  # block 5 partial, copied in: its mask waits (four partial blocks)
        write(2 * BLOCK + SECTOR + 100, BLOCK - SECTOR - 100)  # block 2 whole by a copy-in: its bit waits
        write(6 * BLOCK, SECTOR)  # block 6 partial, aligned: in the file
    else:
        write(3 * BLOCK, SECTOR)
        write(2 * BLOCK + SECTOR + 100, BLOCK - SECTOR - 100)
        write(6 * BLOCK, SECTOR)
    assert cache.read(0, SIZE) == model
    _kill(cache)
    again = _cache(tmp_path, base)
    assert again.read(0, SIZE) == model
    again.close()


def test_the_partial_block_bound_survives_a_power_cut_that_kept_masks_and_not_bits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An aligned unstable write completes a partial block (its bit written, not synced), a new partial block
    takes its place: a power cut may keep the sectors file and not the map, which then holds a mask too many."""
    monkeypatch.setattr(overlay, "MAX_PARTIAL_BLOCKS", 4)
    base = random.Random(2).randbytes(SIZE)
    live = tmp_path / "live"
    cache = _cache(live, base)
    for index in range(4):
        cache.write(index * BLOCK, b"c" * SECTOR, sync=False)
    cache.commit()
    synced_map = (live / "d.map").read_bytes()  # what the power cut keeps of the map
    cache.write(3 * BLOCK + SECTOR, b"u" * (BLOCK - SECTOR), sync=False)  # block 3 whole, aligned
    cache.write(6 * BLOCK, b"n" * SECTOR, sync=False)  # a fifth partial block, aligned
    image = tmp_path / "image"
    shutil.copytree(live, image)
    (image / "d.map").write_bytes(synced_map)
    monkeypatch.setattr(overlay, "boot_id", lambda: b"another boot....")
    again = _cache(image, base)
    committed = bytearray(base)
    for index in range(4):
        committed[index * BLOCK : index * BLOCK + SECTOR] = b"c" * SECTOR
    got = bytearray(again.read(0, SIZE))
    got[3 * BLOCK + SECTOR : 4 * BLOCK] = committed[3 * BLOCK + SECTOR : 4 * BLOCK]  # unstable: resent
    got[6 * BLOCK : 6 * BLOCK + SECTOR] = committed[6 * BLOCK : 6 * BLOCK + SECTOR]
    assert got == committed
    again.close()
    cache.close()
