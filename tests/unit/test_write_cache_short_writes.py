"""One rule for a short write into any of the write cache's files (data, map, sectors, pending log): it is
retried from where it stopped, so a write cut short without an error (a signal, a file system that writes in
pieces) is neither lost nor refused; a short write followed by ENOSPC (Linux on a full disk) is in
test_write_cache_power_cut's full-disk tests."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from appliance.cache.overlay import WriteCache
from tests.unit.test_write_cache_power_cut import SIZE, _write


def test_writes_cut_short_without_an_error_are_completed_in_every_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(13)
    base = rng.randbytes(SIZE)

    def open_() -> WriteCache:  # 128 KiB blocks: a mask of 4 bytes, which a write can cut short
        return WriteCache(tmp_path, "d", lambda o, n: base[o : o + n], SIZE, block_size=128 * 1024)

    cache = open_()
    files = {cache._data_fd, cache._map_fd, cache._sectors_fd, cache._pending_fd}
    real = os.pwrite
    cut = set()

    def pwrite(fd: int, data, offset: int) -> int:
        if fd in files and len(data) > 1:
            cut.add(fd)
            return real(fd, bytes(data)[: len(data) // 2], offset)  # half of it, and no error
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    model = bytearray(base)
    for step in range(80):
        offset, n = _write(rng)
        data = rng.randbytes(n)
        cache.write(offset, data, sync=rng.random() < 0.1)
        model[offset : offset + n] = data
        if step % 20 == 19:
            cache.commit()
        if step == 40:
            cache.truncate(SIZE)  # the same size: the whole map is rewritten, its 64-byte header too
    assert cut == files, "a file was never written short"
    assert cache.read(0, SIZE) == model
    monkeypatch.undo()
    for fd in files:
        os.close(fd)  # kill -9: the log of this boot is replayed
    again = open_()
    assert again.read(0, SIZE) == model
    again.close()
