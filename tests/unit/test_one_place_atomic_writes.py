"""Issue 9: the write cache's map is written by the one atomic-write helper (appliance.atomicfile): a unique
temp name, so a stale temp file left by a crash, or a name planted beside it, neither blocks a new cache nor
gets written through; and no temp file is left behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from appliance.cache.overlay import WriteCache

SIZE = 1 << 20


def zeros(offset: int, n: int) -> bytes:
    return bytes(n)


def test_a_stale_or_planted_temp_name_neither_blocks_nor_redirects_the_map(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"not yours")
    for stale in ("d.map.tmp", ".d.map.tmp"):  # a fixed temp name a crash or another writer could leave
        os.symlink(elsewhere, cache_dir / stale)
    cache = WriteCache(cache_dir, "d", zeros, SIZE)
    cache.write(4096, b"x" * 4096, sync=True)
    cache.close()
    assert elsewhere.read_bytes() == b"not yours"
    assert stat.S_IMODE((cache_dir / "d.map").stat().st_mode) == 0o600
    assert sorted(p.name for p in cache_dir.iterdir()) == [
        ".d.map.tmp",
        "d.data",
        "d.map",
        "d.map.tmp",
        "d.pending",
        "d.sectors",
    ]
    again = WriteCache(cache_dir, "d", zeros, SIZE)
    assert again.read(4096, 4096) == b"x" * 4096
    again.close()
