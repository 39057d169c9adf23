"""READDIR cookie paging, the one helper every backend uses (nfsd.vfs.readdir_page, STYLE.md rule 15)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.datastore.backend import DatastoreBackend
from nfsd.localfs import LocalFS
from nfsd.vfs import Backend, NFSError, ObjectId, ReadDirResult, Status, names_verifier, readdir_page

DIR, PARENT = ObjectId(10), ObjectId(1)
NAMES = [f"n{i:03d}" for i in range(100)]
V = names_verifier(NAMES)


def objects(i: int, name: str) -> ObjectId:
    return ObjectId(1000 + i)


def page(
    cookie: int,
    verifier: int = 0,
    count: int = 0,
    names: list[str] = NAMES,
    resolve=objects,  # noqa: ANN001
) -> ReadDirResult:
    return readdir_page(DIR, PARENT, names, cookie, verifier, count, resolve)


def test_first_page_has_dot_dotdot_then_names_with_their_cookies() -> None:
    res = page(0, count=16 * 20)
    assert [(e.name, e.obj, e.cookie) for e in res.entries[:3]] == [
        (".", DIR, 1),
        ("..", PARENT, 2),
        ("n000", ObjectId(1000), 3),
    ]
    assert len(res.entries) == 20 and not res.eof and res.verifier == V
    assert [e.cookie for e in res.entries] == list(range(1, 21))


@pytest.mark.parametrize("count", [0, 16 * 16, 16 * 17, 16 * 33, 4096, 1 << 20])
def test_paging_from_each_last_cookie_yields_every_name_once_in_order(count: int) -> None:
    seen, cookie, pages = [], 0, 0
    while True:
        res = page(cookie, verifier=V if cookie else 0, count=count)
        assert len(res.entries) <= max(count // 16, 16)
        seen += [e.name for e in res.entries]
        pages += 1
        if res.eof:
            break
        assert res.entries, "an empty page that is not the end would loop forever"
        cookie = res.entries[-1].cookie
    assert seen == [".", "..", *NAMES]
    assert pages == -(-(len(NAMES) + 2) // max(count // 16, 16))


def test_the_page_that_ends_exactly_at_the_last_name_says_eof() -> None:
    assert page(2 + 84, verifier=V, count=16 * 16).eof  # names 84..99: 16 entries, the last ones
    assert not page(2 + 83, verifier=V, count=16 * 16).eof
    assert page(500, verifier=V).entries == [] and page(500, verifier=V).eof  # past the end


def test_the_verifier_follows_the_names_exactly() -> None:
    renamed = [*NAMES[:50], "n050-renamed", *NAMES[51:]]
    for changed in (NAMES[:-1], [*NAMES, "n100"], renamed, ["", *NAMES]):
        assert names_verifier(changed) != V
        with pytest.raises(NFSError) as e:
            page(5, verifier=V, names=changed)  # a cookie from before the change
        assert e.value.status == Status.BAD_COOKIE and "10" in str(e.value)
    assert names_verifier(list(NAMES)) == V and page(5, verifier=V).entries[0].cookie == 6  # unchanged: accepted
    assert names_verifier(["ab", "c"]) != names_verifier(["a", "bc"]) and names_verifier([]) != 0
    assert names_verifier(["caf\udce9"]) != names_verifier(["caf\udce8"])  # names that are not UTF-8
    assert page(0, verifier=V + 1).entries[0].name == "."  # cookie 0 starts over whatever the verifier
    assert page(5, verifier=0).entries[0].cookie == 6  # no verifier: nothing to check


def test_only_the_page_is_resolved_and_vanished_names_keep_the_others_cookies() -> None:
    asked: list[int] = []

    def resolve(i: int, name: str) -> ObjectId | None:
        asked.append(i)
        return None if name == "n021" else ObjectId(1000 + i)

    res = page(2 + 20, verifier=V, count=16 * 16, resolve=resolve)
    assert asked == list(range(20, 36))
    assert [(e.name, e.cookie) for e in res.entries[:2]] == [("n020", 23), ("n022", 25)]


def walk(backend: Backend, directory: ObjectId, count: int) -> list[str]:
    out, cookie, verifier = [], 0, 0
    while True:
        res = backend.readdir(directory, cookie, verifier, count)
        out += [e.name for e in res.entries]
        if res.eof:
            return out
        cookie, verifier = res.entries[-1].cookie, res.verifier


def test_localfs_and_the_datastore_page_alike(tmp_path: Path) -> None:
    names = sorted(f"f{i:02d}" for i in range(40))
    for d in (tmp_path / "plain", tmp_path / "ds"):
        d.mkdir()
        for n in names:
            (d / n).write_bytes(b"")
    fs, ds = LocalFS(tmp_path / "plain"), DatastoreBackend(tmp_path / "ds")
    assert walk(fs, fs.root(), 16 * 16) == walk(ds, ds.root(), 16 * 16) == [".", "..", *names]
    first = ds.readdir(ds.root(), 0, 0, 16 * 16)
    (tmp_path / "ds" / "new").write_bytes(b"")
    with pytest.raises(NFSError) as e:
        ds.readdir(ds.root(), first.entries[-1].cookie, first.verifier, 16 * 16)
    assert e.value.status == Status.BAD_COOKIE


def test_the_datastore_looks_up_only_the_names_of_the_page(tmp_path: Path) -> None:
    """A page of a big directory must not cost a stat of every entry (a client can make directories big)."""
    root = tmp_path / "ds"
    root.mkdir()
    for i in range(500):
        (root / f"f{i:04d}").write_bytes(b"")
    ds = DatastoreBackend(root)
    res = ds.readdir(ds.root(), 0, 0, 16 * 16)
    assert [e.name for e in res.entries[2:4]] == ["f0000", "f0001"] and not res.eof
    assert len(ds.rootfs._where) <= 16, f"{len(ds.rootfs._where)} entries looked up for a page of 16"
    (root / "f0005").unlink()  # the names changed: the old verifier is refused
    with pytest.raises(NFSError) as e:
        ds.readdir(ds.root(), res.entries[-1].cookie, res.verifier, 16 * 16)
    assert e.value.status == Status.BAD_COOKIE
