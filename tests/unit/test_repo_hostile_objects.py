"""A hostile chunk file is refused at once, holding neither a thread nor memory: a FIFO (would block the open
forever), a symlink to /dev/zero (endless read), a huge sparse file (read whole before any check), and a small
file whose header and zstd frame claim 1 GiB (a compression bomb). Each is tried through the API
(``Repository.open_disk(...).read``) and through the real CLI (``bootback restore`` and ``bootback verify``),
each in a child process whose time and peak RSS (``wait4``) are measured; an address-space limit keeps a
regression from eating the shared machine."""

from __future__ import annotations

import io
import json
import os
import random
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.errors import IntegrityError, NotARepositoryError
from appliance.ingest.backup import backup_vm
from appliance.ingest.sources import DiskSource
from appliance.repo import Repository, objects
from appliance.repo.maintenance import collect_garbage

CS = 64 * 1024
MiB = 1 << 20
BOMB = 1 << 30
MAX_SECONDS = 5.0
MAX_RSS_GROWTH = 64 * MiB  # over a child that reads a good chunk the same way
CHILD_ADDRESS_SPACE = 3 << 30

API_CHILD = """
import sys
from appliance.repo import Repository
repo = Repository.open(sys.argv[1])
point = repo.restore_point("vm01")
try:
    data = repo.open_disk(point, "d").read(0, int(sys.argv[2]))
    print("read", len(data))
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def rle_bomb(size: int) -> bytes:
    """A zstd frame declaring ``size`` bytes made of RLE blocks: 4 bytes per 128 KiB it expands to."""
    out = [struct.pack("<I", 0xFD2FB528), bytes([0xE0]), struct.pack("<Q", size)]  # single segment, 8-byte size
    left, block = size, 128 << 10
    while left:
        n = min(block, left)
        left -= n
        out.append(((n << 3) | (1 << 1) | (left == 0)).to_bytes(3, "little") + b"A")
    return b"".join(out)


def make_hostile(path: Path, kind: str) -> None:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink-dev-zero":
        os.symlink("/dev/zero", path)
    elif kind == "sparse":
        with open(path, "wb") as f:
            f.truncate(3 << 30)
    elif kind == "bomb":  # ~32 KiB on disk, header and frame agree on 1 GiB
        path.write_bytes(struct.pack(">4sBBHI", objects.CHUNK_MAGIC, 1, 1, 0, BOMB) + rle_bomb(BOMB))
        assert path.stat().st_size < 40 << 10
    else:
        raise AssertionError(kind)


def run_child(args: list[str], cwd: Path) -> tuple[int, str, float, int]:
    """Run ``args``; (exit status, stdout+stderr, seconds, peak RSS in bytes). Killed after 20 s."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE, CHILD_ADDRESS_SPACE))

    out = cwd / "child.out"
    start = time.monotonic()
    with open(out, "wb") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, preexec_fn=limit, cwd=cwd)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() - start > 20:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    return proc.returncode, out.read_text(errors="replace"), time.monotonic() - start, usage.ru_maxrss * 1024


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, str]:
    """A repository with one point vm01 whose disk d has 4 random chunks; and the id of its first chunk."""
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    data = random.Random(7).randbytes(4 * CS)
    point = backup_vm(
        repo,
        "vm01",
        [DiskSource(name="d", size=len(data), format="raw", stream=io.BytesIO(data))],
        source_info={"disks": ["d"]},
    )
    return repo.path, point.disks[0].chunks[0]


def baseline(args: list[str], cwd: Path) -> int:
    """Peak RSS of the same command on the intact repository."""
    status, output, _s, rss = run_child(args, cwd)
    assert status == 0, output
    return rss


CASES = {
    "fifo": "is not a regular file",
    "symlink-dev-zero": "is a symbolic link",
    "sparse": "holds 3221225472 bytes, more than the",
    "bomb": f"header says {BOMB} bytes, more than the {CS}",
}


def commands(path: Path, tmp_path: Path) -> dict[str, list[str]]:
    py = [sys.executable]
    return {
        "api": [*py, "-c", API_CHILD, str(path), str(CS)],
        "restore": [
            *py,
            "-m",
            "appliance",
            "restore",
            str(path),
            "vm01@latest",
            "--disk",
            "d",
            "-o",
            str(tmp_path / "out.raw"),
        ],
        "verify": [*py, "-m", "appliance", "verify", str(path), "--json"],
    }


