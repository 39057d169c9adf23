"""A chunk going into the read cache is held in memory only until it is in the file: readers find it in the
write-behind queue meanwhile, and in the file after, never decoding it twice; with no room in the read cache
it stays in the in-memory chunk cache as before."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from appliance.repo import Repository
from appliance.repo.readcache import HydratedDisk, ReadCache
from tests.backed_up import backed_up

MiB = 1 << 20


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Repository, bytes]:
    data = random.Random(21).randbytes(3 * MiB)
    repo = backed_up(tmp_path, data)
    return repo, data


def open_reader(repo: Repository, cache: ReadCache, loads: list[str]):  # noqa: ANN201
    point = repo.restore_point("vm", "latest")
    reader = repo.open_disk(point, point.disks[0].name, read_cache=cache)
    reader.read_ahead = 0
    get = reader.store.get

    def counting_get(cid: str, context: str) -> bytes:
        loads.append(cid)
        return get(cid, context)

    reader.store = type("Counting", (), {"get": staticmethod(counting_get), "backend": reader.store.backend})()
    return reader


def test_a_hydrated_chunk_leaves_memory_and_is_never_decoded_twice(
    disk: tuple[Repository, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, data = disk
    cache = ReadCache(tmp_path / "rc", 1 << 30)
    loads: list[str] = []
    reader = open_reader(repo, cache, loads)
    cid0, cid1 = reader.disk.chunks[0], reader.disk.chunks[1]

    assert reader.read(100, 4096) == data[100:4196]
    assert reader.hydrated.drain(10)
    assert reader.hydrated.has(0)
    assert reader.cache.peek(cid0) is None  # not kept in anonymous memory as well
    assert reader.read(5000, 4096) == data[5000:9096]
    assert reader.read_cached(0, 4096) == data[:4096]
    assert loads == [cid0]

    # while its write waits, the chunk is served from the queue, not decoded again
    gate = threading.Event()
    write = HydratedDisk._write

    def held_write(self: HydratedDisk, index: int, chunk: bytes) -> None:
        gate.wait(10)
        write(self, index, chunk)

    monkeypatch.setattr(HydratedDisk, "_write", held_write)
    assert reader.read(MiB + 7, 100) == data[MiB + 7 : MiB + 107]
    assert not reader.hydrated.has(1) and reader.hydrated.queued(1) is not None
    assert reader.read_cached(MiB, 4096) == data[MiB : MiB + 4096]
    assert reader.read(MiB - 10, 20) == data[MiB - 10 : MiB + 10]  # hydrated chunk 0 + queued chunk 1
    gate.set()
    assert reader.hydrated.drain(10)
    assert reader.hydrated.has(1) and reader.hydrated.queued(1) is None
    assert reader.read(0, 2 * MiB) == data[: 2 * MiB]
    assert loads == [cid0, cid1]
    cache.close()


def test_without_room_in_the_read_cache_chunks_stay_in_memory(disk: tuple[Repository, bytes], tmp_path: Path) -> None:
    repo, data = disk
    cache = ReadCache(tmp_path / "rc", 0)  # no budget: nothing is hydrated
    loads: list[str] = []
    reader = open_reader(repo, cache, loads)
    assert reader.read(10, 100) == data[10:110]
    assert reader.cache.peek(reader.disk.chunks[0]) is not None
    assert reader.read(20, 100) == data[20:120]
    assert loads == [reader.disk.chunks[0]]
    cache.close()


def test_a_sequential_reader_answered_from_memory_keeps_the_chunks_ahead_coming(tmp_path: Path) -> None:
    data = random.Random(22).randbytes(12 * MiB)
    repo = backed_up(tmp_path, data)
    cache = ReadCache(tmp_path / "rc", 1 << 30)
    loads: list[str] = []
    reader = open_reader(repo, cache, loads)
    reader.read_ahead = 2
    hd = reader.hydrated

    assert reader.read(0, 64 * 1024) == data[: 64 * 1024]  # a miss, not yet a sequential reader
    assert reader.read(64 * 1024, 64 * 1024) == data[64 * 1024 : 128 * 1024]  # now it is: 1 and 2 come
    wait_for(lambda: hd.has(1) and hd.has(2))
    for index in (1, 2, 3, 4):  # each answered without blocking, and each brings the next ones
        got = reader.read_cached(index * MiB, 64 * 1024)
        assert got == data[index * MiB : index * MiB + 64 * 1024], f"chunk {index} was not ready"
        wait_for(lambda i=index: hd.has(i + 1) and hd.has(i + 2))
    assert not hd.has(7)  # nothing beyond the window
    cache.close()


def test_a_random_miss_is_noted_once_and_decodes_nothing_ahead(disk: tuple[Repository, bytes], tmp_path: Path) -> None:
    repo, data = disk
    cache = ReadCache(tmp_path / "rc", 1 << 30)
    loads: list[str] = []
    reader = open_reader(repo, cache, loads)
    reader.read_ahead = 2
    assert reader.read_cached(MiB + 4096, 4096) is None  # the loop's try, then the worker's read
    assert reader.read(MiB + 4096, 4096) == data[MiB + 4096 : MiB + 8192]
    assert reader.read_cached(100, 4096) is None
    assert reader.read(100, 4096) == data[100:4196]
    assert reader.hydrated.drain(10)
    assert loads == [reader.disk.chunks[1], reader.disk.chunks[0]]  # a first touch costs one chunk, not three
    cache.close()


def wait_for(condition) -> None:  # noqa: ANN001
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
