"""A damaged repository never serves wrong bytes: every flipped bit of a restore point file is refused or harmless."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import struct
import threading
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import pytest
import zstandard

from appliance.errors import BootbackError, IntegrityError, RestorePointNotFoundError, UsageError
from appliance.ingest.backup import backup_vm
from appliance.ingest.sources import DiskSource
from appliance.repo import Repository, objects, pointfile
from appliance.repo.maintenance import collect_garbage, prune, verify

CS = 64 * 1024


def disk_bytes(chunks: int, tail: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(chunks * CS + tail))
    if chunks >= 2:
        data[CS : 2 * CS] = bytes(CS)  # an unstored zero chunk
    return bytes(data)


def backup(repo: Repository, vm: str, disks: dict[str, bytes], vmx: str | None = None):  # noqa: ANN201
    sources = [DiskSource(name=n, size=len(d), format="raw", stream=io.BytesIO(d)) for n, d in disks.items()]
    return backup_vm(repo, vm, sources, vmx_text=vmx, source_info={"disks": list(disks)})


def point_path(repo: Repository, point) -> Path:  # noqa: ANN001
    return repo.path / "points" / point.vm / f"{point.id}.point"


def observe(repo: Repository, vm: str, pid: str) -> tuple[list[dict], dict, dict[str, bytes]]:
    """What a user can see of the point: its listing, its summary and every byte of every disk."""
    listed = [p.summary() for p in repo.restore_points()]
    point = repo.restore_point(vm, pid)
    disks = {d.name: repo.open_disk(point, d.name).read(0, d.size + 1) for d in point.disks}
    return listed, point.summary(), disks


def damaged_in_listing(repo: Repository, vm: str, pid: str, reason: str, with_chunks: bool = False) -> None:
    """The point file vm/pid is listed as damaged with ``reason`` (a regex), no point is made of it, and neither
    naming it nor 'latest' gives another point in its place."""
    listing = repo.list_points(with_chunks=with_chunks)
    (bad,) = [d for d in listing.damaged if (d.vm, d.id) == (vm, pid)]
    assert re.search(reason, bad.error), bad.error
    assert (vm, pid) not in {(p.vm, p.id) for p in listing.points}
    assert bad.summary() == {"vm": vm, "id": pid, "damaged": True, "error": bad.error}
    with pytest.raises(IntegrityError, match=reason):
        repo.restore_point(vm, pid)
    with pytest.raises(IntegrityError, match=reason):
        repo.restore_point(vm, "latest")


def flip_outcomes(
    repo: Repository, path: Path, vm: str, pid: str, bits: list[int], verify_every: int = 1
) -> dict[str, list]:
    """Flip each bit in turn; every flip must be refused (a BootbackError from open, listing or read) or leave
    everything a user sees identical, and ``verify`` must agree (checked on every ``verify_every``-th flip and on
    every flip that was not refused, to bound the time). Returns the offending flips by kind."""
    original = path.read_bytes()
    expected = observe(repo, vm, pid)
    bad: dict[str, list] = {"silent": [], "unclear": [], "verify_missed": [], "verify_false_alarm": []}
    try:
        for bit in bits:
            blob = bytearray(original)
            blob[bit >> 3] ^= 1 << (bit & 7)
            path.write_bytes(blob)
            try:
                seen = observe(repo, vm, pid)
                refused = False
            except BootbackError:
                refused = True
            except Exception as exc:  # noqa: BLE001 - any other exception is an unclear failure
                bad["unclear"].append((bit, repr(exc)[:200]))
                continue
            if not refused and seen != expected:
                bad["silent"].append(bit)
            if refused and bit % verify_every:
                continue
            report = verify(repo, workers=1)
            if refused and report.ok:
                bad["verify_missed"].append(bit)
            if not refused and not report.ok:
                bad["verify_false_alarm"].append(bit)
    finally:
        path.write_bytes(original)
    return {k: v for k, v in bad.items() if v}


def sample_bits(blob: bytes, limit: int, seed: int) -> list[int]:
    """Every bit of both sealed headers (lengths, checksums) and, when the file has more than ``limit`` bits, a
    deterministic sample of the others (the time bound: each flip is a full open, list, read and verify)."""
    n_bits = len(blob) * 8
    if n_bits <= limit:
        return list(range(n_bits))
    second = objects.SEALED_HEADER_SIZE + int.from_bytes(blob[16:24], "big")
    headers = [*range(0, objects.SEALED_HEADER_SIZE * 8), *range(second * 8, (second + objects.SEALED_HEADER_SIZE) * 8)]
    rest = sorted(set(range(n_bits)) - set(headers))
    return sorted(headers + random.Random(seed).sample(rest, max(0, limit - len(headers))))


def test_every_single_bit_flip_of_a_point_file_is_refused_or_harmless(tmp_path: Path) -> None:
    """Summary and chunk lists alike: ~3000 of the file's ~5600 bits, chosen once (seeded), headers whole."""
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    point = backup(repo, "web01", {"disk0": disk_bytes(3, 1234, 1), "d1": disk_bytes(2, 0, 2)}, 'displayName = "w"\n')
    backup(repo, "other", {"disk0": disk_bytes(2, 7, 3)})  # listed beside it, must stay listable
    path = point_path(repo, point)
    bits = sample_bits(path.read_bytes(), 3000, seed=5)
    bad = flip_outcomes(repo, path, point.vm, point.id, bits, verify_every=5)
    assert not bad, {k: (len(v), v[:5]) for k, v in bad.items()}
    assert verify(repo).ok  # the original is back and whole


