"""The S3 backup's dedup check keeps the listed chunk ids in a temporary file, not in memory: half a million ids cost
the process a constant few MB (a set of the key strings took ~120 MB), every listed id is found, others are not,
and nothing is left behind."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from appliance.errors import IntegrityError
from appliance.repo.backends.chunkids import ChunkIds
from appliance.repo.backends.s3 import S3Store
from tests.unit.test_s3_hostile_endpoint import store  # noqa: F401 - the in-memory store fixture


def keys(n: int, salt: bytes = b"") -> Iterator[str]:
    """``n`` chunk keys in key order, made on the fly (the listing's pages, as S3 returns them)."""
    ids = sorted(hashlib.sha256(salt + i.to_bytes(4, "big")).hexdigest() for i in range(n))
    for cid in ids:
        yield f"chunks/{cid[:2]}/{cid}"


def test_half_a_million_ids_in_constant_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    listed = list(keys(500_000))
    tracemalloc.start()
    try:
        ids = ChunkIds(iter(listed), "s3://bucket/repo")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB held for the listing"
    assert os.listdir(tmp_path) == []  # unlinked at creation: nothing left even if the backup dies
    try:
        assert ids.count == 500_000
        assert all(k in ids for k in listed[::997]) and listed[0] in ids and listed[-1] in ids
        assert not any(k in ids for k in keys(2000, salt=b"other"))
        assert "chunks/zz/not-a-chunk" not in ids
    finally:
        ids.close()


def test_empty_listing_and_a_listing_out_of_order() -> None:
    empty = ChunkIds(iter(()), "s3://bucket/repo")
    assert "chunks/ab/" + "ab" * 32 not in empty
    empty.close()
    backwards = list(keys(3))[::-1]
    with pytest.raises(IntegrityError, match="not in key order"):
        ChunkIds(iter(backwards), "s3://bucket/repo")


def test_backup_batch_dedups_against_the_listing(store: S3Store) -> None:  # noqa: F811
    listed = list(keys(2500))
    for k in listed:
        store.client.objects[f"repo/{k}"] = b"x"
        store.client.mtime[f"repo/{k}"] = datetime.now(UTC)
    store._point_client = store.client
    with store.writer() as batch:
        assert batch.has(listed[1234]) and not batch.has(next(keys(1, salt=b"new")))
        assert store.client.list_calls >= 3  # listed once, page by page, at the first lookup
        calls = store.client.list_calls
        assert batch.has(listed[0]) and store.client.list_calls == calls  # never listed again
