"""A client's symlink is data, never a way out of the export (issue 8, STYLE.md rule 13).

Each test plants a canary directory beside the export and tries to reach it the ways a client could: a symlink
used as a directory, a symlink used as a file (READ/WRITE/SETATTR), a directory swapped for a symlink after
LOOKUP (the old handle, and handles beneath it), names that climb, FIFOs. Every attempt must be refused and
the canary must be exactly as it was. Both resolvers run: openat2 and the per-component walk older kernels get.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.datastore.backend import DatastoreBackend
from appliance.datastore.folder import SessionFolder
from nfsd.beneath import HAVE_OPENAT2
from nfsd.localfs import LocalFS
from nfsd.vfs import CreateMode, Cred, FileType, NFSError, ObjectId, SetAttr, StableHow, Status

CRED = Cred(uid=0, gid=0)
SECRET = b"canary: must never be read through the export\n"
RESOLVERS = [
    pytest.param(True, id="openat2", marks=pytest.mark.skipif(not HAVE_OPENAT2, reason="no openat2")),
    pytest.param(False, id="per-component"),
]


class Canary:
    """A directory outside the export; ``intact()`` says whether anything in it changed."""

    def __init__(self, base: Path) -> None:
        self.dir = base / "outside"
        (self.dir / "sub").mkdir(parents=True)
        self.secret = self.dir / "secret.txt"
        self.secret.write_bytes(SECRET)
        self.secret.chmod(0o600)
        os.utime(self.secret, ns=(1_000_000_000, 1_000_000_000))
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, tuple]:
        out = {}
        for p in sorted(self.dir.rglob("*")):
            st = p.lstat()
            data = p.read_bytes() if p.is_file() else b""
            out[str(p.relative_to(self.dir))] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_nlink, data)
        return out

    def intact(self) -> bool:
        return self.snapshot() == self.before


@pytest.fixture
def canary(tmp_path: Path) -> Canary:
    return Canary(tmp_path)


@pytest.fixture(params=RESOLVERS)
def fs(request: pytest.FixtureRequest, tmp_path: Path) -> LocalFS:
    export = tmp_path / "export"
    (export / "d").mkdir(parents=True)
    (export / "d" / "f.txt").write_bytes(b"inside")
    return LocalFS(export, use_openat2=request.param)


def refused(status: Status | tuple[Status, ...], fn: Callable, *args: object) -> None:
    with pytest.raises(NFSError) as e:
        fn(*args)
    wanted = status if isinstance(status, tuple) else (status,)
    assert e.value.status in wanted, f"{fn.__name__}: {e.value.status.name} ({e.value}), wanted {wanted}"


@pytest.mark.parametrize("target", ["abs", "relative", "inside"])
def test_a_symlink_never_acts_as_a_directory(fs: LocalFS, canary: Canary, target: str) -> None:
    root = fs.root()
    dest = {"abs": str(canary.dir), "relative": "../outside", "inside": "d"}[target]
    esc = fs.symlink(root, "esc", dest, SetAttr(), CRED)
    f = fs.lookup(fs.lookup(root, "d"), "f.txt")
    assert fs.getattr(esc).type == FileType.LNK
    assert fs.readlink(esc) == dest  # still readable as data
    refused(Status.NOTDIR, fs.lookup, esc, "secret.txt")
    refused(Status.NOTDIR, fs.parent, esc)
    refused(Status.NOTDIR, fs.readdir, esc, 0, 0, 4096)
    refused(Status.NOTDIR, fs.listing, esc)
    refused(Status.NOTDIR, fs.create, esc, "planted", CreateMode.UNCHECKED, SetAttr(), None, CRED)
    refused(Status.NOTDIR, fs.create, esc, "planted", CreateMode.EXCLUSIVE, SetAttr(), b"12345678", CRED)
    refused(Status.NOTDIR, fs.mkdir, esc, "planted", SetAttr(), CRED)
    refused(Status.NOTDIR, fs.symlink, esc, "planted", "x", SetAttr(), CRED)
    refused(Status.NOTDIR, fs.remove, esc, "secret.txt")
    refused(Status.NOTDIR, fs.rmdir, esc, "sub")
    refused(Status.NOTDIR, fs.rename, esc, "secret.txt", root, "stolen")
    refused(Status.NOTDIR, fs.rename, fs.lookup(root, "d"), "f.txt", esc, "planted")
    refused(Status.NOTDIR, fs.link, f, esc, "planted")
    assert canary.intact()
    assert sorted(os.listdir(fs.base)) == ["d", "esc"] and os.listdir(fs.base / "d") == ["f.txt"]


def test_a_symlink_to_a_file_is_never_read_written_or_truncated(fs: LocalFS, canary: Canary) -> None:
    link = fs.symlink(fs.root(), "link", str(canary.secret), SetAttr(), CRED)
    refused(Status.INVAL, fs.read, link, 0, 100)
    refused(Status.INVAL, fs.write, link, 0, memoryview(b"owned"), StableHow.FILE_SYNC)
    refused(Status.INVAL, fs.commit, link, 0, 0)
    refused(Status.INVAL, fs.setattr, link, SetAttr(size=0), CRED)
    # mode is ignored on a link (Linux links have none); owner and times change the link itself only
    attr = fs.setattr(link, SetAttr(mode=0o777, uid=0, gid=0, atime_ns=5_000_000_000, mtime_ns=7_000_000_000), CRED)
    assert attr.type == FileType.LNK and attr.mtime_ns == 7_000_000_000
    assert os.lstat(fs.base / "link").st_mtime_ns == 7_000_000_000
    # CREATE over the link's name neither follows nor truncates it
    refused(
        (Status.INVAL, Status.EXIST), fs.create, fs.root(), "link", CreateMode.UNCHECKED, SetAttr(size=0), None, CRED
    )
    refused(Status.EXIST, fs.create, fs.root(), "link", CreateMode.GUARDED, SetAttr(), None, CRED)
    refused(Status.EXIST, fs.create, fs.root(), "link", CreateMode.EXCLUSIVE, SetAttr(), b"12345678", CRED)
    # a hard link to the symlink is another name for the link, not for its target
    fs.link(link, fs.root(), "hard")
    assert os.readlink(fs.base / "hard") == str(canary.secret)
    assert canary.intact()


def test_a_directory_swapped_for_a_symlink_after_lookup_makes_old_handles_stale(fs: LocalFS, canary: Canary) -> None:
    """The race: a handle was looked up, then (another client, or a host process) puts a symlink in its place."""
    root = fs.root()
    (canary.dir / "f.txt").write_bytes(SECRET)  # the same name behind the symlink, to tempt a by-name walk
    canary.before = canary.snapshot()

    def swapped() -> tuple[ObjectId, ObjectId]:
        """Handles for d and d/f.txt looked up while d was real, then d replaced by a symlink to the canary."""
        if (fs.base / "d").is_symlink():
            os.unlink(fs.base / "d")
            os.rename(fs.base / "d.old", fs.base / "d")
        d = fs.lookup(root, "d")
        f = fs.lookup(d, "f.txt")
        os.rename(fs.base / "d", fs.base / "d.old")
        os.symlink(canary.dir, fs.base / "d")
        return d, f

    # each of these would reach the canary if the server walked names; each answers STALE instead
    refused(Status.STALE, fs.read, swapped()[1], 0, 100)
    refused(Status.STALE, fs.write, swapped()[1], 0, memoryview(b"owned"), StableHow.FILE_SYNC)
    refused(Status.STALE, fs.setattr, swapped()[1], SetAttr(size=0), CRED)
    refused(Status.STALE, fs.getattr, swapped()[1])
    refused(Status.STALE, fs.lookup, swapped()[0], "secret.txt")
    refused(Status.STALE, fs.readdir, swapped()[0], 0, 0, 4096)
    refused(Status.STALE, fs.create, swapped()[0], "planted", CreateMode.UNCHECKED, SetAttr(), None, CRED)
    refused(Status.STALE, fs.mkdir, swapped()[0], "planted", SetAttr(), CRED)
    refused(Status.STALE, fs.remove, swapped()[0], "secret.txt")
    refused(Status.STALE, fs.rename, swapped()[0], "secret.txt", root, "stolen")
    refused(Status.STALE, fs.link, swapped()[1], root, "hard")
    assert canary.intact()
    # the next use finds the object where it really is now (the search walks real directories only)
    d, f = swapped()
    refused(Status.STALE, fs.read, f, 0, 100)
    assert fs.read(f, 0, 100) == (b"inside", True)
    assert fs.path(f) == str(fs.base / "d.old" / "f.txt")
    assert canary.intact()


def test_an_intermediate_directory_swapped_for_a_symlink(fs: LocalFS, canary: Canary) -> None:
    """Deeper: handles for d/e and d/e/g.txt, then d becomes a symlink to a tree with the same names outside."""
    root = fs.root()
    (fs.base / "d" / "e").mkdir()
    (fs.base / "d" / "e" / "g.txt").write_bytes(b"inside")
    (canary.dir / "e").mkdir()
    (canary.dir / "e" / "g.txt").write_bytes(SECRET)
    canary.before = canary.snapshot()

    def swapped() -> tuple[ObjectId, ObjectId]:
        if (fs.base / "d").is_symlink():
            os.unlink(fs.base / "d")
            os.rename(fs.base / "d.old", fs.base / "d")
        e = fs.lookup(fs.lookup(root, "d"), "e")
        g = fs.lookup(e, "g.txt")
        os.rename(fs.base / "d", fs.base / "d.old")
        os.symlink(canary.dir, fs.base / "d")
        return e, g

    refused(Status.STALE, fs.read, swapped()[1], 0, 100)
    refused(Status.STALE, fs.setattr, swapped()[1], SetAttr(size=0), CRED)
    refused(Status.STALE, fs.create, swapped()[0], "planted", CreateMode.UNCHECKED, SetAttr(), None, CRED)
    refused(Status.STALE, fs.listing, swapped()[0])
    refused(Status.STALE, fs.remove, swapped()[0], "g.txt")
    assert canary.intact()


# Swaps the names of a directory and a symlink atomically (renameat2 RENAME_EXCHANGE), as fast as it can.
SWAPPER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
a, b = (os.fsencode(p) for p in sys.argv[1:3])
while True:
    if libc.renameat2(-100, a, -100, b, 2) != 0:
        sys.exit(f"renameat2: {os.strerror(ctypes.get_errno())}")
"""


