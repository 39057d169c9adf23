"""Pack objects in a local repository: layout, dedup through indexes, damage, and garbage collection that
survives a crash at every step (docs/repository-format.md, "Pack objects")."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from appliance.errors import IntegrityError, UnsupportedFormatError
from appliance.ingest.backup import backup_vm
from appliance.ingest.sources import DiskSource
from appliance.repo import Repository, packgc, repository
from appliance.repo.keys import KeySource
from appliance.repo.maintenance import collect_garbage, prune, verify
from appliance.repo.packindex import PackRecord
from tests.unit.packs_support import CS, disk, files, records, restore, src

MARKER = b"PACKS-PLAINTEXT-MARKER-0123456789"


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", chunk_size=CS, packs=True)


def test_backup_writes_packs_and_one_index_and_restores(repo: Repository) -> None:
    data = disk(40, seed=1)
    point = backup_vm(repo, "vm", [src(data)])
    assert json.loads((repo.path / "config.json").read_text())["features"] == ["packs"]
    assert files(repo, "chunks") == []
    assert len(files(repo, "index")) == 1
    stored = {c for c in point.disks[0].chunks if c is not None}
    recs = records(repo)
    assert {r.chunk.hex() for r in recs} == stored and len(recs) == len(stored) == 30
    # 30 objects of ~64 KiB: one pack, each record inside it
    packs = files(repo, "packs")
    assert len(packs) == 1 and all(r.offset + r.length <= packs[0].stat().st_size for r in recs)
    assert Repository.open(repo.path).open_disk(point, "d").read(0, len(data)) == bytes(data)
    assert verify(repo).ok


def test_dedup_through_indexes_stores_only_new_chunks(repo: Repository) -> None:
    data = disk(32, seed=2)
    backup_vm(repo, "vm", [src(data)])
    data[5 * CS + 7] ^= 1
    data[30 * CS] ^= 1
    second = backup_vm(Repository.open(repo.path), "vm", [src(data)])  # a new process: dedup from the indexes
    assert second.stats["chunks_new"] == 2
    assert len(files(repo, "index")) == 2 and len(records(repo)) == 24 + 2
    assert restore(repo, second, len(data)) == bytes(data)


def test_large_backup_fills_several_packs(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("appliance.repo.packs.PACK_TARGET", 5 * CS)
    data = disk(64, seed=3)
    point = backup_vm(repo, "vm", [src(data)])
    assert len(files(repo, "packs")) >= 9
    assert restore(repo, point, len(data)) == bytes(data)


def test_older_bootback_refuses_a_packed_repository(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repository, "KNOWN_FEATURES", frozenset({repository.ENCRYPTION_FEATURE}))
    with pytest.raises(UnsupportedFormatError, match="packs"):
        Repository.open(repo.path)


def _corrupt(path: Path, offset: int) -> None:
    path.chmod(0o600)
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x40
    path.write_bytes(bytes(blob))


def test_damaged_pack_byte_is_an_integrity_error_naming_the_chunk(repo: Repository) -> None:
    data = disk(8, seed=4)
    point = backup_vm(repo, "vm", [src(data)])
    rec = records(repo)[3]
    _corrupt(repo.path / rec.pack_key, rec.offset + rec.length // 2)
    where = point.disks[0].chunks.index(rec.chunk.hex())
    with pytest.raises(IntegrityError, match=f"chunk {rec.chunk.hex()}"):
        Repository.open(repo.path).open_disk(point, "d").read(where * CS, 1)
    report = verify(Repository.open(repo.path))
    assert list(report.bad_chunks) == [rec.chunk.hex()] and list(report.damaged_points) == [point.ref]


def test_index_pointing_elsewhere_never_gives_wrong_bytes(repo: Repository) -> None:
    """An index is a hint: a record naming another chunk's object (a forged or mixed-up index) fails the check."""
    data = disk(8, seed=5)
    point = backup_vm(repo, "vm", [src(data)])
    recs = sorted(records(repo), key=lambda r: r.offset)
    a, b = recs[0], recs[1]
    forged = PackRecord(a.chunk, b.pack, b.offset, b.length)
    idx = files(repo, "index")[0]
    key = idx.relative_to(repo.path).as_posix()
    from appliance.repo.packindex import encode_index

    others = [r for r in records(repo) if r.chunk != a.chunk]
    idx.chmod(0o600)
    idx.write_bytes(encode_index([forged, *others], repo.store.envelope, key))
    fresh = Repository.open(repo.path)
    with pytest.raises(IntegrityError, match=f"chunk {a.chunk.hex()}.*does not match its hash"):
        fresh.store.get(a.chunk.hex())
    where = point.disks[0].chunks.index(b.chunk.hex())
    assert fresh.open_disk(point, "d").read(where * CS, CS) == bytes(data[where * CS : (where + 1) * CS])


