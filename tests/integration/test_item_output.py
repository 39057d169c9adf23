"""An item job's output is renamed into place only after its view closed with the work directory's file system
still above the reserve: free space that fell below it late (after the dump was made and staged: a server's
writes after the last poll, a VM's write cache) leaves no output and one error. On a real 16 MiB tmpfs."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.errors import ItemRecoveryError
from appliance.items.service import Output
from appliance.items.space import SpaceGuard

MIB = 1 << 20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", mnt], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=True)


def made(where: Path, size: int) -> Path:
    path = where / "dump.sql"
    path.write_bytes(b"x" * size)
    return path


def test_a_reserve_crossed_after_the_dump_was_staged_leaves_no_output(small_fs: Path) -> None:
    guard = SpaceGuard(small_fs, reserve=8 * MIB)
    out = small_fs / "out.sql"
    stopped = r"item recovery stopped: .* below the reserve of 8,388,608 bytes"
    with pytest.raises(ItemRecoveryError, match=stopped), Output(out) as output:
        output.stage(made(small_fs, MIB), guard)
        (small_fs / "vm-cache").write_bytes(b"c" * 8 * MIB)  # a running VM's write cache grows meanwhile
    assert sorted(p.name for p in small_fs.iterdir()) == ["vm-cache"], "the dump or its staged copy was left"


def test_an_output_is_placed_when_the_reserve_holds_and_dropped_when_the_job_failed(small_fs: Path) -> None:
    guard = SpaceGuard(small_fs, reserve=8 * MIB)
    out = small_fs / "out.sql"
    with Output(out) as output:
        output.stage(made(small_fs, MIB), guard)
    assert out.read_bytes() == b"x" * MIB and sorted(p.name for p in small_fs.iterdir()) == ["out.sql"]
    out.unlink()
    with pytest.raises(RuntimeError), Output(out) as output:
        output.stage(made(small_fs, MIB), guard)
        raise RuntimeError("the view closed with an error (a breach seen at close)")
    assert list(small_fs.iterdir()) == []
