"""A restore from S3 fetches each chunk once, whatever the chunk size: its in-memory cache holds the whole
fetch-ahead window (16 chunks of 4 MiB did not fit the fixed 64 MiB it had, so fetched-ahead chunks were evicted
before use and fetched again: a 4 MiB-chunk restore ran slower than a 1 MiB one). Counted at the gateway."""

from __future__ import annotations

import os
from pathlib import Path

from tests.daemon_process import bootback

CHUNKS = 20


def test_restore_with_4m_chunks_gets_each_chunk_once(rgw, s3_repo: str, tmp_path: Path) -> None:
    data = os.urandom(CHUNKS * (4 << 20))
    (tmp_path / "big.raw").write_bytes(data)
    bootback("init", s3_repo, "--chunk-size", "4M", "--encryption", "none")
    bootback("backup", s3_repo, "--vm", "big", tmp_path / "big.raw")
    (tmp_path / "big.raw").unlink()
    gets = rgw.counters()["get"]
    bootback("restore", s3_repo, "big", "-o", tmp_path / "out.raw")
    fetched = rgw.counters()["get"] - gets
    assert (tmp_path / "out.raw").read_bytes() == data
    assert fetched <= CHUNKS + 4, f"{fetched} GETs for {CHUNKS} chunks (plus config and point file)"
