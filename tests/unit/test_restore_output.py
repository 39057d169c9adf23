"""``bootback restore`` to a regular file: the output is flushed to disk in the background while the restore runs
(``_SyncBehindFile``), not in one fsync at the end, and a flush that fails stops the restore with one clear line,
no partial file, and any older file at the target kept."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.commands import repository as repo_cmd
from appliance.ingest.backup import backup_vm
from appliance.ingest.sources import DiskSource
from appliance.repo import Repository

CS = 64 * 1024
CHUNKS = 24


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[Path, bytes]:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    data = bytearray(os.urandom(CHUNKS * CS + 100))
    data[3 * CS : 5 * CS] = bytes(2 * CS)  # zero chunks: the output file gets holes there
    backup_vm(repo, "vm01", [DiskSource(name="d", size=len(data), format="raw", stream=io.BytesIO(bytes(data)))])
    return tmp_path / "repo", bytes(data)


def test_restore_flushes_in_the_background_and_is_bit_exact(
    backed_up: tuple[Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = backed_up
    monkeypatch.setattr(repo_cmd, "SYNC_BEHIND", 4 * CS)
    flushed: list[int] = []  # how much was written when each background flush was started (it runs for real)
    real = repo_cmd._SyncBehindFile._sync_and_drop

    def sync_and_drop(self: repo_cmd._SyncBehindFile, end: int) -> None:
        flushed.append(end)
        real(self, end)

    monkeypatch.setattr(repo_cmd._SyncBehindFile, "_sync_and_drop", sync_and_drop)
    out = tmp_path / "out.raw"
    assert main(["restore", str(path), "vm01", "-o", str(out), "--json"]) == 0
    assert out.read_bytes() == data
    assert flushed and 0 < flushed[0] < len(data), flushed  # started while the restore was still writing
    assert not list(tmp_path.glob(".out.raw.*"))


def test_a_failed_background_flush_stops_the_restore_and_keeps_the_old_file(
    backed_up: tuple[Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    path, _ = backed_up
    monkeypatch.setattr(repo_cmd, "SYNC_BEHIND", 4 * CS)

    def fdatasync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    out = tmp_path / "out.raw"
    out.write_bytes(b"an older restore")
    assert main(["restore", str(path), "vm01", "-o", str(out)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write {out}" in err and "Input/output error" in err, err
    assert out.read_bytes() == b"an older restore"
    assert not list(tmp_path.glob(".out.raw.*"))