@pytest.mark.parametrize("size", [0, 1, CS - 1, CS, 4 * CS + 1])
def test_edge_sizes_round_trip(tmp_path: Path, size: int) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    data = random.Random(size).randbytes(size)
    point = backup(repo, "vm", {"d": data})
    again = Repository.open(repo.path).restore_point("vm", point.id)
    assert repo.open_disk(again, "d").read(0, size + 10) == data


# --- field checks: a point file with a valid checksum but impossible facts is refused ------------------------
def write_point(repo: Repository, point, path: Path | None = None) -> Path:  # noqa: ANN001
    """Store ``point`` as it is, bypassing commit_point's checks (as a forger or a buggy writer would)."""
    path = path or point_path(repo, point)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(pointfile.encode(point))
    return path


def a_point(repo: Repository, size: int = 3 * CS + 5):  # noqa: ANN201
    return backup(repo, "vm", {"d": random.Random(size).randbytes(size)})


def _set(attr: str, value: object):  # noqa: ANN202
    return lambda p: setattr(p.disks[0], attr, value)


@pytest.mark.parametrize(
    "tamper,message",
    [
        (_set("size", 3 * CS + 5 + CS), r"needs 5 chunks of 65536 bytes, the manifest lists 4"),
        (_set("size", 2 * CS), r"chunk lists of \d+ bytes, more than its disks can need"),
        (lambda p: p.disks[0].chunks.append(p.disks[0].chunks[1]), r"more than its disks can need \(272\)"),
        (lambda p: p.disks[0].chunks.__setitem__(slice(0, 4), [None] * 5), r"needs 4 chunks .* lists 5"),
        (_set("size", -1), r"size -1 out of range"),
        (_set("size", 1 << 60), r"size 1152921504606846976 out of range"),
        (_set("size", True), r"size is True, expected int"),
        (_set("size", "196613"), r"size is '196613', expected int"),
        (_set("chunk_size", CS + 1), r"chunk size 65537, but the repository's is 65536"),
        (_set("chunk_size", 0), r"chunk size 0, but the repository's is 65536"),
        (_set("name", "../etc"), r"invalid disk name '../etc'"),
        (_set("name", ""), r"invalid disk name ''"),
        (_set("geometry", {"heads": "x"}), r"malformed geometry"),
        (lambda p: p.disks[0].chunks.__setitem__(0, "zz" * 32), r"chunk 0 has a malformed id 'zzzz"),
        (lambda p: p.disks[0].chunks.__setitem__(0, 7), r"chunk 0 has a malformed id 7"),
        (
            lambda p: p.disks[0].chunks.__setitem__(1, p.disks[0].chunks[1][:63] + "\n"),  # 64 characters
            r"chunk 1 has a malformed id '.*\\n'",
        ),
        (lambda p: p.disks[0].chunks.__setitem__(2, p.disks[0].chunks[2].upper()), r"chunk 2 has a malformed id"),
        (
            lambda p: p.disks[0].chunks.__setitem__(
                slice(0, 2), [p.disks[0].chunks[0][:63], p.disks[0].chunks[1] + "a"]
            ),
            r"chunk 0 has a malformed id",
        ),
        (lambda p: p.disks.append(p.disks[0]), r"two disks are named 'd'"),
        (lambda p: p.disks.clear(), r"0 disks"),
        (lambda p: setattr(p, "vm", "other"), r"names VM 'other', but is stored under 'vm'"),
        (lambda p: setattr(p, "id", "2020-01-01T00-00-00.000000Z"), r"names point id '2020-01-01T00-00-00"),
        (lambda p: setattr(p, "time", p.time.replace(year=2020)), r"time 2020-.* does not match its id"),
    ],
)
def test_impossible_facts_are_refused_by_listing_opening_and_verify(tmp_path: Path, tamper, message: str) -> None:  # noqa: ANN001
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    point = a_point(repo)
    path = point_path(repo, point)
    tamper(point)
    write_point(repo, point, path)
    with pytest.raises(IntegrityError, match=message) as err:
        repo.open_disk(repo.restore_point("vm", path.stem), "d").read(0, 1)
    assert f"restore point vm@{path.stem}" in str(err.value)
    report = verify(repo)
    assert not report.ok and list(report.unreadable_points) == [f"vm@{path.stem}"]
    damaged_in_listing(repo, "vm", path.stem, message, with_chunks=True)
    with pytest.raises(IntegrityError, match=message):  # its chunks are unknown: nothing may be collected
        collect_garbage(repo)