def test_racing_a_symlink_swap_never_reaches_outside(fs: LocalFS, canary: Canary) -> None:
    """The time-of-check/time-of-use race: while another process keeps swapping d for a symlink to the canary
    and back, this one uses old handles for d and d/f.txt. Checking a path and then opening it by name lets
    some calls land in the canary; holding descriptors lets none."""
    root = fs.root()
    (canary.dir / "f.txt").write_bytes(SECRET)
    canary.before = canary.snapshot()
    d = fs.lookup(root, "d")
    f = fs.lookup(d, "f.txt")
    os.symlink(canary.dir, fs.base / "d.link")
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, fs.base / "d", fs.base / "d.link"])
    done = 0
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline and canary.intact():
            for call in (
                lambda: fs.create(d, "planted", CreateMode.UNCHECKED, SetAttr(), None, CRED),
                lambda: fs.setattr(f, SetAttr(size=0), CRED),
                lambda: fs.mkdir(d, "dir", SetAttr(), CRED),
                lambda: fs.remove(d, "secret.txt"),
            ):
                try:
                    call()
                    done += 1
                except (NFSError, OSError):
                    pass  # STALE or NOENT mid-swap: refused is fine, escaping is not
    finally:
        swapper.kill()
        swapper.wait()
    assert swapper.returncode == -9, "the swapper stopped by itself"
    assert done > 0, "no call ever succeeded: the test proves nothing"
    assert canary.intact(), f"a call reached outside the export: {sorted(os.listdir(canary.dir))}"


