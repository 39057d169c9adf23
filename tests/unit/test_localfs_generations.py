"""Handles carry the inode's generation; deep trees stay usable (issue 8).

ext4 gives a removed file's inode number to the next file at once. A handle naming only the inode would let a
delayed WRITE of a removed file land in whichever file got its number: with the generation checked on every
resolve (and on a cached open file) such a handle is STALE. Handles from before generations (0) still resolve.
A tree deeper than one openat2 path (PATH_MAX) stays usable and removable; deeper than MAX_DEPTH is refused
when created.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

import nfsd.localfs
from appliance.datastore.backend import DatastoreBackend
from appliance.datastore.folder import SessionFolder
from nfsd.beneath import HAVE_OPENAT2
from nfsd.localfs import LocalFS
from nfsd.vfs import Backend, CreateMode, Cred, NFSError, ObjectId, SetAttr, StableHow, Status

CRED = Cred(uid=0, gid=0)
RESOLVERS = [
    pytest.param(True, id="openat2", marks=pytest.mark.skipif(not HAVE_OPENAT2, reason="no openat2")),
    pytest.param(False, id="per-component"),
]
MAX_TRIES = 200


@pytest.fixture(params=RESOLVERS)
def fs(request: pytest.FixtureRequest, tmp_path: Path) -> LocalFS:
    export = tmp_path / "export"
    export.mkdir()
    return LocalFS(export, use_openat2=request.param)


def create(fs: Backend, d: ObjectId, name: str) -> ObjectId:
    return fs.create(d, name, CreateMode.UNCHECKED, SetAttr(), None, CRED)


def stale(fn: Callable, *args: object) -> None:
    with pytest.raises(NFSError) as exc:
        fn(*args)
    assert exc.value.status == Status.STALE, exc.value


def reused(fs: Backend, d: ObjectId, old: ObjectId, remove: Callable[[], None]) -> ObjectId:
    """After ``remove()`` of ``old``, create files (removing each) until one gets ``old``'s inode number."""
    remove()
    for i in range(MAX_TRIES):
        new = create(fs, d, f"b{i}")
        if new.fileid == old.fileid:
            return new
        fs.remove(d, f"b{i}")
    pytest.skip(f"inode {old.fileid} not reused in {MAX_TRIES} creates on this file system")


def test_an_old_handle_of_a_removed_file_never_reaches_the_file_that_reuses_its_inode(fs: LocalFS) -> None:
    root = fs.root()
    a = create(fs, root, "a")
    fs.write(a, 0, memoryview(b"data of a"), StableHow.UNSTABLE)
    assert fs.read(a, 0, 100)[0] == b"data of a"  # a's descriptor is now cached
    b = reused(fs, root, a, lambda: fs.remove(root, "a"))
    fs.write(b, 0, memoryview(b"data of b"), StableHow.FILE_SYNC)
    assert a.generation != 0 and b.generation != a.generation
    stale(fs.read, a, 0, 100)
    stale(fs.write, a, 0, memoryview(b"LATE"), StableHow.FILE_SYNC)
    stale(fs.getattr, a)
    stale(fs.setattr, a, SetAttr(size=0), CRED)
    stale(fs.commit, a, 0, 0)
    assert fs.read_nowait(a, 0, 100) is None  # the fast path never serves it either
    assert fs.read(b, 0, 100)[0] == b"data of b"
    assert fs.read_nowait(b, 0, 100)[0] == b"data of b"


def test_a_cached_descriptor_of_a_file_removed_behind_our_back_is_never_used(fs: LocalFS) -> None:
    """The open descriptor keeps the removed inode alive: a WRITE through it would vanish into the orphan while
    the client is told OK. It is dropped and the handle is STALE; a new file at the name is not reached by it."""
    root = fs.root()
    a = create(fs, root, "a")
    fs.write(a, 0, memoryview(b"data of a"), StableHow.FILE_SYNC)  # a's descriptor is now cached
    os.unlink(fs.base / "a")  # the host removes it: the backend is not told
    stale(fs.write, a, 0, memoryview(b"LATE"), StableHow.FILE_SYNC)
    assert fs.read_nowait(a, 0, 100) is None
    (fs.base / "a").write_bytes(b"data of new a")
    new = fs.lookup(root, "a")
    stale(fs.write, a, 0, memoryview(b"LATE"), StableHow.FILE_SYNC)
    stale(fs.read, a, 0, 100)
    assert fs.read(new, 0, 100)[0] == b"data of new a"
    assert fs.read_nowait(new, 0, 100)[0] == b"data of new a"