def test_chunk_size_1048577_refused(tmp_path: Path) -> None:
    """The audit's case: one flipped bit made chunk_size 1048577; the reader then served wrong bytes."""
    repo = Repository.init(tmp_path / "repo", chunk_size=1 << 20)
    point = backup(repo, "vm", {"d": random.Random(1).randbytes((1 << 20) + 1)})
    point.disks[0].chunk_size = 1048577
    write_point(repo, point)
    damaged_in_listing(repo, "vm", point.id, "chunk size 1048577, but the repository's is 1048576")


def test_a_point_moved_to_another_vm_folder_is_refused(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    point = a_point(repo)
    moved = repo.path / "points" / "web02" / f"{point.id}.point"
    moved.parent.mkdir()
    point_path(repo, point).rename(moved)
    damaged_in_listing(repo, "web02", point.id, "names VM 'vm', but is stored under 'web02'")


def test_restore_point_ids_are_ids_not_paths(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    other = backup(repo, "other", {"d": b"x" * 100})
    a_point(repo)
    with pytest.raises(RestorePointNotFoundError):
        repo.restore_point("vm", f"../other/{other.id}")


def test_commit_refuses_an_impossible_point(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    point = a_point(repo)
    point.disks[0].size += CS
    with pytest.raises(IntegrityError, match="new restore point"):
        repo.commit_point(point)


def test_huge_lengths_are_refused_before_anything_is_allocated(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    point = a_point(repo)
    path = point_path(repo, point)
    good = path.read_bytes()
    # the summary's header claims 1 TiB of raw bytes
    blob = bytearray(good)
    blob[8:16] = (1 << 40).to_bytes(8, "big")
    path.write_bytes(blob)
    tracemalloc.start()
    damaged_in_listing(repo, "vm", point.id, "1099511627776 bytes, more than the 16777216")
    # a disk of 256 TiB whose chunk list is short: refused before a reader or read cache sizes anything
    path.write_bytes(good)
    point.disks[0].size = 1 << 48
    write_point(repo, point)
    with pytest.raises(IntegrityError, match="needs 4294967296 chunks"):
        repo.open_disk(repo.restore_points()[0], "d")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, peak
    # a zstd frame that declares 1 GiB where its header says 70000 bytes (zstd would allocate what it declares)
    frame = bytearray(zstandard.ZstdCompressor(level=3).compress(bytes(70000)))
    frame[8] ^= 0x40
    assert zstandard.frame_content_size(bytes(frame)) > 1 << 30
    blob = objects.pack(objects.CHUNK_MAGIC, bytes(70000), bytes(frame))
    with pytest.raises(IntegrityError, match="zstd frame declares 1073811824 bytes, header says 70000"):
        objects.unpack(objects.CHUNK_MAGIC, blob, "chunk x", zstandard.ZstdDecompressor(), 1 << 20)


def test_a_chunk_of_the_wrong_length_is_never_served(tmp_path: Path) -> None:
    """Content is hash-checked, but a chunk must also fit its slot: the tail chunk named where a full one
    belongs (a valid id, a valid checksum) is refused by read and by read_cached, not served short."""
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    point = a_point(repo)
    chunks = point.disks[0].chunks
    chunks[0] = chunks[-1]  # the 5-byte tail chunk
    write_point(repo, point)
    reader = repo.open_disk(repo.restore_point("vm", point.id), "d")
    with pytest.raises(IntegrityError, match=f"chunk {chunks[-1]} holds 5 bytes where chunk 0 needs 65536"):
        reader.read(0, 10)
    reader.read(3 * CS, 5)  # the tail itself, now in the chunk cache
    with pytest.raises(IntegrityError, match="holds 5 bytes where chunk 0 needs 65536"):
        reader.read_cached(0, 10)
    report = verify(repo)
    assert not report.ok and list(report.damaged_points) == [point.ref]
    assert report.bad_chunks == {chunks[-1]: f"chunk {chunks[-1]} holds 5 bytes where {point.ref} needs 65536"}


# --- summaries: listing never reads chunk lists, and a damaged summary is refused ------------------------
def test_listing_reads_only_summaries(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    point = a_point(repo)
    path = point_path(repo, point)
    whole = path.read_bytes()
    summary_len = objects.SEALED_HEADER_SIZE + int.from_bytes(whole[16:24], "big")
    path.write_bytes(whole[:summary_len])  # the chunk lists are gone: a listing must not notice
    (listed,) = repo.restore_points()
    assert listed.summary() == point.summary() and listed.disks[0].chunks is None and not listed.has_chunks
    with pytest.raises(IntegrityError, match=rf"restore point vm@{point.id} \(chunk lists\): truncated"):
        repo.open_disk(listed, "d")
    blob = bytearray(whole)
    blob[summary_len - 3] ^= 1  # inside the summary
    path.write_bytes(blob)
    damaged_in_listing(repo, "vm", point.id, rf"restore point vm@{point.id} \(summary\)")


def test_a_chunk_list_section_from_another_point_is_refused(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    one, two = a_point(repo), backup(repo, "vm", {"d": random.Random(9).randbytes(3 * CS + 5)})
    a, b = point_path(repo, one).read_bytes(), point_path(repo, two).read_bytes()
    cut_a = objects.SEALED_HEADER_SIZE + int.from_bytes(a[16:24], "big")
    cut_b = objects.SEALED_HEADER_SIZE + int.from_bytes(b[16:24], "big")
    point_path(repo, one).write_bytes(a[:cut_a] + b[cut_b:])
    with pytest.raises(IntegrityError, match="is not the .* expected"):
        repo.restore_point("vm", one.id)


# --- format 1 ------------------------------------------------------------------------------------------------
POINT1 = "2025-06-01T12-00-00.000001Z"


def write_format1_repository(root: Path, disks: dict[str, bytes], vm: str = "old", point_id: str = POINT1) -> None:
    """A format-1 repository written by hand from docs/repository-format.md (format 1), as bootback 1 left it."""
    cctx = zstandard.ZstdCompressor(level=3)
    for sub in ("chunks", "points", "tmp"):
        (root / sub).mkdir(parents=True)
    (root / "lock").touch()
    cfg = {
        "magic": "bootback-repository",
        "format": 1,
        "id": "f" * 32,
        "chunk_size": CS,
        "hash": "sha256",
        "compression": "zstd,3",
        "features": [],
    }
    (root / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    entries = []
    for name, data in disks.items():
        ids: list[str | None] = []
        for off in range(0, len(data), CS):
            block = data[off : off + CS]
            if not any(block):
                ids.append(None)
                continue
            cid = hashlib.sha256(block).hexdigest()
            (root / "chunks" / cid[:2]).mkdir(exist_ok=True)
            header = b"BBCK" + struct.pack(">BBHI", 1, 1, 0, len(block))
            (root / "chunks" / cid[:2] / cid).write_bytes(header + cctx.compress(block))
            ids.append(cid)
        entries.append(
            {
                "name": name,
                "size": len(data),
                "chunk_size": CS,
                "chunks": ids,
                "source_format": "raw",
                "adapter": None,
                "geometry": None,
                "controller": None,
            }
        )
    when = datetime.strptime(point_id, "%Y-%m-%dT%H-%M-%S.%fZ").replace(tzinfo=UTC)
    doc = {
        "format": 1,
        "vm": vm,
        "id": point_id,
        "time": when.isoformat(),
        "vmx": "x = 1\n",
        "source": {"disks": list(disks)},
        "stats": {"bytes_read": 1},
        "disks": entries,
    }
    raw = json.dumps(doc, separators=(",", ":")).encode()
    (root / "points" / vm).mkdir()
    header = b"BBRP" + struct.pack(">BBHI", 1, 1, 0, len(raw))
    (root / "points" / vm / f"{point_id}.point").write_bytes(header + cctx.compress(raw))


def test_a_format1_repository_reads_byte_identically_and_upgrades_on_the_first_backup(tmp_path: Path) -> None:
    disks = {"disk0": disk_bytes(4, 999, 11), "disk1": disk_bytes(1, 0, 12)}
    write_format1_repository(tmp_path / "repo", disks)
    repo = Repository.open(tmp_path / "repo")
    assert repo.config.format == 1
    (listed,) = repo.restore_points()
    assert listed.ref == f"old@{POINT1}" and listed.vmx == "x = 1\n" and listed.stats == {"bytes_read": 1}
    for name, data in disks.items():
        assert repo.open_disk(listed, name).read(0, len(data) + 1) == data
    assert verify(repo).ok
    new = backup(repo, "old", {"disk0": disks["disk0"]})
    assert json.loads((repo.path / "config.json").read_text())["format"] == 2  # bootback 1 now refuses it whole
    again = Repository.open(repo.path)
    assert [p.ref for p in again.restore_points()] == [f"old@{POINT1}", new.ref]
    assert again.open_disk(again.restore_point("old", POINT1), "disk1").read(0, 2 * CS) == disks["disk1"]
    assert again.open_disk(again.restore_point("old"), "disk0").read(0, 5 * CS) == disks["disk0"]
    assert verify(again).ok


def test_a_format1_point_with_impossible_facts_is_refused(tmp_path: Path) -> None:
    write_format1_repository(tmp_path / "repo", {"d": disk_bytes(2, 0, 13)})
    path = tmp_path / "repo" / "points" / "old" / f"{POINT1}.point"
    raw = zstandard.ZstdDecompressor().decompress(path.read_bytes()[12:])
    doc = json.loads(raw)
    doc["disks"][0]["chunk_size"] = 1048577
    raw = json.dumps(doc).encode()
    path.write_bytes(b"BBRP" + struct.pack(">BBHI", 1, 1, 0, len(raw)) + zstandard.ZstdCompressor().compress(raw))
    damaged_in_listing(
        Repository.open(tmp_path / "repo"), "old", POINT1, f"restore point old@{POINT1}: disk d: chunk size"
    )


# --- listing goes on: a damaged point file is reported beside the others, never hidden, never guessed past ------
def damage_summary(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[objects.SEALED_HEADER_SIZE + int.from_bytes(blob[16:24], "big") - 3] ^= 1  # inside the summary
    path.write_bytes(blob)


def test_one_damaged_point_file_hides_nothing_else_and_latest_never_falls_back(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    old = backup(repo, "web01", {"d": disk_bytes(2, 9, 21)})
    new = backup(repo, "web01", {"d": disk_bytes(2, 9, 22)})
    db = backup(repo, "db01", {"d": disk_bytes(1, 3, 23)})
    damage_summary(point_path(repo, new))

    listing = repo.list_points()
    assert [p.ref for p in listing.points] == [old.ref, db.ref]
    (bad,) = listing.damaged
    assert (bad.vm, bad.id, bad.ref) == ("web01", new.id, new.ref) and f"{new.ref} (summary)" in bad.error
    assert [p.ref for p in repo.restore_points()] == [old.ref, db.ref] and repo.damaged_points() == [bad]
    assert repo.damaged_points("db01") == [] and repo.damaged_points("web01") == [bad]
    shown = listing.as_json()
    assert [(e["vm"], e["id"], e["damaged"]) for e in shown] == [
        ("web01", old.id, False),
        ("web01", new.id, True),
        ("db01", db.id, False),
    ]
    assert shown[1] == {"vm": "web01", "id": new.id, "damaged": True, "error": bad.error}  # no facts guessed

    with pytest.raises(IntegrityError) as err:  # not the older point in its place
        repo.restore_point("web01", "latest")
    assert bad.error in str(err.value) and f"name an older point explicitly, e.g. {old.ref}" in str(err.value)
    assert repo.restore_point("web01", old.id).id == old.id  # named explicitly, the older one opens
    assert repo.open_disk(repo.restore_point("db01"), "d").read(0, 10) == disk_bytes(1, 3, 23)[:10]

    before = sorted(p.name for p in repo.path.rglob("*"))
    with pytest.raises(IntegrityError, match=rf"cannot prune .*{re.escape(new.ref)} \(summary\)"):
        prune(repo, "db01", keep=1)
    with pytest.raises(IntegrityError, match="nothing was deleted"):
        prune(repo, "web01", keep=1, dry_run=True)
    assert sorted(p.name for p in repo.path.rglob("*")) == before


def test_a_damaged_older_point_leaves_latest_alone(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    old = backup(repo, "web01", {"d": disk_bytes(2, 9, 24)})
    new = backup(repo, "web01", {"d": disk_bytes(2, 9, 25)})
    damage_summary(point_path(repo, old))
    assert repo.restore_point("web01").id == new.id and [d.id for d in repo.damaged_points()] == [old.id]


def test_stray_files_are_damaged_points_quoted_and_latest_refuses_them(tmp_path: Path) -> None:
    """A file whose name tells no time may be newer than every point: 'latest' cannot be known."""
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    point = backup(repo, "web01", {"d": disk_bytes(1, 0, 26)})
    folder = repo.path / "points" / "web01"
    (folder / "notes\x1b[31m.point").write_bytes(b"hello")
    (folder / "dir.point").mkdir()
    damaged = {d.ref: d.error for d in repo.damaged_points()}
    assert set(damaged) == {"web01@'dir'", "web01@'notes\\x1b[31m'"}, damaged
    assert "is not a regular file" in damaged["web01@'dir'"] and "\x1b" not in "".join(damaged.values())
    with pytest.raises(IntegrityError, match="the latest restore point of VM 'web01' cannot be read"):
        repo.restore_point("web01")
    assert repo.restore_point("web01", point.id).id == point.id
    with pytest.raises(UsageError, match="invalid VM name"):
        repo.list_points("../web01")


def test_a_fifo_named_like_a_point_does_not_block_the_listing(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    point = backup(repo, "web01", {"d": disk_bytes(1, 0, 27)})
    fifo = repo.path / "points" / "web01" / "2020-01-01T00-00-00.000000Z.point"
    os.mkfifo(fifo)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(repo.list_points()), daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # unblock the reader so the test ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("listing blocked on a FIFO")
    (listing,) = result
    assert [p.ref for p in listing.points] == [point.ref]
    (bad,) = listing.damaged
    assert bad.id == fifo.stem and "is not a regular file (mode prw" in bad.error


def forge(path: Path, summary: bytes, chunk_lists: bytes) -> None:
    """A point file with valid checksums around whatever JSON we like (as someone who can write the repository)."""
    cctx = zstandard.ZstdCompressor()
    path.write_bytes(
        objects.seal(objects.POINT_MAGIC, summary, cctx.compress(summary))
        + objects.seal(objects.CHUNK_LIST_MAGIC, chunk_lists, cctx.compress(chunk_lists))
    )


def test_json_nested_too_deep_is_a_damaged_point_not_a_crash(tmp_path: Path) -> None:
    """json raises RecursionError (not ValueError) on deep nesting; and a deep 'source' or 'stats' that json
    reads would break the daemon's and the API's encoders: all three are damage, named."""
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    other = backup(repo, "other", {"d": disk_bytes(1, 0, 28)})
    point = backup(repo, "vm", {"d": bytes(200 * CS)})
    path = point_path(repo, point)
    deep = b"[" * 5000 + b"]" * 5000  # the recursion limit is 1000
    forge(path, deep, point.chunk_lists_json())
    damaged_in_listing(repo, "vm", point.id, "malformed manifest: maximum recursion depth")

    summary = point.summary_json(len(deep), hashlib.sha256(deep).hexdigest())  # within the bound of 200 chunks
    forge(path, summary, deep)
    assert repo.restore_points()[-1].ref == point.ref  # the summary itself is fine
    with pytest.raises(IntegrityError, match="malformed chunk lists: maximum recursion depth"):
        repo.restore_point("vm", point.id)

    point.source = {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}
    write_point(repo, point)
    damaged_in_listing(repo, "vm", point.id, "source is nested more than 8 levels deep")
    assert [p.ref for p in repo.restore_points()] == [other.ref]
