"""A truncation after a COMMIT that failed once its blocks were settled (the map's sync): the pending log still
names those blocks though none is held back. A truncation cutting them off, whose own sync fails too (the disk
still failing), and a kill -9 after it must leave a cache that opens: its log must not name blocks past the end."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest

from appliance.cache import overlay
from tests.unit.test_write_cache_power_cut import BLOCK, SIZE, _cache
from tests.unit.test_write_cache_sync_errors import FailingDisk


def test_a_failed_truncation_after_a_failed_commit_leaves_a_log_that_replays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = random.Random(18).randbytes(SIZE)
    monkeypatch.setattr(overlay, "boot_id", lambda: b"this boot.......")
    disk = FailingDisk(tmp_path, monkeypatch)
    cache = _cache(tmp_path, base)
    cache.write(60 * BLOCK + 100, b"u" * 10, sync=False)  # a copy-in around it: held back, in the log
    disk.fault = ("fdatasync", "d.map", errno.EIO)
    with pytest.raises(OSError):
        cache.commit()
    disk.fault = ("fdatasync", "d.map", errno.EIO)
    with pytest.raises(OSError):
        cache.truncate(10 * BLOCK + 5)
    disk.fault = None
    reopened = _cache(tmp_path, base)  # a kill -9: the page cache keeps every file as written
    assert reopened.read(0, 10 * BLOCK) == base[: 10 * BLOCK]
    reopened.close()
