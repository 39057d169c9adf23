"""A COMMIT that reaches a write cache after its close failed (a COMMIT racing the disk's unpublishing): close()
made nothing durable, so the COMMIT must fail too, not answer success as after a close that succeeded."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest

from tests.unit.test_write_cache_power_cut import SIZE, _cache
from tests.unit.test_write_cache_sync_errors import FailingDisk


@pytest.mark.parametrize(
    ("operation", "name", "code"), [("fdatasync", "d.data", errno.EIO), ("pwrite", "d.map", errno.ENOSPC)]
)
def test_a_commit_after_a_failed_close_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, operation: str, name: str, code: int
) -> None:
    base = random.Random(16).randbytes(SIZE)
    disk = FailingDisk(tmp_path, monkeypatch)
    cache = _cache(tmp_path, base)
    cache.write(5000, b"x" * 100, sync=False)  # held back: a copy-in around it
    disk.fault = (operation, name, code)
    with pytest.raises(OSError):
        cache.close()
    with pytest.raises(OSError):
        cache.commit()


def test_a_commit_after_a_close_that_succeeded_succeeds(tmp_path: Path) -> None:
    cache = _cache(tmp_path, random.Random(17).randbytes(SIZE))
    cache.write(5000, b"x" * 100, sync=False)
    cache.close()
    cache.commit()
