"""A power cut in the write cache: what reached the disk is only what was synced, in any mix per file.

The harness records each cache file's content at every ``fsync``/``fdatasync`` of it (what a power cut is sure to
keep) beside its current content (what the page cache held, some of which a power cut may keep too). A crash image
takes, for each of the data, map and sectors files, either its synced or its current content (all 8 mixes: the
kernel writes back files independently), and its pending log as it was, under another boot id (a reboot). Opened
from that image, every byte outside the ranges of UNSTABLE writes made since the last COMMIT must read as the
committed disk: the backup, with committed and stable writes on top. Inside those ranges anything is allowed, as
the client resends its uncommitted writes (the write verifier changes); bytes copied in from the backup around
such a write are nobody's to resend, so they must never be claimed by a bit or mask that outlives them.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.cache import overlay
from appliance.cache.overlay import SECTOR, WriteCache
from appliance.errors import IntegrityError

SIZE = 1024 * 1024 + 3000
BLOCK = 16 * 1024
NAMES = ("data", "map", "sectors")


class Disk:
    """Each cache file's synced content, kept by watching the sync calls on its descriptors."""

    def __init__(self, directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.directory = directory
        self.synced: dict[str, bytes] = {}
        real_fsync, real_fdatasync = os.fsync, os.fdatasync

        def watch(real):
            def sync(fd: int) -> None:
                real(fd)
                path = Path(os.readlink(f"/proc/self/fd/{fd}"))
                if path.parent == directory:
                    self.synced[path.name] = path.read_bytes()

            return sync

        monkeypatch.setattr(os, "fsync", watch(real_fsync))
        monkeypatch.setattr(os, "fdatasync", watch(real_fdatasync))

    def images(self, target: Path) -> Iterator[Path]:
        """Every mix of synced and current content of the data, map and sectors files."""
        for n, mix in enumerate(itertools.product((False, True), repeat=3)):
            image = target / f"image{n}"
            shutil.rmtree(image, ignore_errors=True)
            shutil.copytree(self.directory, image)
            for name, synced in zip(NAMES, mix, strict=True):
                if synced:
                    # a file never synced yet (the map is written atomically, with its directory) is empty
                    (image / f"d.{name}").write_bytes(self.synced.get(f"d.{name}", b""))
            yield image


class Model:
    """The committed disk and which bytes a client may still resend."""

    def __init__(self, base: bytes) -> None:
        self.current = bytearray(base)
        self.durable = bytearray(base)
        self.unsure = bytearray(SIZE)  # 1: written UNSTABLE since the last commit

    def write(self, offset: int, data: bytes, sync: bool) -> None:
        end = offset + len(data)
        self.current[offset:end] = data
        if sync:
            self.durable[offset:end] = data
            self.unsure[offset:end] = bytes(len(data))
        else:
            self.unsure[offset:end] = b"\1" * len(data)

    def commit(self) -> None:
        self.durable[:] = self.current
        self.unsure[:] = bytes(SIZE)

    def check(self, got: bytes, what: str) -> None:
        seen = bytearray(got)
        for run in re.finditer(b"\1+", self.unsure):  # anything goes there: the client resends it
            seen[run.start() : run.end()] = self.durable[run.start() : run.end()]
        if seen != self.durable:
            first = next(i for i in range(SIZE) if seen[i] != self.durable[i])
            raise AssertionError(f"{what}: committed bytes misread from offset {first} (block {first // BLOCK})")


def _write(rng: random.Random) -> tuple[int, int]:
    kind = rng.randrange(4)
    if kind == 0:  # whole sectors, as guests write
        offset = rng.randrange(0, SIZE // SECTOR - 4) * SECTOR
        return offset, SECTOR * rng.randrange(1, 4)
    if kind == 1:  # a cut sector or two: their other bytes are copied in from the backup
        return rng.randrange(0, SIZE - 9000), rng.choice((1, 512, 3000, 5000, 9000))
    if kind == 2:  # a whole block
        return rng.randrange(0, SIZE // BLOCK - 1) * BLOCK, BLOCK
    return rng.randrange(0, SIZE - 40000), rng.randrange(1, 40000)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("boot", ["known", "unknown"])
def test_a_power_cut_never_loses_bytes_copied_in_from_the_backup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, boot: str
) -> None:
    rng = random.Random(seed)
    base = rng.randbytes(SIZE)
    # "unknown": no boot id to tell a kill -9 from a power cut, so a copy-in reaches the disk before its bit
    this_boot = [overlay.boot_id() if boot == "known" else None]
    monkeypatch.setattr(overlay, "boot_id", lambda: this_boot[0])
    live = tmp_path / "live"
    disk = Disk(live, monkeypatch)
    cache = WriteCache(live, "d", lambda o, n: base[o : o + n], SIZE, block_size=BLOCK)
    disk.synced = {p.name: p.read_bytes() for p in live.iterdir()}  # creation syncs each file (the map atomically)
    model = Model(base)
    for step in range(60):
        offset, n = _write(rng)
        data = rng.randbytes(n)
        sync = rng.random() < 0.15
        cache.write(offset, data, sync=sync)
        model.write(offset, data, sync)
        if rng.random() < 0.1:
            cache.commit()
            model.commit()
        if step % 15 == 14:
            running, this_boot[0] = this_boot[0], b"another boot...."  # the power comes back
            for image in disk.images(tmp_path):
                reopened = WriteCache(image, "d", lambda o, n: base[o : o + n], SIZE, block_size=BLOCK)
                model.check(reopened.read(0, SIZE), f"step {step}, {image.name}")
                reopened.close()
            this_boot[0] = running
    assert cache.read(0, SIZE) == model.current
    cache.close()


def _cache(directory: Path, base: bytes) -> WriteCache:
    return WriteCache(directory, "d", lambda o, n: base[o : o + n], SIZE, block_size=BLOCK)


def test_a_stable_rewrite_syncs_the_bit_an_earlier_unstable_write_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FILE_SYNC into a block whose bit an UNSTABLE write set (map not synced yet): the bit is synced too,
    or a power cut would read the stable write's block back as the backup."""
    base = random.Random(1).randbytes(SIZE)
    live = tmp_path / "live"
    disk = Disk(live, monkeypatch)
    cache = _cache(live, base)
    disk.synced = {p.name: p.read_bytes() for p in live.iterdir()}
    cache.write(3 * BLOCK, b"u" * BLOCK, sync=False)  # a whole block: its bit, not synced
    cache.write(3 * BLOCK, b"s" * BLOCK, sync=True)  # acknowledged as on the disk
    monkeypatch.setattr(overlay, "boot_id", lambda: b"another boot....")
    image = tmp_path / "image"
    shutil.copytree(live, image)
    (image / "d.map").write_bytes(disk.synced["d.map"])  # what a power cut is sure to keep
    (image / "d.data").write_bytes(disk.synced["d.data"])
    assert _cache(image, base).read(3 * BLOCK, BLOCK) == b"s" * BLOCK


def test_the_pending_log_is_replayed_in_the_same_boot_and_dropped_after_a_reboot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = random.Random(2).randbytes(SIZE)
    for boot, expect in ((overlay.boot_id(), b"x" * 100), (b"another boot....", base[5000:5100])):
        directory = tmp_path / str(len(expect) + len(str(boot)))
        cache = _cache(directory, base)
        cache.write(5000, b"x" * 100, sync=False)  # cuts a sector: copied in, its mask held back
        assert (directory / "d.sectors").read_bytes().strip(b"\0") == b"", "the mask reached the file early"
        assert os.path.getsize(directory / "d.pending") > 32
        for fd in (cache._data_fd, cache._map_fd, cache._sectors_fd, cache._pending_fd):
            os.close(fd)  # kill -9: nothing synced, the page cache keeps what was written
        monkeypatch.setattr(overlay, "boot_id", lambda boot=boot: boot)
        reopened = _cache(directory, base)
        assert reopened.read(5000, 100) == expect
        assert os.path.getsize(directory / "d.pending") == 32  # replayed into the map, or dropped
        reopened.close()
        monkeypatch.undo()


def test_a_full_pending_log_syncs_instead_and_the_event_loop_never_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(overlay, "MAX_PENDING", 4)
    base = random.Random(3).randbytes(SIZE)
    cache = _cache(tmp_path, base)
    for block in range(10):
        cache.write(block * BLOCK + 100, b"y" * 10, sync=False)  # a copy-in each
        entries = (os.path.getsize(tmp_path / "d.pending") - 32) // cache._entry_len
        assert entries <= 4
    assert (tmp_path / "d.sectors").read_bytes().strip(b"\0"), "a full log settled its blocks into the file"
    cache.commit()
    cache.write(30 * BLOCK + 100, b"y" * 10, sync=False)  # a copy-in: block 30's mask is held back
    while cache._log_has_room(1):
        cache.write(40 * BLOCK + 100 + cache._pending_end, b"z", sync=False)  # block 40's, until the log is full
    synced = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd))
    assert cache.write_nowait(30 * BLOCK, b"v" * SECTOR) is None  # a held-back block, the log full: to the pool
    assert synced == []
    monkeypatch.undo()
    cache.close()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[:32] + (10**9).to_bytes(8, "big") + raw[40:], "is damaged"),
        (lambda raw: raw[:32] + (7).to_bytes(8, "big") + b"\xff" * (len(raw) - 40), "is damaged"),
        (lambda raw: raw + raw[32:] * 5000, "more than a header and 4096 entries"),
    ],
)
def test_a_damaged_pending_log_of_this_boot_is_refused_without_leaking_descriptors(
    tmp_path: Path, damage, message: str
) -> None:
    base = random.Random(4).randbytes(SIZE)
    cache = _cache(tmp_path, base)
    cache.write(7 * BLOCK + 5, b"q" * 10, sync=False)
    for fd in (cache._data_fd, cache._map_fd, cache._sectors_fd, cache._pending_fd):
        os.close(fd)
    log = tmp_path / "d.pending"
    log.write_bytes(damage(log.read_bytes()))
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(IntegrityError, match=message):
        _cache(tmp_path, base)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_log_entry_cut_short_by_a_kill_is_dropped_and_the_rest_replayed(tmp_path: Path) -> None:
    """A kill -9 may cut the log's last write at a page boundary; that write was never acknowledged."""
    base = random.Random(9).randbytes(SIZE)
    cache = _cache(tmp_path, base)
    cache.write(7 * BLOCK + 5, b"q" * 10, sync=False)  # acknowledged: its entry is whole
    for fd in (cache._data_fd, cache._map_fd, cache._sectors_fd, cache._pending_fd):
        os.close(fd)
    log = tmp_path / "d.pending"
    raw = log.read_bytes()
    log.write_bytes(raw + raw[32:35])  # three bytes of the entry the kill interrupted
    assert _cache(tmp_path, base).read(7 * BLOCK + 5, 10) == b"q" * 10