def test_names_that_climb_are_refused(fs: LocalFS, canary: Canary) -> None:
    root = fs.root()
    for name in ("..", ".", "", "d/../..", "../outside", "a\0b"):
        refused(Status.INVAL, fs.lookup, root, name)
        refused(Status.INVAL, fs.create, root, name, CreateMode.UNCHECKED, SetAttr(), None, CRED)
    assert canary.intact()


def test_a_restart_search_never_walks_through_a_symlink(fs: LocalFS, canary: Canary) -> None:
    fs.symlink(fs.root(), "esc", str(canary.dir), SetAttr(), CRED)
    outside = ObjectId(canary.secret.stat().st_ino, 0)  # an inode a forged or old handle could name
    fresh = LocalFS(fs.base)
    refused(Status.STALE, fresh.read, outside, 0, 100)
    refused(Status.STALE, fresh.getattr, outside)
    assert canary.intact()


def test_fifo_and_other_special_files_are_never_opened(fs: LocalFS) -> None:
    os.mkfifo(fs.base / "fifo")
    fifo = fs.lookup(fs.root(), "fifo")
    assert fs.getattr(fifo).type == FileType.FIFO
    result: list[BaseException | None] = []

    def attempts() -> None:
        try:
            refused(Status.INVAL, fs.read, fifo, 0, 10)
            refused(Status.INVAL, fs.write, fifo, 0, memoryview(b"x"), StableHow.FILE_SYNC)
            refused(Status.INVAL, fs.setattr, fifo, SetAttr(size=0), CRED)
            refused(
                (Status.EXIST, Status.NXIO), fs.create, fs.root(), "fifo", CreateMode.UNCHECKED, SetAttr(), None, CRED
            )
            result.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            result.append(exc)

    t = threading.Thread(target=attempts, daemon=True)
    t.start()
    t.join(10)
    assert result, "an operation on a FIFO blocked (the server opened it)"
    assert result[0] is None, result[0]
    assert stat.S_ISFIFO(os.lstat(fs.base / "fifo").st_mode)


