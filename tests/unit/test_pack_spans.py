"""A sequential reader of a packed repository on a remote store reads ahead by runs of a pack: one ranged read
for many chunks, each still checked alone; a damaged chunk in a run fails only its own reads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from appliance.errors import IntegrityError
from appliance.ingest.backup import backup_vm
from appliance.repo import Repository
from appliance.repo.packindex import PackRecord
from appliance.repo.prefetch import Prefetch
from appliance.repo.readcache import ReadCache
from appliance.repo.reader import DiskReader
from tests.unit.packs_support import CS, disk, records, src


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", chunk_size=CS, packs=True)


def remote_reader(
    repo: Repository,
    point,  # noqa: ANN001 - a RestorePoint
    monkeypatch: pytest.MonkeyPatch,
    read_cache: ReadCache | None = None,
) -> tuple[DiskReader, list[tuple[int, int]]]:
    """A reader in a new process's view of ``repo`` whose directory store says it is remote (as S3 does), and
    the ranged reads it makes."""
    fresh = Repository.open(repo.path)
    reads: list[tuple[int, int]] = []
    real = fresh.backend.read_range

    def counted(key: str, start: int, end: int, name: str) -> tuple[bytes, int]:
        reads.append((start, end))
        return real(key, start, end, name)

    monkeypatch.setattr(fresh.backend, "read_range", counted)
    monkeypatch.setattr(fresh.backend, "remote", True)
    reader = fresh.open_disk(point, "d", read_cache)
    # Its own read-ahead threads: the module's shared pool may still be busy with an earlier test's requests to a
    # stopped gateway (the whole suite runs in one process), and these tests count requests, not throughput.
    own = ThreadPoolExecutor(4, thread_name_prefix="test-read-ahead")
    monkeypatch.setattr(reader, "_pool", own)
    return reader, reads


def damage(repo: Repository, cid: str) -> PackRecord:
    """Flip one byte in the middle of chunk ``cid``'s object in its pack; its index record."""
    bad = next(r for r in records(repo) if r.chunk.hex() == cid)
    pack = repo.path / bad.pack_key
    blob = bytearray(pack.read_bytes())
    blob[bad.offset + bad.length // 2] ^= 1
    pack.write_bytes(bytes(blob))
    return bad


def test_sequential_read_fetches_runs_of_a_pack(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    data = disk(96, seed=1)
    point = backup_vm(repo, "vm", [src(data)], workers=16)  # a remote store's backup: chunks stored out of order
    stored = sum(1 for c in point.disks[0].chunks if c)
    reader, reads = remote_reader(repo, point, monkeypatch)
    assert b"".join(reader.read(off, CS) for off in range(0, len(data), CS)) == bytes(data)
    assert len(reads) <= stored // 4, f"{len(reads)} ranged reads for {stored} chunks"
    assert max(end - start + 1 for start, end in reads) > 8 * CS


def test_a_damaged_chunk_in_a_run_fails_only_its_own_reads(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    data = disk(48, seed=2)
    point = backup_vm(repo, "vm", [src(data)])
    bad = damage(repo, point.disks[0].chunks[21])
    reader, reads = remote_reader(repo, point, monkeypatch)
    for index in range(48):
        if index == 21:
            with pytest.raises(IntegrityError, match=f"chunk {bad.chunk.hex()}"):
                reader.read(index * CS, CS)
        else:
            assert reader.read(index * CS, CS) == bytes(data[index * CS : (index + 1) * CS]), index
    assert len(reads) < 36 - 2  # still read by runs


def _warm(reader: DiskReader) -> Prefetch:
    warm = Prefetch(reader).start()
    warm._thread.join(30)
    assert not warm.running
    return warm


def test_prefetch_warms_a_disk_by_runs_of_a_pack(
    repo: Repository, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = disk(96, seed=4)
    point = backup_vm(repo, "vm", [src(data)], workers=16)
    stored = sum(1 for c in point.disks[0].chunks if c)
    reader, reads = remote_reader(repo, point, monkeypatch, ReadCache(tmp_path / "rc", 1 << 30))
    reader.read(5 * CS, CS)  # the VM read one already
    warm = _warm(reader)
    assert warm.status() == {"disk": "d", "chunks": stored, "done": stored, "failed": 0}
    assert all(reader.hydrated.has(i) for i in range(96))
    assert len(reads) <= stored // 4, f"{len(reads)} ranged reads for {stored} chunks"
    reads.clear()
    assert b"".join(reader.read(off, CS) for off in range(0, len(data), CS)) == bytes(data)
    assert reads == []  # all of it local now


def test_prefetch_counts_a_damaged_chunk_and_stores_the_rest(
    repo: Repository, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = disk(48, seed=5)
    point = backup_vm(repo, "vm", [src(data)])
    bad = damage(repo, point.disks[0].chunks[21])
    reader, _ = remote_reader(repo, point, monkeypatch, ReadCache(tmp_path / "rc", 1 << 30))
    warm = _warm(reader)
    stored = sum(1 for c in point.disks[0].chunks if c)
    assert (warm.done, warm.failed) == (stored - 1, 1)
    assert not reader.hydrated.has(21)
    assert all(reader.hydrated.has(i) for i in range(48) if i != 21)
    with pytest.raises(IntegrityError, match=f"chunk {bad.chunk.hex()}"):
        reader.read(21 * CS, CS)


def test_prefetch_of_compressible_chunks_in_long_runs(
    repo: Repository, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Chunks that compress well lie many to a run: more than the chunks it holds in memory at once."""
    monkeypatch.setattr("appliance.repo.prefetch.IN_FLIGHT_BYTES", 8 * CS)
    data = bytearray(b"".join(bytes([n % 251 + 1]) * 100 + bytes(CS - 100) for n in range(200)))
    point = backup_vm(repo, "vm", [src(data)])
    reader, reads = remote_reader(repo, point, monkeypatch, ReadCache(tmp_path / "rc", 1 << 30))
    warm = _warm(reader)
    assert (warm.done, warm.failed) == (200, 0)
    assert len(reads) <= 200 // 8 + 1
    assert b"".join(reader.read(off, CS) for off in range(0, len(data), CS)) == bytes(data)


def test_prefetch_hydrates_a_chunk_that_the_disk_holds_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``runs`` fetches a chunk that appears twice in a slice once (right for read-ahead: both readers wait on the
    chunk cache); a prefetch, which stores by disk position, then never hydrates the second position nor counts
    it, so ``done`` never reaches ``chunks``."""
    repo = Repository.init(tmp_path / "repo", chunk_size=CS, packs=True)
    data = disk(48, seed=7)
    data[9 * CS : 10 * CS] = data[5 * CS : 6 * CS]  # chunk 9 is chunk 5 again
    point = backup_vm(repo, "vm", [src(data)])
    chunks = point.disks[0].chunks
    assert chunks[5] == chunks[9] is not None
    stored = sum(1 for c in chunks if c)
    reader, _ = remote_reader(repo, point, monkeypatch, ReadCache(tmp_path / "rc", 1 << 30))
    warm = _warm(reader)
    assert reader.hydrated.has(5)
    assert reader.hydrated.has(9), "the second position of a chunk the disk holds twice is never hydrated"
    assert warm.status() == {"disk": "d", "chunks": stored, "done": stored, "failed": 0}
