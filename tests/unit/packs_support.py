"""What the pack tests share: small random disks, a packed repository's files and index records as stored."""

from __future__ import annotations

import io
import random
from pathlib import Path

from appliance.ingest.sources import DiskSource
from appliance.repo import Repository
from appliance.repo.packindex import RECORD, PackRecord, decode_index

CS = 64 * 1024


def disk(chunks: int, seed: int) -> bytearray:
    """Random chunks, every fourth one zero (zero chunks are never stored)."""
    data = bytearray(random.Random(seed).randbytes(chunks * CS))
    for i in range(0, chunks, 4):
        data[i * CS : (i + 1) * CS] = bytes(CS)
    return data


def src(data: bytes | bytearray, name: str = "d") -> DiskSource:
    return DiskSource(name=name, size=len(data), format="raw", stream=io.BytesIO(bytes(data)))


def files(repo: Repository, folder: str) -> list[Path]:
    return sorted(p for p in (repo.path / folder).rglob("*") if p.is_file())


def records(repo: Repository, index: Path | None = None) -> list[PackRecord]:
    """The records of one index object, or of every one, read straight from the files."""
    found = []
    for f in [index] if index is not None else files(repo, "index"):
        key = f.relative_to(repo.path).as_posix()
        payload = decode_index(f.read_bytes(), repo.store.envelope, key, repo.store.max_object)
        found += [PackRecord(*RECORD.unpack_from(payload, i)) for i in range(0, len(payload), RECORD.size)]
    return found


def restore(repo: Repository, point, size: int) -> bytes:  # noqa: ANN001 - a RestorePoint
    return repo.open_disk(repo.restore_point(point.vm, point.id), "d").read(0, size)