def test_ordinary_operations_still_work(fs: LocalFS) -> None:
    """The confinement changes nothing for real files and directories."""
    root = fs.root()
    sub = fs.mkdir(root, "sub", SetAttr(), CRED)
    f = fs.create(sub, "a", CreateMode.GUARDED, SetAttr(mode=0o640), None, CRED)
    assert fs.write(f, 0, memoryview(b"hello"), StableHow.FILE_SYNC).count == 5
    assert fs.setattr(f, SetAttr(mode=0o600, size=4), CRED).mode == 0o600
    assert fs.read(f, 0, 10) == (b"hell", True)
    fs.rename(sub, "a", root, "b")
    fs.link(f, sub, "c")
    assert fs.getattr(f).nlink == 2 and [n for n, _ in fs.listing(sub)] == ["c"]
    fs.remove(sub, "c")
    fs.rmdir(root, "sub")
    assert [n for n, _ in fs.listing(root)] == ["b", "d"]
    assert fs.parent(fs.lookup(root, "d")) == root
    assert fs.fsstat(root).total_bytes > 0


def test_datastore_root_and_session_folders_refuse_symlinks_as_directories(tmp_path: Path, canary: Canary) -> None:
    """The daemon's datastore stacks LocalFS twice: the root directory and each session folder's files/."""
    ds = DatastoreBackend(tmp_path / "datastore")
    (tmp_path / "session" / "files").mkdir(parents=True)
    ds.add_folder(1, "vm01", SessionFolder(tmp_path / "session", {}))
    root = ds.root()
    folder = ds.lookup(root, "vm01")
    for d in (root, folder):
        esc = ds.symlink(d, "esc", str(canary.dir), SetAttr(), CRED)
        assert ds.readlink(esc) == str(canary.dir)
        refused(Status.NOTDIR, ds.readdir, esc, 0, 0, 4096)
        refused(Status.NOTDIR, ds.lookup, esc, "secret.txt")
        refused(Status.NOTDIR, ds.create, esc, "planted", CreateMode.UNCHECKED, SetAttr(), None, CRED)
        refused(Status.NOTDIR, ds.mkdir, esc, "planted", SetAttr(), CRED)
        refused(Status.NOTDIR, ds.remove, esc, "secret.txt")
        link = ds.symlink(d, "link", str(canary.secret), SetAttr(), CRED)
        refused(Status.INVAL, ds.read, link, 0, 100)
        refused(Status.INVAL, ds.write, link, 0, memoryview(b"owned"), StableHow.FILE_SYNC)
        refused(Status.INVAL, ds.setattr, link, SetAttr(size=0), CRED)
    assert canary.intact()
    names = [e.name for e in ds.readdir(folder, 0, 0, 4096).entries]
    assert names == [".", "..", "esc", "link"]
