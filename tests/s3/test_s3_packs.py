"""Pack objects on S3 (docs/repository-format.md, "Pack objects") against the real Ceph RADOS Gateway: garbage
collection deletes and repacks packs and every point left stays bit-exact; a reader opened earlier finds what
later backups and repacks wrote; a pack cut short in the bucket is an error naming the chunk; a restore reads
chunks by ranged GETs, not whole packs. The gateway's own counters say what reached it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from appliance.errors import IntegrityError
from appliance.repo import Repository
from tests.daemon_process import bootback
from tests.s3 import packed

MiB = 1 << 20


def _disk(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _packs(rgw, location: str) -> set[str]:  # noqa: ANN001
    bucket, root = packed.split(location)
    pages = rgw.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{root}/packs/")
    return {o["Key"][len(root) + 1 :] for page in pages for o in page.get("Contents", [])}


def _restore(location: str, ref: str, out: Path) -> bytes:
    bootback("restore", location, ref, "-o", out)
    return out.read_bytes()


@pytest.fixture
def no_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Garbage collection may take what the test just wrote (the CLI processes inherit it)."""
    monkeypatch.setenv("BOOTBACK_S3_GC_GRACE_SECONDS", "0")


def test_prune_deletes_dead_packs_repacks_sparse_ones_and_every_point_stays_bit_exact(
    rgw, s3_repo: str, tmp_path: Path, no_grace: None
) -> None:
    a0, a1, a2 = (os.urandom(4 * MiB) for _ in range(3))
    b = a1[:MiB] + os.urandom(MiB)  # keeps one of a1's four chunks alive
    bootback("init", s3_repo)
    for vm, data in (("a", a0), ("a", a1), ("a", a2), ("b", b)):
        bootback("backup", s3_repo, "--vm", vm, _disk(tmp_path, f"{vm}.raw", data))
    repo = Repository.open(s3_repo)
    where = packed.records(repo)
    chunks = {vm: repo.restore_point(vm).disks[0].chunks for vm in ("a", "b")}
    dead_pack = where[repo.store.chunk_id(a0[:MiB])].pack_key  # a0's: all of it dies
    sparse_pack = where[chunks["b"][0]].pack_key  # a1's: three of its four chunks die
    kept = {where[c].pack_key for c in chunks["a"]} | {where[chunks["b"][1]].pack_key}
    before = _packs(rgw, s3_repo)
    assert len(before) == 4 and {dead_pack, sparse_pack} | kept == before

    report = json.loads(bootback("prune", s3_repo, "--vm", "a", "--keep", "1", "--json").stdout)
    assert len(report["deleted_points"]) == 2 and report["deleted_chunks"] == 4 + 3, report
    after = _packs(rgw, s3_repo)
    assert dead_pack not in after and sparse_pack not in after and kept <= after
    (repacked,) = after - kept  # b's first chunk, copied out of the sparse pack
    where = packed.records(Repository.open(s3_repo))
    assert len(where) == 4 + 2 and where[chunks["b"][0]].pack_key == repacked  # the old records are gone
    assert _restore(s3_repo, "a", tmp_path / "a.out") == a2
    assert _restore(s3_repo, "b", tmp_path / "b.out") == b
    assert "repository OK" in bootback("verify", s3_repo).stdout


def test_a_reader_opened_before_reads_a_later_backups_point(rgw, s3_repo: str, tmp_path: Path) -> None:
    first, later = os.urandom(2 * MiB), os.urandom(2 * MiB)
    bootback("init", s3_repo)
    bootback("backup", s3_repo, "--vm", "first", _disk(tmp_path, "first.raw", first))
    repo = Repository.open(s3_repo)
    assert repo.open_disk(repo.restore_point("first"), "first.raw").read(0, 2 * MiB) == first  # indexes loaded
    bootback("backup", s3_repo, "--vm", "later", _disk(tmp_path, "later.raw", later))
    reader = repo.open_disk(repo.restore_point("later"), "later.raw")
    assert reader.read(0, 2 * MiB) == later  # its chunks are in an index written after the reader loaded them


def test_a_pack_repacked_after_the_reader_loaded_the_indexes_is_found_again(
    rgw, s3_repo: str, tmp_path: Path, no_grace: None
) -> None:
    x, y = os.urandom(4 * MiB), os.urandom(MiB)
    b = x[:MiB] + os.urandom(MiB)
    bootback("init", s3_repo)
    bootback("backup", s3_repo, "--vm", "a", _disk(tmp_path, "x.raw", x))
    bootback("backup", s3_repo, "--vm", "b", _disk(tmp_path, "b.raw", b))
    bootback("backup", s3_repo, "--vm", "a", _disk(tmp_path, "y.raw", y))
    repo = Repository.open(s3_repo)
    reader = repo.open_disk(repo.restore_point("b"), "b.raw")
    assert reader.read(MiB, MiB) == b[MiB:]  # the indexes are loaded; b's first chunk is not read yet
    moved = packed.records(repo)[repo.restore_point("b").disks[0].chunks[0]].pack_key
    report = json.loads(bootback("prune", s3_repo, "--vm", "a", "--keep", "1", "--json").stdout)
    assert report["deleted_chunks"] == 3 and moved not in _packs(rgw, s3_repo)  # repacked: gone from there
    assert reader.read(0, MiB) == b[:MiB]


