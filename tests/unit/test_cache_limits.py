"""The write cache's bounds: a client's sizes cannot make it allocate, its counts cost nothing, its files are
private, and a damaged map header is refused instead of believed."""

from __future__ import annotations

import os
import resource
import stat
import struct
import time
from pathlib import Path

import pytest

from appliance.cache.overlay import HEADER_SIZE, MAX_GROWTH, WriteCache
from appliance.errors import DiskTooLargeError, IntegrityError

MiB = 1 << 20
BLOCK = 64 * 1024
SIZE = 8 * MiB


def zeros(offset: int, n: int) -> bytes:
    return bytes(n)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_sizes_past_the_bound_are_refused_before_anything_grows(tmp_path: Path) -> None:
    cache = WriteCache(tmp_path, "d", zeros, SIZE)
    assert cache.max_size == MAX_GROWTH * SIZE
    before, map_bytes = peak_rss(), (tmp_path / "d.map").stat().st_size
    start = time.monotonic()
    with pytest.raises(DiskTooLargeError, match=r"size 70368744181760 is beyond its bound of 16777216"):
        cache.write(1 << 46, b"x" * 4096, sync=True)
    with pytest.raises(DiskTooLargeError, match="beyond its bound"):
        cache.truncate(8 << 40)
    assert time.monotonic() - start < 0.5
    assert peak_rss() - before < 8 * MiB
    assert cache.size == SIZE and (tmp_path / "d.map").stat().st_size == map_bytes
    assert (tmp_path / "d.data").stat().st_size == SIZE
    # within the bound the disk still grows (a hypervisor extending it)
    cache.truncate(2 * SIZE)
    cache.write(2 * SIZE - 5, b"tail!", sync=True)
    assert cache.read(2 * SIZE - 5, 10) == b"tail!"
    cache.close()


def test_cached_block_count_is_kept_not_scanned(tmp_path: Path) -> None:
    big = 1 << 40  # 1 TiB disk: a 2 MiB map, 16 M bits, a 32 MiB sectors file (holes but for what is written)
    cache = WriteCache(tmp_path, "d", zeros, big, max_size=big)
    for i in range(5):
        cache.write(i * 10 * MiB, b"x", sync=False)  # one sector each
    cache.write(10 * MiB, b"y" * 70_000, sync=False)  # block 160 whole, two sectors of block 161
    start = time.monotonic()
    for _ in range(1000):
        assert cache.cached_blocks() == 1 and cache.changed_bytes() == BLOCK + 6 * 4096
    assert time.monotonic() - start < 0.1, "counting scans the map"
    start = time.monotonic()
    cache.truncate(10 * MiB + 100)  # drops blocks past it: bytes at a time, not a loop over 16 M bits
    assert time.monotonic() - start < 2.0
    assert cache.cached_blocks() == 1 and cache.changed_bytes() == BLOCK + 4096
    cache.close()
    start = time.monotonic()
    again = WriteCache(tmp_path, "d", zeros, big, max_size=big)
    assert time.monotonic() - start < 2.0, "opening reads the sectors file's holes"
    assert again.changed_bytes() == BLOCK + 4096 and again.read(10 * MiB, 1) == b"y"
    assert again.read(0, 2) == b"x\0"
    again.close()


def test_cache_files_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        WriteCache(tmp_path / "disks", "d", zeros, SIZE).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "disks").stat().st_mode) == 0o700
    for name in ("d.data", "d.map", "d.sectors"):
        assert stat.S_IMODE((tmp_path / "disks" / name).stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("size", 1 << 50, "beyond this disk's bound"),
        ("block", 0, "block size 0 is not a power of two"),
        ("block", 3000, "block size 3000 is not a power of two"),
    ],
)
def test_a_damaged_header_is_refused_not_believed(tmp_path: Path, field: str, value: int, message: str) -> None:
    WriteCache(tmp_path, "d", zeros, SIZE).close()
    raw = bytearray((tmp_path / "d.map").read_bytes())
    offset = {"block": 8, "size": 12}[field]
    fmt = ">I" if field == "block" else ">Q"
    struct.pack_into(fmt, raw, offset, value)
    (tmp_path / "d.map").write_bytes(bytes(raw[:HEADER_SIZE]) + bytes(raw[HEADER_SIZE:]))
    before = peak_rss()
    with pytest.raises(IntegrityError, match=message):
        WriteCache(tmp_path, "d", zeros, SIZE)
    assert peak_rss() - before < 8 * MiB
