"""File handles and the directory backend's semantics (exclusive create, rename, readdir cookies)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nfsd.handles import HANDLE_LEN, HandleCodec
from nfsd.localfs import LocalFS
from nfsd.vfs import CreateMode, Cred, NFSError, ObjectId, SetAttr, StableHow, Status


def test_handles_roundtrip_small_and_verified(tmp_path: Path) -> None:
    codec = HandleCodec.from_file(tmp_path / "secret")
    assert HANDLE_LEN <= 56
    obj = ObjectId(2**63 + 5, 77)
    h = codec.encode(3, obj)
    assert len(h) == HANDLE_LEN and codec.decode(h) == (3, obj)
    # the same secret after a "restart" resolves the same handle
    assert HandleCodec.from_file(tmp_path / "secret").decode(h) == (3, obj)
    forged = bytearray(h)
    forged[5] ^= 1
    with pytest.raises(NFSError) as e:
        codec.decode(bytes(forged))
    assert e.value.status == Status.BADHANDLE
    with pytest.raises(NFSError) as e:
        codec.decode(h + b"x")
    assert e.value.status == Status.BADHANDLE
    with pytest.raises(NFSError) as e:
        HandleCodec(os.urandom(32)).decode(h)  # another server's handle
    assert e.value.status == Status.BADHANDLE


@pytest.fixture
def fs(tmp_path: Path) -> LocalFS:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.txt").write_text("hello")
    return LocalFS(tmp_path)


CRED = Cred(uid=0, gid=0)


def test_exclusive_create_is_idempotent_per_verifier(fs: LocalFS) -> None:
    root = fs.root()
    a = fs.create(root, ".lck-0001", CreateMode.EXCLUSIVE, SetAttr(), b"12345678", CRED)
    again = fs.create(root, ".lck-0001", CreateMode.EXCLUSIVE, SetAttr(), b"12345678", CRED)
    assert a == again
    with pytest.raises(NFSError) as e:
        fs.create(root, ".lck-0001", CreateMode.EXCLUSIVE, SetAttr(), b"87654321", CRED)
    assert e.value.status == Status.EXIST
    with pytest.raises(NFSError) as e:
        fs.create(root, ".lck-0001", CreateMode.GUARDED, SetAttr(), None, CRED)
    assert e.value.status == Status.EXIST
    # UNCHECKED on an existing file with a size truncates it
    fs.write(a, 0, memoryview(b"abcdef"), StableHow.FILE_SYNC)
    fs.create(root, ".lck-0001", CreateMode.UNCHECKED, SetAttr(size=2), None, CRED)
    assert fs.read(a, 0, 100) == (b"ab", True)


def test_read_sets_eof_when_reaching_end(fs: LocalFS) -> None:
    f = fs.lookup(fs.lookup(fs.root(), "d"), "f.txt")
    assert fs.read(f, 0, 2) == (b"he", False)
    assert fs.read(f, 3, 2) == (b"lo", True)  # data and EOF together
    assert fs.read(f, 10, 2) == (b"", True)


def test_rename_directory_keeps_children_resolvable(fs: LocalFS) -> None:
    d = fs.lookup(fs.root(), "d")
    f = fs.lookup(d, "f.txt")
    fs.rename(fs.root(), "d", fs.root(), "moved")
    assert fs.read(f, 0, 5)[0] == b"hello"
    assert fs.path(f).endswith("/moved/f.txt")
    # a fresh backend (a restart) finds the object again by searching
    fresh = LocalFS(fs.base)
    assert fresh.read(f, 0, 5)[0] == b"hello"
    fs.remove(d, "f.txt")
    with pytest.raises(NFSError) as e:
        fs.getattr(f)
    assert e.value.status == Status.STALE


def test_readdir_cookies_and_verifier(fs: LocalFS) -> None:
    root = fs.root()
    for i in range(50):
        fs.create(root, f"file{i:02d}", CreateMode.GUARDED, SetAttr(), None, CRED)
    names, cookie, verifier = [], 0, 0
    while True:
        res = fs.readdir(root, cookie, verifier, 16 * 20)
        names += [e.name for e in res.entries]
        if res.eof:
            break
        cookie, verifier = res.entries[-1].cookie, res.verifier
    assert names[:2] == [".", ".."] and len(names) == 2 + 51 and len(set(names)) == len(names)


def bad_cookie(fs: LocalFS, directory: ObjectId, cookie: int, verifier: int) -> bool:
    try:
        fs.readdir(directory, cookie, verifier, 4096)
        return False
    except NFSError as e:
        assert e.status == Status.BAD_COOKIE, e
        return True


def test_readdir_verifier_outlives_reads_but_not_changes(fs: LocalFS) -> None:
    """A listing's cookies stay good while the directory's entries stay; any change of them (through us or
    behind our back, in the same clock tick or not) makes the OLD verifier BAD_COOKIE."""
    root = fs.root()
    d = fs.lookup(root, "d")
    f = fs.lookup(d, "f.txt")
    for i in range(40):
        fs.create(root, f"file{i:02d}", CreateMode.GUARDED, SetAttr(), None, CRED)

    def begin() -> tuple[int, int]:
        first = fs.readdir(root, 0, 0, 16 * 16)
        assert not first.eof
        return first.entries[-1].cookie, first.verifier

    cookie, old = begin()
    fs.getattr(f)
    fs.write(f, 0, memoryview(b"changed data"), StableHow.FILE_SYNC)
    fs.setattr(root, SetAttr(mtime_ns=1_000_000_000), CRED)  # times and contents are not entries
    assert not bad_cookie(fs, root, cookie, old), "an unchanged directory refused its own verifier"
    assert fs.readdir(root, cookie, old, 4096).entries[0].cookie == cookie + 1
    changes = [
        lambda: fs.create(root, "late", CreateMode.GUARDED, SetAttr(), None, CRED),
        lambda: fs.remove(root, "late"),
        lambda: fs.rename(root, "file05", root, "file05.renamed"),
        lambda: fs.mkdir(root, "sub", SetAttr(), CRED),
        lambda: (fs.base / "from-the-host").write_bytes(b""),
        lambda: os.unlink(fs.base / "from-the-host"),
    ]
    for change in changes:
        cookie, old = begin()
        change()
        assert bad_cookie(fs, root, cookie, old), "a changed directory still accepted the old verifier"


def test_setattr_truncate_extend_mode_times(fs: LocalFS) -> None:
    f = fs.lookup(fs.lookup(fs.root(), "d"), "f.txt")
    a = fs.setattr(f, SetAttr(size=10_000_000, mode=0o600, mtime_ns=1_000_000_000_123), CRED)
    assert a.size == 10_000_000 and a.mode == 0o600 and a.mtime_ns == 1_000_000_000_123
    assert a.used < 1_000_000  # extension is sparse
    assert fs.setattr(f, SetAttr(size=3), CRED).size == 3


@pytest.mark.skipif(os.geteuid() != 0, reason="files get the caller's owner only when the server runs as root")
def test_unchecked_create_of_an_existing_file_keeps_its_owner(fs: LocalFS) -> None:
    """CREATE UNCHECKED on an existing name opens that file; it must not hand it to the caller."""
    path = fs.base / "d" / "f.txt"
    os.chown(path, 1234, 1234)
    d = fs.lookup(fs.root(), "d")
    other = Cred(uid=4321, gid=4321)
    obj = fs.create(d, "f.txt", CreateMode.UNCHECKED, SetAttr(size=2), None, other)
    assert (path.stat().st_uid, path.stat().st_gid) == (1234, 1234) and path.read_bytes() == b"he"
    new = fs.getattr(fs.create(d, "new.txt", CreateMode.UNCHECKED, SetAttr(), None, other))
    assert (new.uid, new.gid) == (4321, 4321)  # a file it creates is the caller's
    assert obj == fs.lookup(d, "f.txt")


def test_exclusive_create_without_a_verifier_is_refused_before_creating(fs: LocalFS) -> None:
    with pytest.raises(NFSError) as e:
        fs.create(fs.root(), "x", CreateMode.EXCLUSIVE, SetAttr(), None, CRED)
    assert e.value.status == Status.INVAL and "x" in str(e.value)
    assert not (fs.base / "x").exists()