def test_a_pack_cut_short_in_the_bucket_is_an_integrity_error_naming_the_chunk(
    rgw, s3_repo: str, tmp_path: Path
) -> None:
    bootback("init", s3_repo)
    bootback("backup", s3_repo, "--vm", "vm1", _disk(tmp_path, "d.raw", os.urandom(3 * MiB)))
    repo = Repository.open(s3_repo)
    on_disk = repo.restore_point("vm1").disks[0].chunks
    where = packed.records(repo)
    first, short, beyond = sorted(on_disk, key=lambda c: where[c].offset)  # stored as their uploads finished
    bucket, root = packed.split(s3_repo)
    client = rgw.client()
    key = f"{root}/{where[short].pack_key}"
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    cut = where[short].offset + where[short].length // 2  # the second chunk cut in half, the third gone whole
    client.put_object(Bucket=bucket, Key=key, Body=body[:cut])

    repo = Repository.open(s3_repo)
    reader = repo.open_disk(repo.restore_point("vm1"), "d.raw")
    with pytest.raises(IntegrityError, match=f"chunk {short}.*of {where[short].pack_key}, which holds {cut} bytes"):
        reader.read(on_disk.index(short) * MiB, 4096)
    with pytest.raises(IntegrityError, match=f"chunk {beyond}.*of {where[beyond].pack_key}"):
        reader.read(on_disk.index(beyond) * MiB, 4096)  # an empty answer (416): all of it lies past the end
    assert len(reader.read(on_disk.index(first) * MiB, 4096)) == 4096  # the chunk before the cut still reads
    p = bootback("restore", s3_repo, "vm1", "-o", tmp_path / "out.raw", ok=False)
    # the first damaged chunk in the disk's order is named: which of the two that is depends on upload order
    assert p.returncode == 15 and (short in p.stderr or beyond in p.stderr), p.stderr
    assert not (tmp_path / "out.raw").exists()


def test_a_restore_reads_runs_of_chunks_by_ranged_gets(rgw, s3_repo: str, tmp_path: Path) -> None:
    chunks = 20
    data = os.urandom(chunks * MiB)
    bootback("init", s3_repo)
    bootback("backup", s3_repo, "--vm", "big", _disk(tmp_path, "big.raw", data))
    bucket, root = packed.split(s3_repo)
    sizes = [rgw.client().head_object(Bucket=bucket, Key=f"{root}/{k}")["ContentLength"] for k in _packs(rgw, s3_repo)]
    assert len(sizes) == 2 and sum(sizes) >= chunks * MiB  # 16 chunks fill one pack, 4 the next
    before = rgw.counters()
    assert _restore(s3_repo, "big", tmp_path / "out.raw") == data
    after = rgw.counters()
    gets, got = after["get"] - before["get"], after["get_b"] - before["get_b"]
    # runs of chunks close together in a pack, one ranged GET each (plus config, point and index): far fewer
    # requests than chunks, and about the packs' bytes once (a whole pack per chunk would be 16 MiB each)
    assert 2 <= gets <= chunks // 2, gets
    assert sum(sizes) <= got < sum(sizes) + 4 * MiB, (got, sizes)


def test_a_chunk_wholly_past_a_cut_packs_end_names_the_packs_real_size(rgw, s3_repo: str, tmp_path: Path) -> None:
    bootback("init", s3_repo)
    bootback("backup", s3_repo, "--vm", "vm1", _disk(tmp_path, "d.raw", os.urandom(2 * MiB)))
    repo = Repository.open(s3_repo)
    rec = max(packed.records(repo).values(), key=lambda r: r.offset)
    bucket, root = packed.split(s3_repo)
    client = rgw.client()
    body = client.get_object(Bucket=bucket, Key=f"{root}/{rec.pack_key}")["Body"].read()
    client.put_object(Bucket=bucket, Key=f"{root}/{rec.pack_key}", Body=body[: rec.offset - 100])
    with pytest.raises(IntegrityError) as err:
        Repository.open(s3_repo).store.get(rec.chunk_hex)
    assert f"which holds {rec.offset - 100} bytes" in str(err.value), err.value


def test_the_chunks_of_a_pack_lost_in_the_bucket_are_stored_again_by_the_next_backup(
    rgw, s3_repo: str, tmp_path: Path
) -> None:
    data = os.urandom(3 * MiB)
    bootback("init", s3_repo)
    bootback("backup", s3_repo, "--vm", "vm1", _disk(tmp_path, "d.raw", data))
    repo = Repository.open(s3_repo)
    reader = repo.open_disk(repo.restore_point("vm1"), "d.raw")
    assert reader.read(0, 4096) == data[:4096]  # the indexes loaded, with the record of the pack about to go
    bucket, root = packed.split(s3_repo)
    (lost,) = _packs(rgw, s3_repo)
    rgw.client().delete_object(Bucket=bucket, Key=f"{root}/{lost}")
    before = rgw.counters()
    bootback("backup", s3_repo, "--vm", "vm1", _disk(tmp_path, "d.raw", data))
    assert rgw.counters()["put_b"] - before["put_b"] >= 3 * MiB  # not deduplicated against the lost pack
    assert len(_packs(rgw, s3_repo)) == 1
    old, new = [w for w in bootback("points", s3_repo, "--vm", "vm1").stdout.split() if w.startswith("vm1@")]
    assert _restore(s3_repo, new, tmp_path / "new.out") == data
    assert _restore(s3_repo, old, tmp_path / "old.out") == data  # same chunks: found where they are now
    assert reader.read(MiB, MiB) == data[MiB : 2 * MiB]  # the reader opened before finds them there too
    assert "repository OK" in bootback("verify", s3_repo).stdout
