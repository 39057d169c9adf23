"""LocalFS's search for inodes it has no path for is bounded (nfsd.treesearch): one walk places every handle
from before a restart, a gone object costs at most one walk until the tree changes behind our back, walks
take a bounded share of time and visit a bounded number of entries."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nfsd.localfs import LocalFS
from nfsd.treesearch import SearchLimits
from nfsd.vfs import NFSError, ObjectId, Status


def tree(base: Path, dirs: int = 10, files: int = 20) -> list[Path]:
    out = []
    for d in range(dirs):
        sub = base / f"d{d}" / "deeper"
        sub.mkdir(parents=True)
        for f in range(files):
            p = sub / f"f{f}"
            p.write_bytes(b"x")
            out.append(p)
    return out


def handle(p: Path) -> ObjectId:
    return ObjectId(p.stat().st_ino, 0)


def status(fn, *args) -> Status:  # noqa: ANN001
    try:
        fn(*args)
        return Status.OK
    except NFSError as e:
        return e.status


def test_one_walk_after_a_restart_places_every_old_handle(tmp_path: Path) -> None:
    files = tree(tmp_path)
    fresh = LocalFS(tmp_path)  # a restart: nothing known
    assert [fresh.getattr(handle(p)).fileid for p in files] == [handle(p).fileid for p in files]
    assert fresh._search.walks == 1 and fresh._search.entries == len(files) + 20


def test_a_removed_file_costs_one_walk_however_often_its_handle_comes(tmp_path: Path) -> None:
    files = tree(tmp_path)
    fs = LocalFS(tmp_path, search_limits=SearchLimits(duty=1))  # no rest between walks: count them all
    d = fs.lookup(fs.lookup(fs.lookup(fs.root(), "d3"), "deeper"), "f4")
    fs.remove(fs.lookup(fs.lookup(fs.root(), "d3"), "deeper"), "f4")  # through us
    assert [status(fs.getattr, d) for _ in range(200)] == [Status.STALE] * 200
    assert fs._search.walks == 1
    gone = fs.lookup(fs.lookup(fs.lookup(fs.root(), "d0"), "deeper"), "f0")
    os.unlink(files[0])  # behind our back: the first use notices, the next walks once more
    assert [status(fs.getattr, gone) for _ in range(200)] == [Status.STALE] * 200
    assert fs._search.walks == 2
    assert fs.getattr(handle(files[1])).size == 1  # live files are unaffected


def test_walks_take_a_bounded_share_of_time(tmp_path: Path) -> None:
    files = tree(tmp_path)
    fs = LocalFS(tmp_path, search_limits=SearchLimits(duty=0.001))  # after a walk, rest 999 times as long
    assert fs.getattr(handle(files[5])).size == 1  # first walk: allowed at once
    os.unlink(files[6])
    fs._search.invalidate()  # the tree changed behind our back
    assert status(fs.getattr, ObjectId(10**12, 0)) == Status.JUKEBOX  # "try later", not a walk
    assert fs._search.walks == 1
    assert fs.getattr(handle(files[7])).size == 1  # known objects never wait for a walk


def test_a_walk_visits_at_most_max_entries(tmp_path: Path) -> None:
    files = tree(tmp_path, dirs=4, files=50)
    fs = LocalFS(tmp_path, search_limits=SearchLimits(max_entries=30))
    results = [status(fs.getattr, handle(p)) for p in files]
    assert fs._search.entries <= 30 and fs._search.walks == 1
    assert Status.STALE in results and Status.OK in results  # found what it reached, STALE beyond


def test_an_old_walk_expires(tmp_path: Path) -> None:
    tree(tmp_path, dirs=2, files=2)
    fs = LocalFS(tmp_path, search_limits=SearchLimits(valid_for=0, duty=1))
    for _ in range(3):
        assert status(fs.getattr, ObjectId(10**12, 0)) == Status.STALE
    assert fs._search.walks == 3


@pytest.mark.parametrize("bad", [{"max_entries": 0}, {"duty": 0}, {"duty": 1.5}, {"valid_for": -1}, {"wait": -1}])
def test_bad_limits_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match="search limits"):
        SearchLimits(**bad)


def test_calls_arriving_during_a_walk_wait_for_it_and_share_its_result(tmp_path: Path) -> None:
    """After a restart a hypervisor sends many old handles at once: one walk, every one of them answered."""
    files = tree(tmp_path, dirs=20, files=100)
    fresh = LocalFS(tmp_path)
    with ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(lambda p: fresh.getattr(handle(p)).size, files[::50]))
    assert sizes == [1] * len(files[::50]) and fresh._search.walks == 1
