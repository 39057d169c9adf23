"""A damaged repository never serves wrong bytes: every flipped bit of a restore point file is refused or harmless."""

from __future__ import annotations

import io
import random
import time
from pathlib import Path

import pytest

from appliance.errors import BootbackError
from appliance.ingest.backup import backup_vm
from appliance.ingest.sources import DiskSource
from appliance.repo import Repository
from appliance.repo.maintenance import verify

CS = 64 * 1024


def disk_bytes(chunks: int, tail: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(chunks * CS + tail))
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


def sample_bits(n_bits: int, limit: int, seed: int) -> list[int]:
    """Every bit when there are at most ``limit``, else a deterministic sample that includes the first 4 KiB."""
    if n_bits <= limit:
        return list(range(n_bits))
    head = list(range(min(n_bits, 4096 * 8)))
    rest = random.Random(seed).sample(range(len(head), n_bits), max(0, limit - len(head)))
    return head + sorted(rest)


def test_every_single_bit_flip_of_a_point_file_is_refused_or_harmless(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    point = backup(repo, "web01", {"disk0": disk_bytes(3, 1234, 1), "d1": disk_bytes(2, 0, 2)}, 'displayName = "w"\n')
    backup(repo, "other", {"disk0": disk_bytes(2, 7, 3)})  # listed beside it, must stay listable
    path = point_path(repo, point)
    bits = sample_bits(path.stat().st_size * 8, 6000, seed=5)
    started = time.monotonic()
    bad = flip_outcomes(repo, path, point.vm, point.id, bits, verify_every=5)
    assert not bad, {k: (len(v), v[:5]) for k, v in bad.items()}
    assert time.monotonic() - started < 60
    assert verify(repo).ok  # the original is back and whole


@pytest.mark.parametrize("size", [0, 1, CS - 1, CS, 4 * CS + 1])
def test_edge_sizes_round_trip(tmp_path: Path, size: int) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    data = random.Random(size).randbytes(size)
    point = backup(repo, "vm", {"d": data})
    again = Repository.open(repo.path).restore_point("vm", point.id)
    assert repo.open_disk(again, "d").read(0, size + 10) == data
