"""A write (FILE_SYNC, or UNSTABLE then COMMIT) that fails after it set its blocks' bits, and the client's retry of it.

The write makes a partly written block whole; the map's sync fails (EIO). The client gets the error and sends the
write again, which succeeds: the block must then read as the retried write, live and after a power cut, not as the
backup in the sectors the old mask lacked (the failed write left that mask in memory beside the new bit)."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest

from tests.unit.test_write_cache_power_cut import BLOCK, SECTOR, SIZE, _cache
from tests.unit.test_write_cache_sync_errors import failing_cache

CASES = [  # an UNSTABLE write syncs nothing: only a map write can fail in it
    (True, "fdatasync", "d.map", errno.EIO),
    (True, "pwrite", "d.map", errno.ENOSPC),
    (False, "pwrite", "d.map", errno.ENOSPC),
]


@pytest.mark.parametrize(("stable", "operation", "name", "code"), CASES, ids=[f"{s} {o}" for s, o, _, _ in CASES])
def test_a_write_retried_after_its_map_failed_reads_back_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, operation: str, name: str, code: int, stable: bool
) -> None:
    base = random.Random(15).randbytes(SIZE)
    disk, cache, this_boot = failing_cache(tmp_path, monkeypatch, base)
    want = bytearray(base)
    b0 = 5 * BLOCK
    cache.write(b0, b"a" * SECTOR, sync=True)  # block 5: its first sector only
    want[b0 : b0 + SECTOR] = b"a" * SECTOR
    rest = b"b" * (BLOCK - SECTOR)  # the other sectors: the block is whole
    disk.fault = (operation, name, code)
    with pytest.raises(OSError) as failed:
        cache.write(b0 + SECTOR, rest, sync=stable)
    assert failed.value.errno == code
    cache.write(b0 + SECTOR, rest, sync=stable)  # the client's retry, the disk back
    if not stable:
        cache.commit()
    want[b0 + SECTOR : b0 + BLOCK] = rest
    assert cache.read(0, SIZE) == want
    this_boot[0] = b"another boot...."
    for image in disk.images(tmp_path):
        reopened = _cache(image, base)
        assert reopened.read(0, SIZE) == want, image.name
        reopened.close()
    cache.close()