def test_a_directory_handle_is_stale_after_its_inode_is_reused(fs: LocalFS) -> None:
    root = fs.root()
    d = fs.mkdir(root, "d", SetAttr(), CRED)
    fs.rmdir(root, "d")
    for i in range(MAX_TRIES):
        new = fs.mkdir(root, f"e{i}", SetAttr(), CRED)
        if new.fileid == d.fileid:
            break
        fs.rmdir(root, f"e{i}")
    else:
        pytest.skip("directory inode not reused")
    stale(fs.lookup, d, "x")
    stale(create, fs, d, "planted")
    assert os.listdir(fs.base / f"e{i}") == []
    ok = create(fs, new, "ok")
    assert fs.lookup(new, "ok") == ok


def test_handles_from_before_generations_still_resolve(fs: LocalFS) -> None:
    root = fs.root()
    d = fs.mkdir(root, "d", SetAttr(), CRED)
    f = create(fs, d, "f")
    fs.write(f, 0, memoryview(b"kept"), StableHow.FILE_SYNC)
    old_f, old_d = ObjectId(f.fileid, 0), ObjectId(d.fileid, 0)
    assert fs.read(old_f, 0, 10)[0] == b"kept"
    assert fs.getattr(old_f).size == 4
    fs.write(old_f, 4, memoryview(b"!"), StableHow.FILE_SYNC)
    assert fs.lookup(old_d, "f") == f
    assert fs.getattr(ObjectId(root.fileid, 0)).fileid == root.fileid
    restarted = LocalFS(fs.base)  # and after a restart, through the tree search
    assert restarted.read(old_f, 0, 10)[0] == b"kept!"
    assert restarted.read(f, 0, 10)[0] == b"kept!"


def test_generations_are_stable_for_every_type(fs: LocalFS) -> None:
    root = fs.root()
    d = fs.mkdir(root, "d", SetAttr(), CRED)
    f = create(fs, d, "f")
    ln = fs.symlink(d, "ln", "f", SetAttr(), CRED)
    for obj, name in ((d, None), (f, "f"), (ln, "ln")):
        assert obj.generation != 0
        if name:
            assert fs.lookup(d, name) == obj
        assert LocalFS(fs.base).getattr(obj).fileid == obj.fileid
    assert fs.parent(d) == root
    assert dict(fs.listing(d)) == {"f": f, "ln": ln}
    assert fs.readlink(ln) == "f"


def test_a_tree_deeper_than_one_openat2_path_is_usable_and_removable(fs: LocalFS) -> None:
    names = [f"{i:02d}" + "x" * 253 for i in range(20)]  # 20 levels of 255-byte names: 5120 bytes > PATH_MAX
    dirs = [fs.root()]
    for n in names:
        dirs.append(fs.mkdir(dirs[-1], n, SetAttr(), CRED))
    f = create(fs, dirs[-1], "leaf")
    fs.write(f, 0, memoryview(b"deep"), StableHow.FILE_SYNC)
    restarted = LocalFS(fs.base, use_openat2=fs._openat2)  # placed again by a search walking the whole depth
    assert restarted.read(f, 0, 10)[0] == b"deep"
    assert restarted.lookup(dirs[-1], "leaf") == f
    for d in dirs[1:]:
        assert fs.getattr(d).fileid == d.fileid
    fs.remove(dirs[-1], "leaf")
    for parent, n in reversed(list(zip(dirs, names, strict=False))):
        fs.rmdir(parent, n)
    assert os.listdir(fs.base) == []


def test_depth_beyond_max_depth_is_refused_when_created(fs: LocalFS, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nfsd.localfs, "MAX_DEPTH", 3)
    d = fs.root()
    for n in ("a", "b", "c"):
        d = fs.mkdir(d, n, SetAttr(), CRED)
    for make in (
        lambda: fs.mkdir(d, "d", SetAttr(), CRED),
        lambda: create(fs, d, "f"),
        lambda: fs.symlink(d, "s", "x", SetAttr(), CRED),
    ):
        with pytest.raises(NFSError) as exc:
            make()
        assert exc.value.status == Status.NAMETOOLONG and "3 levels" in str(exc.value)
    assert os.listdir(fs.base / "a" / "b" / "c") == []


def test_the_datastore_passes_generations_through(tmp_path: Path) -> None:
    ds = DatastoreBackend(tmp_path / "datastore")
    (tmp_path / "session" / "files").mkdir(parents=True)
    ds.add_folder(1, "vm01", SessionFolder(tmp_path / "session", {}))
    for d in (ds.root(), ds.lookup(ds.root(), "vm01")):
        a = create(ds, d, "a")
        assert ds.read(a, 0, 10)[0] == b""  # caches a's descriptor
        b = reused(ds, d, a, lambda d=d: ds.remove(d, "a"))
        ds.write(b, 0, memoryview(b"data of b"), StableHow.FILE_SYNC)
        assert a.generation != 0
        stale(ds.read, a, 0, 10)
        stale(ds.write, a, 0, memoryview(b"LATE"), StableHow.FILE_SYNC)
        assert ds.read_nowait(a, 0, 10) is None
        assert ds.read(b, 0, 10)[0] == b"data of b"