def test_missing_pack_is_an_integrity_error(repo: Repository) -> None:
    point = backup_vm(repo, "vm", [src(disk(8, seed=6))])
    rec = records(repo)[0]
    (repo.path / rec.pack_key).unlink()
    with pytest.raises(IntegrityError, match=f"chunk {rec.chunk.hex()} is missing"):
        Repository.open(repo.path).store.get(rec.chunk.hex(), point.ref)


def test_truncated_pack_is_an_integrity_error(repo: Repository) -> None:
    backup_vm(repo, "vm", [src(disk(8, seed=6))])
    last = max(records(repo), key=lambda r: r.offset)
    path = repo.path / last.pack_key
    path.chmod(0o600)
    path.write_bytes(path.read_bytes()[: last.offset + 10])
    with pytest.raises(IntegrityError, match="places it at bytes"):
        Repository.open(repo.path).store.get(last.chunk.hex())


def test_a_reader_finds_chunks_of_a_later_backup(repo: Repository) -> None:
    """The daemon opened the repository before a backup another process made: a miss reloads the indexes."""
    reader = Repository.open(repo.path)
    backup_vm(repo, "vm", [src(disk(4, seed=7))])
    reader.list_points()
    assert len(reader.store.indexes.keys()) == 1
    second = backup_vm(Repository.open(repo.path), "vm2", [src(disk(4, seed=8))])
    assert restore(reader, second, 4 * CS) == bytes(disk(4, seed=8))


def test_encrypted_packs_hold_no_plaintext_and_detect_tampering(tmp_path: Path) -> None:
    src_key = KeySource(passphrase="correct horse battery staple")
    repo = Repository.init(tmp_path / "r", chunk_size=CS, encryption="aes-256-gcm", key_source=src_key, packs=True)
    data = disk(8, seed=9)
    for i in range(1, 8):
        data[i * CS + 100 : i * CS + 100 + len(MARKER)] = MARKER
    point = backup_vm(repo, "vm", [src(data)])
    for f in files(repo, "packs") + files(repo, "index"):
        assert MARKER not in f.read_bytes()
    assert restore(repo, point, len(data)) == bytes(data)
    idx = files(repo, "index")[0]
    _corrupt(idx, 40)
    fresh = Repository.open(tmp_path / "r", src_key)
    with pytest.raises(IntegrityError, match=f"{idx.name}.*authentication failed"):
        fresh.store.get(point.disks[0].chunks[1])


# --- garbage collection --------------------------------------------------------------------------------


def _three_generations(repo: Repository) -> tuple[list, list[bytearray]]:
    datas, points = [], []
    for seed in range(3):
        data = disk(24, seed=20 + seed)
        if seed:
            data[: 8 * CS] = datas[0][: 8 * CS]  # a third of each shares the first's chunks
        datas.append(data)
        points.append(backup_vm(repo, "vm", [src(data)]))
    return points, datas


def test_prune_deletes_dead_packs_and_consolidates_indexes(repo: Repository) -> None:
    points, datas = _three_generations(repo)
    other = backup_vm(repo, "other", [src(datas[0])])  # keeps the first's chunks alive
    before_packs = set(files(repo, "packs"))
    report = prune(repo, "vm", keep=1)
    assert report.deleted_chunks > 0 and report.freed_bytes > 0
    after = set(files(repo, "packs"))
    assert after < before_packs  # the second backup's pack is wholly dead
    assert len(files(repo, "index")) == 1  # consolidated
    fresh = Repository.open(repo.path)
    assert restore(fresh, points[2], len(datas[2])) == bytes(datas[2])
    assert restore(fresh, other, len(datas[0])) == bytes(datas[0])
    assert verify(fresh).ok
    live = {c for p in (points[2], other) for c in p.disks[0].chunks if c}
    assert {r.chunk.hex() for r in records(repo)} == live


