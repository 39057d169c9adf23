"""Hostile review of the write cache's pending log and held-back map changes (the crash-image model is in
tests/unit/test_write_cache_power_cut.py): the partial-block bound across a kill -9 and a power cut."""

from __future__ import annotations

import itertools
import os
import random
import re
import shutil
import threading
from pathlib import Path

import pytest

from appliance.cache import overlay
from appliance.cache.overlay import SECTOR, WriteCache
from appliance.errors import IntegrityError

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


# --- the crash-image model, with truncation, growth, write_nowait, kill -9 and replay, other block sizes --------
MAX_SIZE = 2 * SIZE


class Disk:
    """Each cache file's content at its last sync, kept by watching the sync calls (as test_write_cache_power_cut)."""

    def __init__(self, directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.directory = directory
        self.synced: dict[str, bytes] = {}
        for name in ("fsync", "fdatasync"):
            monkeypatch.setattr(os, name, self._watch(getattr(os, name)))

    def _watch(self, real):
        def sync(fd: int) -> None:
            real(fd)
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if path.parent == self.directory:
                self.synced[path.name] = path.read_bytes()

        return sync

    def power_cut_images(self, target: Path):
        """Every mix of synced and current content of the data, map and sectors files."""
        names = [n for n in ("d.data", "d.map", "d.sectors") if (self.directory / n).exists()]
        for n, mix in enumerate(itertools.product((False, True), repeat=len(names))):
            image = target / f"image{n}"
            shutil.rmtree(image, ignore_errors=True)
            shutil.copytree(self.directory, image)
            for name, synced in zip(names, mix, strict=True):
                if synced:
                    (image / name).write_bytes(self.synced.get(name, b""))
            yield image


class Model:
    """The disk as written, as committed, and which bytes a client may still resend."""

    def __init__(self, base: bytes) -> None:
        self.current = bytearray(base) + bytes(MAX_SIZE - SIZE)
        self.durable = bytearray(self.current)
        self.unsure = bytearray(MAX_SIZE)
        self.size = self.durable_size = SIZE

    def write(self, offset: int, data: bytes, sync: bool) -> None:
        end = offset + len(data)
        self.current[offset:end] = data
        self.size = max(self.size, end)
        self.unsure[offset:end] = bytes(len(data)) if sync else b"\1" * len(data)
        if sync:
            self.durable[offset:end] = data
            self.durable_size = max(self.durable_size, end)

    def commit(self) -> None:
        self.durable[:] = self.current
        self.unsure[:] = bytes(MAX_SIZE)
        self.durable_size = self.size

    def truncate(self, size: int) -> None:  # SETATTR: synced, with every earlier write
        self.current[size:] = bytes(MAX_SIZE - size)
        self.size = size
        self.commit()

    def check(self, cache: WriteCache, what: str) -> None:
        assert self.durable_size <= cache.size <= max(self.size, self.durable_size), f"{what}: size {cache.size}"
        seen = bytearray(cache.read(0, cache.size))
        for run in re.finditer(b"\1+", self.unsure[: cache.size]):  # anything goes there: the client resends it
            seen[run.start() : run.end()] = self.durable[run.start() : run.end()]
        want = self.durable[: cache.size]
        if seen != want:
            first = next(i for i in range(len(want)) if seen[i] != want[i])
            raise AssertionError(f"{what}: committed bytes misread from offset {first}")


def _v1(directory: Path, base: bytes, block: int) -> None:
    """What an earlier release left: a version 1 map and no sectors file."""
    WriteCache(directory, "d", lambda o, n: base[o : o + n], SIZE, block_size=block).close()
    with open(directory / "d.map", "r+b") as f:
        f.seek(4)
        f.write(b"\1")
    (directory / "d.sectors").unlink()
    (directory / "d.pending").unlink()


@pytest.mark.parametrize(("block", "version", "seed"), [(BLOCK, 2, 1), (BLOCK, 2, 2), (512, 2, 3), (BLOCK, 1, 4)])
def test_power_cuts_and_kills_across_truncation_growth_and_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int, version: int, seed: int
) -> None:
    """Random writes (stable, unstable, on the event loop, past the end), commits and truncations: at every tenth
    step each power-cut image reads the committed disk outside the ranges a client may resend, and every 15th a
    kill -9 reopened in this boot replays the log into exactly the disk as written, with the same counts.
    (Run with 200 seeds and blocks of 512 B to 16 MiB during the review: all passed.)"""
    rng = random.Random(seed)
    base = rng.randbytes(SIZE)
    this_boot = [overlay.boot_id()]
    monkeypatch.setattr(overlay, "boot_id", lambda: this_boot[0])
    live = tmp_path / "live"
    if version == 1:
        _v1(live, base, block)

    def open_(directory: Path) -> WriteCache:
        return WriteCache(directory, "d", lambda o, n: base[o : o + n], SIZE, block_size=block)

    cache = open_(live)
    disk = Disk(live, monkeypatch)
    disk.synced = {p.name: p.read_bytes() for p in live.iterdir()}  # created or closed: synced
    model = Model(base)
    for step in range(90):
        r = rng.random()
        if r < 0.06:
            size = rng.randrange(SIZE // 2, MAX_SIZE)
            cache.truncate(size)
            model.truncate(size)
        elif r < 0.12:
            cache.commit()
            model.commit()
        else:
            offset = rng.randrange(0, min(model.size + 30000, MAX_SIZE - 20000))
            if rng.random() < 0.3:
                offset -= offset % SECTOR
            n = rng.choice((1, 100, SECTOR, 3 * SECTOR, 5000, 20000))
            data = rng.randbytes(n)
            sync = rng.random() < 0.15
            if sync or cache.write_nowait(offset, data) is None:
                cache.write(offset, data, sync=sync)
            model.write(offset, data, sync)
        if step % 10 == 9:
            running, this_boot[0] = this_boot[0], b"another boot...."
            for image in disk.power_cut_images(tmp_path):
                reopened = open_(image)
                model.check(reopened, f"step {step}, power cut {image.name}")
                reopened.close()
            this_boot[0] = running
        if step % 15 == 14:  # kill -9, reopened in this boot (the log replayed), and on with the same model
            counts = cache.cached_blocks(), cache.changed_bytes()
            _kill(cache)
            cache = open_(live)
            assert bytes(cache.read(0, MAX_SIZE)) == bytes(model.current[: model.size]), f"step {step}: kill"
            assert (cache.cached_blocks(), cache.changed_bytes()) == counts
    assert cache.read(0, MAX_SIZE) == model.current[: model.size]
    cache.close()


def _plant_map_link(directory: Path) -> None:
    (directory / "elsewhere.map").write_bytes((directory / "d.map").read_bytes())
    (directory / "d.map").unlink()
    (directory / "d.map").symlink_to("elsewhere.map")


def _plant_map_fifo(directory: Path) -> None:
    (directory / "d.map").unlink()
    os.mkfifo(directory / "d.map")  # opened for reading, it would wait for a writer forever


def _plant(kind: str):
    def plant(directory: Path) -> None:
        pending = directory / "d.pending"
        pending.unlink()
        if kind == "directory":
            pending.mkdir()
        elif kind == "fifo":
            os.mkfifo(pending)
        else:
            pending.symlink_to(directory / "outside")

    return plant


@pytest.mark.parametrize(
    "plant",
    [_plant_map_link, _plant_map_fifo, _plant("directory"), _plant("fifo"), _plant("link")],
    ids=["map link", "map fifo", "dir", "fifo", "link"],
)
def test_a_planted_file_is_refused_without_leaking_descriptors_or_writing_outside(tmp_path: Path, plant) -> None:
    base = random.Random(6).randbytes(SIZE)
    cache = _cache(tmp_path, base)
    cache.write(7 * BLOCK + 5, b"q" * 10, sync=False)
    _kill(cache)
    plant(tmp_path)
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises((OSError, IntegrityError)):  # a planted map is damage; a planted log cannot be opened
        _cache(tmp_path, base)
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert not (tmp_path / "outside").exists()


def test_a_log_left_beside_a_new_cache_is_never_replayed_into_it(tmp_path: Path) -> None:
    """A cache made afresh (its map gone) in the boot that wrote the old log: the log's blocks are not in the new
    data file, and replayed they would read as zeros instead of the backup."""
    base = random.Random(7).randbytes(SIZE)
    cache = _cache(tmp_path, base)
    cache.write(7 * BLOCK + 5, b"q" * 10, sync=False)
    cache.write(9 * BLOCK + 5, b"w" * BLOCK, sync=False)
    _kill(cache)
    for name in ("d.map", "d.data", "d.sectors"):
        (tmp_path / name).unlink()
    fresh = _cache(tmp_path, base)
    assert fresh.read(0, SIZE) == base
    assert (fresh.cached_blocks(), fresh.changed_bytes()) == (0, 0)
    fresh.close()


def test_threads_writing_and_committing_then_a_kill_replays_every_write(tmp_path: Path) -> None:
    """Writes (on the loop and in the pool, unaligned, some stable) and commits from four threads at once, into
    their own quarters of the disk: after a kill -9 the replayed cache reads exactly as written."""
    base = random.Random(8).randbytes(SIZE)
    cache = _cache(tmp_path, base)
    model = bytearray(base)
    quarter = SIZE // 4

    def writer(n: int) -> None:
        rng = random.Random(n)
        for i in range(40):
            offset = n * quarter + rng.randrange(0, quarter - 6000)
            data = rng.randbytes(rng.choice((1, 100, SECTOR, 5000)))
            if rng.random() < 0.1 and i < 30:
                cache.commit()
            if cache.write_nowait(offset, data) is None:
                cache.write(offset, data, sync=rng.random() < 0.1 and i < 30)
            model[offset : offset + len(data)] = data

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counts = cache.cached_blocks(), cache.changed_bytes()
    assert os.path.getsize(tmp_path / "d.pending") > 32, "nothing held back: the kill tests no replay"
    _kill(cache)
    again = _cache(tmp_path, base)
    assert again.read(0, SIZE) == model
    assert (again.cached_blocks(), again.changed_bytes()) == counts
    again.close()
