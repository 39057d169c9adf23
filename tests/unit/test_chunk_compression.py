"""How a chunk is compressed: the repository's level, or zstd's fastest for data that samples show will not
shrink (random, already compressed or encrypted guest data). Either is one zstd frame, read back the same."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import zstandard

from appliance.ingest.backup import backup_vm
from appliance.ingest.sources import DiskSource
from appliance.repo import Repository
from appliance.repo.store import SAMPLE_BYTES

MiB = 1 << 20


def src(name: str, data: bytes) -> DiskSource:
    return DiskSource(name=name, size=len(data), format="raw", stream=io.BytesIO(data))


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", chunk_size=MiB)


def _levels(repo: Repository) -> set[str]:
    """Which of the store's per-thread compressors were made (this thread's)."""
    made = repo.store._local.__dict__
    return {name for name, key in (("repository", "c"), ("fastest", "f")) if key in made}


def test_random_chunk_takes_the_fastest_level_and_reads_back(repo: Repository) -> None:
    data = os.urandom(MiB)
    frame = repo.store._compress(data)
    assert _levels(repo) == {"repository", "fastest"}  # the samples at level 3, the chunk at the fastest
    assert zstandard.ZstdDecompressor().decompress(frame) == data


def test_compressible_chunk_keeps_the_repository_level(repo: Repository) -> None:
    data = (b"guest file system metadata, " * 40000)[:MiB]
    frame = repo.store._compress(data)
    assert "fastest" not in _levels(repo)
    assert len(frame) < MiB // 100  # really compressed, at level 3
    assert zstandard.ZstdDecompressor().decompress(frame) == data


def test_samples_are_start_middle_and_end(repo: Repository) -> None:
    # Random only where the three samples fall: taken for incompressible (stored larger than it could be, but
    # whole); random everywhere but there: compressed at the repository's level.
    mid = (MiB - SAMPLE_BYTES) // 2
    spots = [(0, SAMPLE_BYTES), (mid, mid + SAMPLE_BYTES), (MiB - SAMPLE_BYTES, MiB)]
    random_spots = bytearray(MiB)
    for a, b in spots:
        random_spots[a:b] = os.urandom(b - a)
    frame = repo.store._compress(random_spots)
    assert "fastest" in _levels(repo)
    assert zstandard.ZstdDecompressor().decompress(frame) == random_spots

    fresh = Repository.open(repo.location)
    quiet_spots = bytearray(os.urandom(MiB))
    for a, b in spots:
        quiet_spots[a:b] = bytes(b - a)
    fresh.store._compress(quiet_spots)
    assert "fastest" not in _levels(fresh)


def test_small_chunks_are_not_sampled(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "small", chunk_size=64 * 1024)
    data = os.urandom(3 * SAMPLE_BYTES)
    assert zstandard.ZstdDecompressor().decompress(repo.store._compress(data)) == data
    assert _levels(repo) == {"repository"}


def test_a_backup_of_random_and_compressible_disks_restores_bit_exact(repo: Repository, tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(2 * MiB) + (b"text " * MiB)[: 2 * MiB])
    point = backup_vm(repo, "vm1", [src("disk0", disk.read_bytes())])
    assert repo.open_disk(point, "disk0").read(0, 4 * MiB) == disk.read_bytes()