def test_a_torn_log_from_another_boot_is_dropped(tmp_path: Path) -> None:
    base = random.Random(5).randbytes(SIZE)
    _cache(tmp_path, base).close()
    (tmp_path / "d.pending").write_bytes(b"\x17" * 1000)  # whatever a power cut left
    assert _cache(tmp_path, base).read(0, SIZE) == base
    assert os.path.getsize(tmp_path / "d.pending") == 32


@pytest.mark.parametrize("end", ["close", "kill -9"])
@pytest.mark.parametrize("failing", ["pending", "sectors"])
def test_a_full_disk_under_the_log_or_the_sectors_file_loses_no_acknowledged_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str, end: str
) -> None:
    """ENOSPC (or a short write) on the pending log or on the sectors file, as a full cache disk gives: the write
    fails or is acknowledged, and every acknowledged one reads back after close and reopen."""
    base = random.Random(6).randbytes(SIZE)
    cache = _cache(tmp_path, base)
    target = {"pending": cache._pending_fd, "sectors": cache._sectors_fd}[failing]
    real = os.pwrite
    full = [False]
    calls = [0]

    def pwrite(fd: int, data, offset: int) -> int:
        if fd == target and full[0]:
            calls[0] += 1
            if len(data) > 3 and calls[0] % 2:
                return real(fd, bytes(data)[:3], offset)  # a short write: the disk filled up during it
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    model = Model(base)  # "unsure": bytes of a write that failed (it may have landed or not)
    rng = random.Random(7)
    for step in range(200):
        full[0] = 50 <= step < 150
        offset = rng.randrange(0, SIZE - 5000)
        data = rng.randbytes(rng.choice((10, 700, 4096, 5000)))
        try:
            cache.write(offset, data, sync=rng.random() < 0.1)
        except OSError as exc:
            assert exc.errno == 28
            model.unsure[offset : offset + len(data)] = b"\1" * len(data)
            continue
        model.write(offset, data, sync=True)  # acknowledged: it must survive a close and reopen
        if step % 40 == 39:
            try:
                cache.commit()
            except OSError:
                pass
    full[0] = False
    monkeypatch.undo()
    model.check(cache.read(0, SIZE), "running")
    if end == "close":
        cache.close()
    else:
        for fd in (cache._data_fd, cache._map_fd, cache._sectors_fd, cache._pending_fd):
            os.close(fd)  # nothing synced; the page cache keeps what was written
    again = _cache(tmp_path, base)
    model.check(again.read(0, SIZE), "reopened")
    again.close()


def test_a_torn_log_entry_is_cut_off_and_its_write_settled_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = random.Random(8).randbytes(SIZE)
    cache = _cache(tmp_path, base)
    real = os.pwrite
    full = [False]

    def pwrite(fd: int, data, offset: int) -> int:
        """A disk filling up as Linux reports it: a short write, then ENOSPC on its retry."""
        if fd != cache._pending_fd:
            return real(fd, data, offset)
        if full[0]:
            raise OSError(28, "No space left on device")
        full[0] = True
        return real(fd, bytes(data)[:3], offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    cache.write(9 * BLOCK + 5, b"t" * 10, sync=False)  # a copy-in: its log entry is torn by a full disk
    monkeypatch.undo()
    assert os.path.getsize(tmp_path / "d.pending") == 32, "a torn entry left in the log"
    assert (tmp_path / "d.sectors").read_bytes().strip(b"\0"), "the write was settled into the files instead"
    for fd in (cache._data_fd, cache._map_fd, cache._sectors_fd, cache._pending_fd):
        os.close(fd)  # kill -9
    assert _cache(tmp_path, base).read(9 * BLOCK + 5, 10) == b"t" * 10
