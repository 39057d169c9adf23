"""Hostile review of pack objects (docs/repository-format.md, "Pack objects"): ways a backup or a garbage
collection could lose a live chunk, each a test that fails while the flaw is there."""

from __future__ import annotations

import random
import secrets
import shutil
from pathlib import Path

import pytest

from appliance.ingest.backup import backup_vm
from appliance.repo import Repository
from appliance.repo.maintenance import collect_garbage
from appliance.repo.packindex import PackRecord, encode_index, index_key
from tests.unit.packs_support import CS, disk, files, records, restore, src


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", chunk_size=CS, packs=True)


def test_long_lived_process_never_dedups_against_a_pack_another_process_collected(repo: Repository) -> None:
    """The daemon or the page keeps one Repository: it backs up, a garbage collection in another process then
    deletes the (dead) pack and its index, and the same Repository backs up the same data again. Its IndexSet
    only adds new index objects on ``refresh``, so it still holds the deleted index's records: the second
    backup must not deduplicate against them, or its point names chunks that no longer exist."""
    data = disk(8, seed=100)
    first = backup_vm(repo, "vm", [src(data)])
    assert restore(repo, first, len(data)) == bytes(data)  # the process serves it: its indexes are loaded
    other = Repository.open(repo.path)  # another process
    other.delete_point(first)
    collect_garbage(other)
    assert files(repo, "packs") == [] and files(repo, "index") == []
    second = backup_vm(repo, "vm", [src(data)])  # the long-lived process again
    assert restore(Repository.open(repo.path), second, len(data)) == bytes(data)


def test_backup_stores_again_a_chunk_whose_pack_is_missing(repo: Repository) -> None:
    """A loose chunk that went missing is stored again by the next backup (``has`` asks the store). A pack that
    went missing (lost, or an index made durable before its pack by a crash) was deduplicated against until a
    garbage collection: every later backup of the same data named chunks that do not exist."""
    data = disk(8, seed=101)
    backup_vm(repo, "vm", [src(data)])
    for p in files(repo, "packs"):
        p.unlink()
    second = backup_vm(Repository.open(repo.path), "vm2", [src(data)])
    assert second.stats["chunks_new"] == 6
    collect_garbage(Repository.open(repo.path))  # drops the records of the lost pack
    assert restore(Repository.open(repo.path), second, len(data)) == bytes(data)


def test_reader_finds_the_copy_stored_again_when_the_first_record_names_a_lost_pack(repo: Repository) -> None:
    """As above, before any garbage collection: two index objects name the chunk, the first listed in a lost
    pack, the other in the new backup's pack. The reader keeps only the first record, rebuilds, keeps it
    again, and reports the chunk missing although a good copy is stored (until a collection drops the record)."""
    data = disk(8, seed=104)
    backup_vm(repo, "vm", [src(data)])
    for p in files(repo, "packs"):
        p.unlink()
    (first_index,) = files(repo, "index")
    second = backup_vm(Repository.open(repo.path), "vm2", [src(data)])
    (new_index,) = set(files(repo, "index")) - {first_index}
    last = repo.path / index_key("f" * 32, 0)  # a plain repository: the name is no associated data
    new_index.rename(last)
    assert first_index.name < last.name
    assert restore(Repository.open(repo.path), second, len(data)) == bytes(data)


def test_gc_never_deletes_the_only_intact_copy_of_a_live_chunk(repo: Repository) -> None:
    """Two records of one live chunk (two backups that raced on S3, or an added index in a plain repository)
    in two packs; the copy whose index lists first is damaged. The collection kept the first record unchecked
    and deleted the other pack as wholly dead, the only intact copy; it must keep a copy that checks."""
    data = disk(8, seed=102)
    point = backup_vm(repo, "vm", [src(data)])
    (pack_a,) = files(repo, "packs")
    (index_a,) = files(repo, "index")
    recs = records(repo, index_a)
    # A second copy of the same pack under another id, named by an index that lists after the first.
    pack_b_id = secrets.token_bytes(16)
    copy = [PackRecord(r.chunk, pack_b_id, r.offset, r.length) for r in recs]
    pack_b = repo.path / copy[0].pack_key
    pack_b.parent.mkdir(exist_ok=True)
    shutil.copyfile(pack_a, pack_b)
    key_b = index_key("f" * 32, 0)
    assert key_b > index_a.relative_to(repo.path).as_posix()
    (repo.path / key_b).write_bytes(encode_index(copy, repo.store.envelope, key_b))
    victim = recs[2]
    intact = pack_a.read_bytes()[victim.offset : victim.offset + victim.length]
    pack_a.chmod(0o600)
    blob = bytearray(pack_a.read_bytes())
    blob[victim.offset + victim.length - 3] ^= 0x40  # the first-listed copy goes bad (bit rot)
    pack_a.write_bytes(bytes(blob))
    collect_garbage(Repository.open(repo.path))
    assert any(intact in p.read_bytes() for p in files(repo, "packs")), "the intact copy was deleted"
    where = point.disks[0].chunks.index(victim.chunk.hex())
    fresh = Repository.open(repo.path)
    assert fresh.open_disk(point, "d").read(where * CS, CS) == bytes(data[where * CS : (where + 1) * CS])


def test_loading_many_index_objects_costs_linear_work(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """One index object per backup until a collection consolidates them: a year of daily backups, or an attacker
    who can add objects, means hundreds. Each ``PackIndex.add`` rewrites the whole merged file, so loading K
    objects of n records writes ~K^2 n / 2 records (measured: 400 objects of 1000 records, 25 s) and the first
    read of the daemon waits for all of it under the IndexSet lock."""
    from appliance.repo import packindex
    from appliance.repo.packs import write_indexes

    rng = random.Random(103)
    objects, per = 40, 200
    for k in range(objects):
        recs = [PackRecord(rng.randbytes(32), rng.randbytes(16), 0, 100) for _ in range(per)]
        write_indexes(recs, repo.store.envelope, repo.backend.put, writer=f"w{k:03d}")
    written = []
    real_merge = packindex._merge

    def counted(old, new, out):  # noqa: ANN001, ANN202
        written.append(real_merge(old, new, out))
        return written[-1]

    monkeypatch.setattr(packindex, "_merge", counted)
    fresh = Repository.open(repo.path)
    assert fresh.store.indexes.find(rng.randbytes(32), reload=False) is None
    assert len(fresh.store.indexes.keys()) == objects
    assert sum(written) <= 4 * objects * per, f"{sum(written)} records written to load {objects * per}"


def test_gc_after_a_crash_reads_no_chunk_named_twice_at_the_same_place(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A collection that crashed after writing its new index leaves every live chunk named twice, at the same
    place: the next one has no copy to choose between, so it must not read the whole repository to check."""
    data = disk(8, seed=105)
    point = backup_vm(repo, "vm", [src(data)])
    (index,) = files(repo, "index")
    key = index_key("f" * 32, 0)
    (repo.path / key).write_bytes(encode_index(records(repo, index), repo.store.envelope, key))
    gc_repo = Repository.open(repo.path)
    reads = []
    real = gc_repo.store.read_packed
    monkeypatch.setattr(gc_repo.store, "read_packed", lambda rec, name: reads.append(rec) or real(rec, name))
    collect_garbage(gc_repo)
    assert reads == [] and len(files(repo, "index")) == 1
    assert restore(Repository.open(repo.path), point, len(data)) == bytes(data)