@pytest.mark.parametrize("how", ["api", "restore", "verify"])
@pytest.mark.parametrize("kind", list(CASES))
def test_a_hostile_chunk_is_refused_at_once(repo: tuple[Path, str], tmp_path: Path, kind: str, how: str) -> None:
    path, victim = repo
    args = commands(path, tmp_path)[how]
    rss_before = baseline(args, tmp_path)
    make_hostile(path / "chunks" / victim[:2] / victim, kind)
    status, output, seconds, rss = run_child(args, tmp_path)
    assert seconds < MAX_SECONDS, (seconds, output)
    assert rss - rss_before < MAX_RSS_GROWTH, (rss_before, rss, output)
    if how == "verify":
        assert status == 1, output
        report = json.loads(output[output.index("{") :])
        assert CASES[kind] in report["bad_chunks"][victim], report
        assert report["damaged_points"] and all(victim in bad for bad in report["damaged_points"].values())
    else:
        assert (how == "api" and status == 0) or (how == "restore" and status != 0), (status, output)
        assert f"chunk {victim}" in output and CASES[kind] in output, output
        assert not output.startswith("read"), output


def test_a_chunk_file_over_the_compress_bound_is_refused_unread(tmp_path: Path) -> None:
    """The file size limit is zstd's worst case for one chunk: an incompressible chunk is under it and served;
    a file one byte over it is refused before it is read."""
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    data = os.urandom(CS)
    point = backup_vm(
        repo,
        "vm01",
        [DiskSource(name="d", size=CS, format="raw", stream=io.BytesIO(data))],
        source_info={"disks": ["d"]},
    )
    cid = point.disks[0].chunks[0]
    path = repo.store.path(cid)
    blob = path.read_bytes()
    limit = objects.max_object_size(CS)
    assert len(blob) <= limit
    path.write_bytes(blob + bytes(limit + 1 - len(blob)))
    with pytest.raises(IntegrityError, match=f"chunk {cid}.*holds {limit + 1} bytes, more than the {limit}"):
        repo.store.get(cid)
    path.write_bytes(blob)
    assert repo.open_disk(repo.restore_point("vm01"), "d").read(0, CS) == data


def test_a_symlinked_chunk_directory_is_not_walked_by_garbage_collection(tmp_path: Path) -> None:
    """chunks/<xx> as a symlink to a directory outside the repository: GC must not delete files there."""
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / ("ab" * 32)
    victim.write_bytes(b"not the repository's")
    (repo.path / "chunks" / "ab").symlink_to(outside)
    collect_garbage(repo)
    assert victim.read_bytes() == b"not the repository's"


@pytest.mark.parametrize("kind", ["fifo", "symlink-dev-zero", "sparse"])
def test_a_hostile_config_json_is_not_a_repository(tmp_path: Path, kind: str) -> None:
    """config.json is read the same way: no hang, no endless read; the repository is refused with its name."""
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    make_hostile(repo.path / "config.json", kind)
    start = time.monotonic()
    assert not Repository.is_repository(repo.path)
    with pytest.raises(NotARepositoryError, match=str(repo.path)):
        Repository.open(repo.path)
    assert time.monotonic() - start < MAX_SECONDS


def test_a_symlinked_point_file_is_listed_as_damaged(tmp_path: Path) -> None:
    """A point file is opened like a chunk: a symlink (here to a copy of a good point outside the repository)
    is never followed; the point is listed as damaged, naming it."""
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    data = bytes(range(256)) * (CS // 256)
    point = backup_vm(
        repo,
        "vm01",
        [DiskSource(name="d", size=CS, format="raw", stream=io.BytesIO(data))],
        source_info={"disks": ["d"]},
    )
    path = repo.path / "points" / "vm01" / f"{point.id}.point"
    copy = tmp_path / "elsewhere.point"
    copy.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(copy)
    listing = repo.list_points()
    assert not listing.points
    (bad,) = listing.damaged
    assert f"restore point vm01@{point.id}" in bad.error and "is a symbolic link" in bad.error, bad.error
