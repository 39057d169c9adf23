"""The item recovery tests' free-space reserve: the daemon's default --min-free (100 GiB) is more than a test
machine may have free, so item jobs in these tests keep a small one (``BOOTBACK_MIN_FREE``, read as the daemon
reads it); test_item_recovery's own small-file-system tests set theirs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

TEST_RESERVE = "64M"


@pytest.fixture(scope="module", autouse=True)
def small_reserve() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BOOTBACK_MIN_FREE", TEST_RESERVE)
        yield