def test_mostly_dead_pack_is_repacked(repo: Repository) -> None:
    first = backup_vm(repo, "vm", [src(disk(24, seed=30))])
    keep_data = disk(24, seed=30)
    keep_data[4 * CS :] = disk(24, seed=31)[4 * CS :]  # shares only chunks 1-3 with the first
    kept = backup_vm(repo, "keep", [src(keep_data)])
    only_first = {c for c in first.disks[0].chunks if c} - set(kept.disks[0].chunks)
    old_pack = repo.path / next(r.pack_key for r in records(repo) if r.chunk.hex() in only_first)
    prune(repo, "vm", keep=1)  # nothing deleted yet: one point of vm
    repo.delete_point(first)
    deleted, freed = collect_garbage(repo)
    assert deleted == 15 and freed > 0  # 18 stored chunks in the first, 3 still needed
    assert not old_pack.exists()  # 3 of 18 objects live: copied into a new pack, the old one deleted
    assert restore(Repository.open(repo.path), kept, len(keep_data)) == bytes(keep_data)
    assert verify(Repository.open(repo.path)).ok


def test_crashed_backup_leaves_packs_no_index_names_and_gc_removes_them(repo: Repository) -> None:
    from appliance.errors import SourceError

    short = DiskSource(name="d", size=30 * CS, format="raw", stream=io.BytesIO(bytes(disk(20, seed=40))))
    with pytest.raises(SourceError):
        backup_vm(repo, "vm", [short])
    assert repo.restore_points() == [] and files(repo, "index") == []
    collect_garbage(repo)
    assert files(repo, "packs") == []


@pytest.mark.parametrize("crash_at", range(1, 12))
def test_gc_crash_at_any_step_loses_nothing(repo: Repository, monkeypatch: pytest.MonkeyPatch, crash_at: int) -> None:
    """A power cut or kill between any two writes or deletes of a collection: every remaining point reads
    back whole, and a second collection finishes the job."""
    points, datas = _three_generations(repo)
    keep_data = bytearray(datas[1])
    keep_data[12 * CS :] = disk(24, seed=50)[12 * CS :]
    keeper = backup_vm(repo, "keep", [src(keep_data)])  # makes the second backup's pack partly live: a repack
    repo.delete_point(points[0])
    repo.delete_point(points[1])
    calls = {"n": 0}
    backend = repo.backend
    real_put, real_delete = backend.put, backend.delete

    def counted(real):  # noqa: ANN001, ANN202
        def step(*args):  # noqa: ANN002, ANN202
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise OSError("power cut")
            return real(*args)

        return step

    monkeypatch.setattr(backend, "put", counted(real_put))
    monkeypatch.setattr(backend, "delete", counted(real_delete))
    try:
        collect_garbage(repo)
        crashed = False
    except OSError:
        crashed = True
    monkeypatch.undo()
    fresh = Repository.open(repo.path)
    assert restore(fresh, points[2], len(datas[2])) == bytes(datas[2])
    assert restore(fresh, keeper, len(keep_data)) == bytes(keep_data)
    collect_garbage(fresh)
    again = Repository.open(repo.path)
    assert verify(again).ok
    assert restore(again, keeper, len(keep_data)) == bytes(keep_data)
    live = {c for p in (points[2], keeper) for c in p.disks[0].chunks if c}
    assert {r.chunk.hex() for r in records(repo)} == live
    if crash_at == 1:
        assert crashed  # the injection did fire: the first step is a write


