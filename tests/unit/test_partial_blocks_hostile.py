"""A hostile second look at partly written blocks (map version 2): random operations against a model (the
backup underneath, every write in order, zeros past a truncation) with small blocks so that block, sector and
disk-end boundaries are hit all the time; reopens after close and after a simulated kill -9; write_nowait that
gives up changes nothing; a migration hears of every written block; damaged or hostile sectors files."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from appliance.cache.overlay import INLINE_WRITE_MAX, SECTOR, WriteCache
from appliance.errors import DiskTooLargeError


class Backing:
    """The backup underneath; its non-blocking read sometimes says it would wait."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.data = rng.randbytes(size)
        self.rng = rng

    def __call__(self, offset: int, n: int) -> bytes:
        return self.data[offset : offset + n]

    def nowait(self, offset: int, n: int) -> bytes | None:
        return None if self.rng.random() < 0.2 else self.data[offset : offset + n]


def _near(rng: random.Random, bs: int, limit: int) -> int:
    """An offset at or next to a block, sector or disk-end boundary (or anywhere), within 0..limit."""
    kind = rng.randrange(5)
    if kind == 0:
        base = rng.randrange(0, limit // bs + 1) * bs
    elif kind == 1:
        base = rng.randrange(0, limit // SECTOR + 1) * SECTOR
    elif kind == 2:
        base = limit
    else:
        base = rng.randrange(0, limit + 1)
    return max(0, min(limit, base + rng.choice((-1, 0, 0, 0, 1, rng.randrange(-100, 100)))))


def _length(rng: random.Random, bs: int) -> int:
    return rng.choice((1, SECTOR - 1, SECTOR, SECTOR + 1, 2 * SECTOR, bs - 1, bs, bs + 1, rng.randrange(1, 3 * bs)))


def _open(tmp: Path, backing: Backing, size: int, bs: int) -> WriteCache:
    return WriteCache(tmp, "d", backing, size, block_size=bs, backing_nowait=backing.nowait)


def _crash(cache: WriteCache) -> None:
    """kill -9: the descriptors go, nothing is synced (what reached the page cache stays, as after a real kill)."""
    for fd in (cache._data_fd, cache._map_fd, cache._sectors_fd, cache._pending_fd):
        if fd >= 0:
            os.close(fd)
    cache._closed = True


def _run_model(seed: int, tmp: Path, steps: int) -> None:
    rng = random.Random(seed)
    bs = rng.choice((8192, 16384, 16384, 32768, 65536))
    size0 = rng.randrange(2 * bs, 6 * bs) + rng.choice((0, 1, 100, SECTOR - 1, SECTOR + 7))
    backing = Backing(size0, random.Random(seed + 1))
    model = bytearray(backing.data)
    cache = _open(tmp, backing, size0, bs)
    cache.dirty_tracker = set()
    history: list[str] = []

    def check(what: str) -> None:
        assert cache.size == len(model), f"seed {seed}: size after {history[-8:]}"
        got = cache.read(0, len(model) + bs)
        if got != bytes(model):
            bad = next(i for i in range(len(model)) if got[i] != model[i])
            raise AssertionError(f"seed {seed} block {bs}: byte {bad} wrong after {what}; last ops {history[-8:]}")

    for step in range(steps):
        op = rng.random()
        size = len(model)
        if op < 0.45:  # a write, sometimes growing the disk
            offset = _near(rng, bs, min(size + bs, cache.max_size - 1))
            n = min(_length(rng, bs), cache.max_size - offset)
            data = rng.randbytes(n)
            nowait = rng.random() < 0.5 and n <= INLINE_WRITE_MAX
            history.append(f"{'write_nowait' if nowait else 'write'}({offset}, {n})")
            cache.dirty_tracker = set()
            if nowait:
                before_files = [p.read_bytes() for p in (cache.data_path, cache.map_path, cache.sectors_path)]
                before = (cache.size, dict(cache._partial), bytes(cache._bits), cache.changed_bytes())
                done = cache.write_nowait(offset, data)
                aligned = offset % SECTOR == 0 and (n % SECTOR == 0 or offset + n == size)
                if done is None:
                    assert not (aligned and offset + n <= size), f"seed {seed}: an aligned write gave up"
                    after = (cache.size, dict(cache._partial), bytes(cache._bits), cache.changed_bytes())
                    assert after == before and cache.dirty_tracker == set(), "write_nowait gave up, changed state"
                    files = [p.read_bytes() for p in (cache.data_path, cache.map_path, cache.sectors_path)]
                    assert files == before_files, "write_nowait gave up, changed a file"
                    check(history[-1])
                    continue
                assert done == n
            else:
                assert cache.write(offset, data, sync=rng.random() < 0.3) == n
            if offset + n > size:
                model.extend(bytes(offset + n - size))
            model[offset : offset + n] = data
            want = set(range(offset // bs, (offset + n - 1) // bs + 1))
            assert want <= cache.dirty_tracker, f"seed {seed}: migration not told of {want - cache.dirty_tracker}"
        elif op < 0.6:  # a read, blocking or not, of any range
            offset = _near(rng, bs, size + 10)
            n = _length(rng, bs)
            history.append(f"read({offset}, {n})")
            want = bytes(model[offset : offset + n])
            assert cache.read(offset, n) == want, f"seed {seed}: {history[-1]} after {history[-8:-1]}"
            got = cache.read_nowait(offset, n)
            if got is not None:
                assert bytes(got) == want, f"seed {seed}: nowait {history[-1]} after {history[-8:-1]}"
        elif op < 0.75:  # truncate: shrink (often inside a partly written block) or grow
            new = _near(rng, bs, min(cache.max_size, size + 2 * bs))
            history.append(f"truncate({new})")
            cache.truncate(new)
            del model[new:]
            model.extend(bytes(new - len(model)))
        elif op < 0.8:
            history.append("commit")
            cache.commit()
        elif op < 0.9:  # reopen after a clean close or a kill -9
            crash = rng.random() < 0.5
            history.append("kill -9" if crash else "close")
            _crash(cache) if crash else cache.close()
            cache = _open(tmp, backing, size0, bs)
        else:  # an empty write inside the disk: nothing changes
            offset = _near(rng, bs, size)
            history.append(f"write({offset}, 0)")
            assert cache.write(offset, b"", sync=False) == 0
        if step % 7 == 0:
            check(history[-1])
    check("the end")
    cache.close()
    again = _open(tmp, backing, size0, bs)
    assert again.read(0, len(model)) == bytes(model), f"seed {seed}: wrong after the last reopen"
    again.close()


@pytest.mark.parametrize("seed", range(24))
def test_random_operations_match_the_model(tmp_path: Path, seed: int) -> None:
    _run_model(seed, tmp_path, 250)


def test_growth_past_the_bound_is_refused_before_anything_changes(tmp_path: Path) -> None:
    backing = Backing(3 * 16384 + 5, random.Random(3))
    cache = _open(tmp_path, backing, len(backing.data), 16384)
    with pytest.raises(DiskTooLargeError):
        cache.write(cache.max_size - SECTOR, bytes(2 * SECTOR), sync=False)
    assert cache.size == len(backing.data) and cache.read(0, cache.size) == backing.data
    cache.close()


def test_empty_writes_at_block_and_sector_boundaries(tmp_path: Path) -> None:
    """A zero-byte WRITE (legal in NFSv3) at the start of a block still in the backup raised 'negative shift
    count', and one at a sector boundary copied two sectors in and recorded an empty mask."""
    bs = 16384
    backing = Backing(4 * bs + 100, random.Random(4))
    cache = _open(tmp_path, backing, len(backing.data), bs)
    for offset in (0, bs, bs + SECTOR, 2 * bs + 5, cache.size):
        assert cache.write(offset, b"", sync=True) == 0
    assert cache._partial == {} and cache.cached_blocks() == 0 and cache.changed_bytes() == 0
    assert cache.read(0, cache.size) == backing.data
    cache.close()


def _damaged(tmp_path: Path, damage) -> tuple[Backing, WriteCache]:
    bs = 16384
    backing = Backing(3 * bs + 100, random.Random(5))
    cache = _open(tmp_path, backing, len(backing.data), bs)
    cache.write(bs + SECTOR, b"w" * SECTOR, sync=True)  # block 1: sector 1 written
    cache.close()
    damage(cache.sectors_path)
    return backing, _open(tmp_path, backing, len(backing.data), bs)


def _expected(backing: Backing) -> bytes:
    model = bytearray(backing.data)
    model[16384 + SECTOR : 16384 + 2 * SECTOR] = b"w" * SECTOR
    return bytes(model)


def test_masks_past_the_disk_end_in_the_sectors_file_are_dropped(tmp_path: Path) -> None:
    """The disk has 4 blocks, its map room for 8: a mask at block 6 (a damaged file, or a growth whose header a
    power cut lost) raised 'negative shift count' instead of being ignored."""

    def damage(path: Path) -> None:
        with open(path, "r+b") as f:
            f.seek(6)
            f.write(b"\x0f")

    backing, cache = _damaged(tmp_path, damage)
    assert cache.read(0, cache.size) == _expected(backing)
    grown = cache.max_size  # over block 6: it reads as zeros, now and after a reopen
    cache.truncate(grown)
    cache.write(6 * 16384 + 10, b"z", sync=True)
    want = bytearray(_expected(backing).ljust(grown, b"\0"))
    want[6 * 16384 + 10] = ord("z")
    assert cache.read(0, cache.size) == want
    cache.close()
    again = _open(tmp_path, backing, len(backing.data), 16384)
    assert again.read(0, again.size) == want and again._partial == {1: 0b10}  # the stale mask is gone
    again.close()


def test_data_only_far_past_the_end_of_the_sectors_file(tmp_path: Path) -> None:
    """A sectors file that is a hole up to its end and has data beyond it made a negative pread (EINVAL)."""

    def damage(path: Path) -> None:
        with open(path, "r+b") as f:
            f.truncate(0)
            f.seek(1 << 20)
            f.write(b"\xff" * 100)

    backing, cache = _damaged(tmp_path, damage)
    assert cache.read(0, cache.size) == backing.data  # the mask was lost: the backup shows, nothing else
    cache.close()


def test_huge_sparse_and_garbage_sectors_files_are_bounded(tmp_path: Path) -> None:
    def damage(path: Path) -> None:
        with open(path, "r+b") as f:
            f.write(b"\x00\xf2")  # block 1: sector 1 and garbage bits past its 4 sectors
            f.truncate(1 << 40)  # a terabyte of hole

    backing, cache = _damaged(tmp_path, damage)
    assert cache.read(0, cache.size) == _expected(backing)
    assert cache._partial == {1: 0b10}
    cache.close()


def test_a_symlink_planted_at_the_sectors_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    cache_dir = tmp_path / "c"
    cache_dir.mkdir()
    (cache_dir / "d.sectors").symlink_to(victim)
    backing = Backing(3 * 16384, random.Random(6))
    with pytest.raises(OSError, match="d.sectors"):
        _open(cache_dir, backing, len(backing.data), 16384)
    assert victim.read_bytes() == b"keep"
    # and at reopen
    other = tmp_path / "o"
    cache = _open(other, backing, len(backing.data), 16384)
    cache.write(0, b"x" * SECTOR, sync=True)
    cache.close()
    (other / "d.sectors").unlink()
    (other / "d.sectors").symlink_to(victim)
    with pytest.raises(OSError, match="d.sectors"):
        _open(other, backing, len(backing.data), 16384)
    assert victim.read_bytes() == b"keep"


class _Interleave(dict):
    """The partial-block dict, with a hook run between a reader's 'is this block partial' and what follows."""

    hook = None

    def _after_look_up(self) -> None:
        if self.hook is not None:
            hook, self.hook = self.hook, None
            worker = threading.Thread(target=hook)
            worker.start()
            worker.join()

    def __contains__(self, key: object) -> bool:
        found = super().__contains__(key)
        if found:
            self._after_look_up()
        return found

    def get(self, key, default=None):  # noqa: ANN001, ANN201 - dict's own signature
        found = super().get(key, default)
        if found is not None:
            self._after_look_up()
        return found


def test_a_read_racing_the_write_that_makes_its_block_whole(tmp_path: Path) -> None:
    """Reads take no lock: a write that completed a partly written block between the reader's look-up of the
    block and of its mask made the read fail with KeyError."""
    bs = 16384
    backing = Backing(2 * bs, random.Random(8))
    cache = _open(tmp_path, backing, 2 * bs, bs)
    cache.write(0, b"a" * SECTOR, sync=False)
    cache._partial = _Interleave(cache._partial)
    cache._partial.hook = lambda: cache.write(SECTOR, b"b" * (bs - SECTOR), sync=False)
    got = cache.read(0, bs)
    assert cache._partial.hook is None, "the write did not run between the look-ups"
    assert got in (b"a" * SECTOR + backing.data[SECTOR:bs], b"a" * SECTOR + b"b" * (bs - SECTOR))
    assert cache.read(0, bs) == b"a" * SECTOR + b"b" * (bs - SECTOR)
    cache.close()


def test_a_stable_write_of_sectors_past_the_end_makes_the_new_size_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the data and sectors files were synced: a power cut could take the header's new size back, and the
    acknowledged sectors past the old end with it (with whole blocks the map sync carried the header along)."""
    bs = 16384
    backing = Backing(2 * bs, random.Random(9))
    cache = _open(tmp_path, backing, 2 * bs, bs)
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    cache.write(2 * bs + SECTOR, b"g" * SECTOR, sync=True)  # a sector of a new block: a mask, no map bit
    assert cache._partial == {2: 0b10} and cache.size == 2 * bs + 2 * SECTOR
    assert cache._map_fd in synced, "the grown size was not made durable"
    assert synced.index(cache._data_fd) < synced.index(cache._map_fd)  # data first, then what points at it
    monkeypatch.undo()
    cache.close()


def test_a_write_or_read_after_close_touches_no_other_file(tmp_path: Path) -> None:
    """A WRITE already handed to the write pool when its disk is unpublished runs after close(): it wrote through
    descriptor numbers the process had since given to other files (a file outside the cache directory here)."""
    bs = 16384
    backing = Backing(4 * bs, random.Random(10))
    cache = _open(tmp_path / "c", backing, 4 * bs, bs)
    cache.write(0, b"c" * SECTOR, sync=True)
    cache.close()
    others = [os.open(tmp_path / f"other{i}", os.O_RDWR | os.O_CREAT, 0o600) for i in range(3)]
    try:
        for fd in others:
            os.pwrite(fd, b"other file " * 1000, 0)
        assert {cache._data_fd, cache._map_fd, cache._sectors_fd} <= set(others)  # the numbers were reused
        for attempt in (
            lambda: cache.write(bs + SECTOR, b"w" * SECTOR, sync=False),
            lambda: cache.write(10, b"w" * 10, sync=True),
            lambda: cache.truncate(bs + 100),
            lambda: cache.read(0, SECTOR),
        ):
            with pytest.raises(OSError, match="closed"):
                attempt()
        assert cache.write_nowait(0, b"w" * SECTOR) is None
        for fd in others:
            assert os.pread(fd, 20000, 0) == b"other file " * 1000
    finally:
        for fd in others:
            os.close(fd)
