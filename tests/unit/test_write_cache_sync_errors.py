"""An I/O error part way through a data sync of the write cache (COMMIT, a stable write, close).

The rule: a sync that returns means everything acknowledged before it is on the disk; one that fails leaves nothing
claimed that is not, and its retry, once the disk is back, succeeds and makes it so. A failed ``fdatasync`` is
modelled as Linux does it: the pages it could not write are marked clean, so a later sync that succeeds does not
write them unless they are written again (a client resends its unstable writes, as the write verifier changes; the
bytes the server copied in from the backup nobody resends). The crash-image model is test_write_cache_power_cut's.
"""

from __future__ import annotations

import errno
import os
import random
from collections import defaultdict
from pathlib import Path

import pytest

from appliance.cache import overlay
from tests.unit.test_write_cache_power_cut import BLOCK, SECTOR, SIZE, Disk, Model, _cache, _write

PAGE = 4096


class FailingDisk(Disk):
    """``Disk``, with one failure injected on demand (an operation on one of the cache's files)."""

    def __init__(self, directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(directory, monkeypatch)
        self.fault: tuple[str, str, int] | None = None  # (operation, file name, errno), raised once
        self.dirty: dict[str, set[int]] = defaultdict(set)  # pages written since the file's last sync
        self.lossy: set[str] = set()  # files a sync failed on: the disk holds only what later syncs wrote
        real_pwrite, real_ftruncate, watched_fdatasync = os.pwrite, os.ftruncate, os.fdatasync

        def strike(operation: str, fd: int) -> str | None:
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            name = path.name if path.parent == directory else None
            if self.fault is not None and self.fault[:2] == (operation, name):
                code, self.fault = self.fault[2], None
                if operation == "fdatasync":
                    self.dirty[name].clear()  # marked clean, not written
                    self.lossy.add(name)
                raise OSError(code, os.strerror(code))
            return name

        def pwrite(fd: int, data, offset: int) -> int:
            name = strike("pwrite", fd)
            done = real_pwrite(fd, data, offset)
            if name:
                self.dirty[name].update(range(offset // PAGE, -(-(offset + done) // PAGE)))
            return done

        def ftruncate(fd: int, length: int) -> None:
            name = strike("ftruncate", fd)
            before = os.fstat(fd).st_size
            real_ftruncate(fd, length)
            if name:
                self.dirty[name].update(range(min(before, length) // PAGE, -(-max(before, length) // PAGE)))

        def fdatasync(fd: int) -> None:
            name = strike("fdatasync", fd)
            old = self.synced.get(name or "", b"")
            watched_fdatasync(fd)  # records the file's whole content as synced
            if name in self.lossy:
                now = self.synced[name]
                kept = bytearray(old[: len(now)].ljust(len(now), b"\0"))
                for page in self.dirty[name]:
                    kept[page * PAGE : (page + 1) * PAGE] = now[page * PAGE : (page + 1) * PAGE]
                self.synced[name] = bytes(kept)
            if name:
                self.dirty[name].clear()

        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "ftruncate", ftruncate)
        monkeypatch.setattr(os, "fdatasync", fdatasync)


FAULTS = [
    ("fdatasync", "d.data", errno.EIO),
    ("pwrite", "d.sectors", errno.ENOSPC),
    ("pwrite", "d.map", errno.ENOSPC),
    ("fdatasync", "d.map", errno.EIO),
    ("fdatasync", "d.sectors", errno.EIO),
    ("ftruncate", "d.pending", errno.EIO),
]


def failing_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base: bytes
) -> tuple[FailingDisk, overlay.WriteCache, list[bytes]]:
    """A fresh cache over ``base`` on a disk that fails on demand, every file synced as created; and the boot id
    the cache sees (change ``[0]`` to open the crash images as after a reboot)."""
    this_boot = [overlay.boot_id()]
    monkeypatch.setattr(overlay, "boot_id", lambda: this_boot[0])
    live = tmp_path / "live"
    disk = FailingDisk(live, monkeypatch)
    cache = _cache(live, base)
    disk.synced = {p.name: p.read_bytes() for p in live.iterdir()}
    return disk, cache, this_boot


@pytest.mark.parametrize(("operation", "name", "code"), FAULTS, ids=[f"{o} {n}" for o, n, _ in FAULTS])
@pytest.mark.parametrize("partial_bound", [overlay.MAX_PARTIAL_BLOCKS, 3])  # 3: most copy-ins are whole blocks
def test_a_commit_failing_part_way_claims_nothing_unsynced_and_its_retry_makes_everything_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, operation: str, name: str, code: int, partial_bound: int
) -> None:
    monkeypatch.setattr(overlay, "MAX_PARTIAL_BLOCKS", partial_bound)
    rng = random.Random(f"{operation} {name} {partial_bound}")
    base = rng.randbytes(SIZE)
    disk, cache, this_boot = failing_cache(tmp_path, monkeypatch, base)
    fds = len(os.listdir("/proc/self/fd"))
    model = Model(base)

    def power_cuts(what: str) -> None:
        running, this_boot[0] = this_boot[0], b"another boot...."
        for image in disk.images(tmp_path):
            reopened = _cache(image, base)
            model.check(reopened.read(0, SIZE), f"{what}, {image.name}")
            reopened.close()
        this_boot[0] = running

    struck = 0
    for round_ in range(4):
        unstable: list[tuple[int, bytes]] = []
        for _ in range(25):
            offset, n = _write(rng)
            data = rng.randbytes(n)
            sync = rng.random() < 0.1
            cache.write(offset, data, sync=sync)
            model.write(offset, data, sync)
            if not sync:
                unstable.append((offset, data))
        # Last, a sector cut in a partly written block (or a new one): its copy-in holds the block's mask back.
        index = min(cache._partial, default=None)
        while index is None or cache.cached(index):
            index = rng.randrange(SIZE // BLOCK)
        mask = cache._partial.get(index, 0)
        offset = index * BLOCK + next(s for s in range(BLOCK // SECTOR) if not mask >> s & 1) * SECTOR + 5
        cache.write(offset, b"h" * 10, sync=False)
        model.write(offset, b"h" * 10, sync=False)
        unstable.append((offset, b"h" * 10))
        assert cache._deferred, "no block held back: the sync has nothing to settle"
        disk.fault = (operation, name, code)
        try:
            cache.commit()
        except OSError as exc:
            assert exc.errno == code
            struck += 1
            power_cuts(f"round {round_}, after the failed commit")
            for offset, data in unstable:  # the write verifier changed: the client resends what its pages hold
                cache.write(offset, bytes(model.current[offset : offset + len(data)]), sync=False)
            disk.fault = None
            cache.commit()  # the disk is back
        else:
            assert disk.fault is not None, "the failure was swallowed"
            disk.fault = None
        model.commit()
        power_cuts(f"round {round_}, after the commit")
        assert cache.read(0, SIZE) == model.current
    assert struck, "the failure was never reached"
    cache.close()
    assert len(os.listdir("/proc/self/fd")) == fds - 4


@pytest.mark.parametrize(("operation", "name"), [("fdatasync", "d.data"), ("fdatasync", "d.map")])
def test_a_failed_close_reports_the_error_and_releases_every_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, operation: str, name: str
) -> None:
    base = random.Random(12).randbytes(SIZE)
    before = len(os.listdir("/proc/self/fd"))
    disk = FailingDisk(tmp_path, monkeypatch)
    cache = _cache(tmp_path, base)
    cache.write(5000, b"x" * 100, sync=False)  # held back
    disk.fault = (operation, name, errno.EIO)
    with pytest.raises(OSError, match="Input/output error"):
        cache.close()
    assert len(os.listdir("/proc/self/fd")) == before
    cache.close()  # closing twice is harmless
    monkeypatch.undo()
    assert _cache(tmp_path, base).read(5000, 100) == b"x" * 100  # the log of this boot is replayed


@pytest.mark.parametrize("block", ["partly written", "in the backup"])
def test_a_truncation_whose_data_sync_fails_claims_its_copied_in_sectors_only_once_they_are_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: str
) -> None:
    """A truncation cutting a block in two copies in from the backup what the cache lacks of it (nobody
    resends those bytes) and claims the block whole. Its data sync fails: the client retries the SETATTR, which must not
    claim the copied-in sectors whatever the failed sync lost."""
    base = random.Random(14).randbytes(SIZE)
    disk, cache, this_boot = failing_cache(tmp_path, monkeypatch, base)
    want = bytearray(base)
    if block == "partly written":
        cache.write(9 * BLOCK, b"w" * SECTOR, sync=True)  # block 9: its first sector only
        want[9 * BLOCK : 9 * BLOCK + SECTOR] = b"w" * SECTOR
    size = 9 * BLOCK + 2 * SECTOR + 100  # cuts block 9 in its third sector
    disk.fault = ("fdatasync", "d.data", errno.EIO)
    with pytest.raises(OSError, match="Input/output error"):
        cache.truncate(size)
    cache.truncate(size)  # the SETATTR again, the disk back
    del want[size:]
    assert cache.read(0, SIZE) == want
    this_boot[0] = b"another boot...."
    for image in disk.images(tmp_path):
        reopened = _cache(image, base)
        assert reopened.size == size and reopened.read(0, size) == want, image.name
        reopened.close()
