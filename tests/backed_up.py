"""One VM disk backed up into a fresh local repository: the starting point of the reader and read-cache tests."""

from __future__ import annotations

from pathlib import Path

from appliance.ingest.backup import backup_vm
from appliance.ingest.sources import open_source
from appliance.repo import Repository

MiB = 1 << 20


def backed_up(tmp_path: Path, data: bytes, chunk_size: int = MiB) -> Repository:
    """``data`` as the disk of VM "vm" in ``tmp_path/repo``, reopened so its chunk cache starts empty."""
    disk = tmp_path / "d.raw"
    disk.write_bytes(data)
    repo = Repository.init(tmp_path / "repo", chunk_size=chunk_size)
    src = open_source(disk)
    try:
        backup_vm(repo, "vm", [src])
    finally:
        src.close()
    return Repository.open(tmp_path / "repo")