def test_repack_leaves_a_pack_with_a_damaged_live_chunk_whole(repo: Repository) -> None:
    first = backup_vm(repo, "vm", [src(disk(24, seed=60))])
    keep_data = disk(24, seed=60)
    keep_data[4 * CS :] = disk(24, seed=61)[4 * CS :]
    keeper = backup_vm(repo, "keep", [src(keep_data)])
    shared = next(c for c in first.disks[0].chunks[1:4] if c)
    rec = next(r for r in records(repo) if r.chunk.hex() == shared)
    _corrupt(repo.path / rec.pack_key, rec.offset + rec.length - 3)
    repo.delete_point(first)
    live = {c for c in keeper.disks[0].chunks if c}
    with repo.exclusive():
        report = packgc.collect_packs(repo, live, float("inf"))
    assert report.kept_damaged == [rec.pack_key] and report.repacked_packs == 0
    assert (repo.path / rec.pack_key).exists()
    fresh = Repository.open(repo.path)
    with pytest.raises(IntegrityError, match=f"chunk {shared}"):
        fresh.store.get(shared)
    assert verify(fresh).bad_chunks.keys() == {shared}


def test_young_index_keeps_every_pack_it_names(repo: Repository) -> None:
    """An index younger than the grace period may belong to an S3 writer whose lease the collector cannot see,
    about to commit its point: its packs stay, even older ones and even though no point needs them yet."""
    import os
    import time

    kept = backup_vm(repo, "kept", [src(disk(8, seed=70))])
    first_index = files(repo, "index")[0]
    late = backup_vm(repo, "late", [src(disk(8, seed=71))])
    repo.delete_point(late)  # as if its point were not committed yet
    (late_index,) = set(files(repo, "index")) - {first_index}
    now = time.time()
    for f in [*files(repo, "packs"), first_index]:
        os.utime(f, (now - 7200, now - 7200))  # every pack is old
    os.utime(late_index, (now, now))
    live = {c for c in kept.disks[0].chunks if c}
    late_chunk = next(c for c in late.disks[0].chunks if c)
    with repo.exclusive():
        packgc.collect_packs(repo, live, before=now - 3600)
    assert Repository.open(repo.path).store.get(late_chunk) == bytes(disk(8, seed=71)[CS : 2 * CS])
    with repo.exclusive():
        packgc.collect_packs(repo, live, before=float("inf"))  # once old, it is garbage
    with pytest.raises(IntegrityError, match="missing"):
        Repository.open(repo.path).store.get(late_chunk)
    assert restore(Repository.open(repo.path), kept, 8 * CS) == bytes(disk(8, seed=70))


def test_a_reader_follows_chunks_a_repack_moved(repo: Repository) -> None:
    """The daemon read a point, then a garbage collection in another process repacked its chunks: the next read
    of the moved chunk finds the new pack (the old one is gone)."""
    first = backup_vm(repo, "vm", [src(disk(24, seed=80))])
    keep_data = disk(24, seed=80)
    keep_data[4 * CS :] = disk(24, seed=81)[4 * CS :]
    kept = backup_vm(repo, "keep", [src(keep_data)])
    reader = Repository.open(repo.path)
    assert restore(reader, kept, 2 * CS) == bytes(keep_data[: 2 * CS])  # chunk 1: the reader loads the indexes
    reader.chunk_cache.clear()
    old_packs = set(files(repo, "packs"))
    repo.delete_point(first)
    collect_garbage(Repository.open(repo.path))
    assert old_packs - set(files(repo, "packs"))  # the first backup's pack was repacked away
    assert restore(reader, kept, len(keep_data)) == bytes(keep_data)


def test_a_stray_object_named_almost_like_a_pack_is_ignored(repo: Repository) -> None:
    """A reader whose pack is gone lists packs/ to rebuild its index: a stray there (a name of the right shape
    but not hex) is passed over, never a crash, and garbage collection leaves it alone."""
    point = backup_vm(repo, "vm", [src(disk(8, seed=90))])
    stray = repo.path / "packs" / "zz" / ("zz" + "z" * 30)
    stray.parent.mkdir()
    stray.write_bytes(b"not a pack")
    reader = Repository.open(repo.path)
    rec = records(repo)[0]
    assert reader.store.get(rec.chunk.hex()) is not None  # the indexes are loaded
    (repo.path / rec.pack_key).unlink()
    with pytest.raises(IntegrityError, match=f"chunk {rec.chunk.hex()} is missing"):
        reader.store.get(rec.chunk.hex(), point.ref)
    collect_garbage(Repository.open(repo.path))
    assert stray.exists()
