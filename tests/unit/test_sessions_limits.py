"""The rules under the control plane's bounds: confined output paths, the one place verification patterns are
compiled, and the cap on concurrent verifications."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest

from appliance.errors import LimitExceededError, OutputExistsError, PathNotAllowedError, UsageError
from appliance.sessions.confine import ConfinedDir, split_beneath
from appliance.verification import MAX_EXPECT, Verifications, compile_expect


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_paths_are_checked_lexically_against_the_roots(tmp_path: Path) -> None:
    root = tmp_path / "m"
    assert split_beneath([root], str(root / "a" / "b.raw"), "output") == (root, ["a", "b.raw"])
    assert split_beneath([root], "rel/x.raw", "output") == (root, ["rel", "x.raw"])  # under the first root
    assert split_beneath([tmp_path / "other", root], str(root), "output") == (root, [])
    for bad, message in [
        (str(tmp_path / "elsewhere"), "outside the allowed"),
        (f"{root}/../m2/x", "'..'"),
        (str(tmp_path / "m2" / "x"), "outside the allowed"),
        ("", "not a path"),
    ]:
        with pytest.raises(PathNotAllowedError, match=message):
            split_beneath([root], bad, "output")
    with pytest.raises(PathNotAllowedError, match="no directory is configured"):
        split_beneath([], "/x", "output")


def test_a_root_reached_through_the_operators_own_link_is_accepted(tmp_path: Path) -> None:
    real = tmp_path / "data"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    d = ConfinedDir.open([tmp_path / "link"], str(real / "sub"), "output")  # what `Path.resolve` gives the CLI
    d.close()
    assert mode(real / "sub") == 0o700


def test_walks_never_follow_links_and_creation_never_overwrites(tmp_path: Path) -> None:
    root, outside = tmp_path / "m", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "ln").symlink_to(outside)
    with pytest.raises(PathNotAllowedError, match="symbolic link"):
        ConfinedDir.open([root], str(root / "ln" / "deeper"), "output")
    assert list(outside.iterdir()) == []
    d = ConfinedDir.open([root], str(root / "a" / "b"), "output")
    try:
        assert mode(root / "a") == 0o700 and mode(root / "a" / "b") == 0o700
        f = d.create("disk.raw", overwrite=False, what="output")
        os.write(f.fd, b"one")
        f.commit()
        assert mode(root / "a" / "b" / "disk.raw") == 0o600
        with pytest.raises(OutputExistsError, match="exists; ask for overwrite"):
            d.create("disk.raw", overwrite=False, what="output")
        (outside / "t").write_bytes(b"theirs")
        (root / "a" / "b" / "ln.raw").symlink_to(outside / "t")
        f = d.create("ln.raw", overwrite=True, what="output")
        os.write(f.fd, b"mine")
        f.commit()
        assert (root / "a" / "b" / "ln.raw").read_bytes() == b"mine" and (outside / "t").read_bytes() == b"theirs"
        for bad in ("..", "a/b", ""):
            with pytest.raises(PathNotAllowedError, match="not a plain file name"):
                d.create(bad, overwrite=True, what="output")
    finally:
        d.close()


def test_expect_patterns_are_matched_in_linear_time() -> None:
    pattern = compile_expect("(.|.)*XYZ")
    text = "bootback console line without the pattern\n" * 25_000  # 1 MB
    done = threading.Event()
    threading.Thread(target=lambda: (pattern.search(text), done.set()), daemon=True).start()
    assert done.wait(2.0), "a backtracking engine: the match never ends"
    assert pattern.search(text + "XYZ")
    with pytest.raises(UsageError, match="RE2 accepts.*backreferences"):
        compile_expect(r"(a)\1")
    with pytest.raises(UsageError, match="RE2 accepts"):
        compile_expect(r"foo(?=bar)")
    with pytest.raises(UsageError, match=f"at most {MAX_EXPECT} characters, got {MAX_EXPECT + 1}"):
        compile_expect("a" * (MAX_EXPECT + 1))
    with pytest.raises(UsageError, match="a string, got int"):
        compile_expect(5)  # type: ignore[arg-type]
    assert compile_expect(None) is None


def test_concurrent_verifications_and_their_memory_are_capped(tmp_path: Path) -> None:
    release = threading.Event()

    def publish(**kw: object) -> list[dict]:
        release.wait(10)
        raise UsageError("no guest in this test")

    v = Verifications(tmp_path, publish, lambda **kw: None, max_running=2, max_memory_mib=2048)
    try:
        jobs = [v.start("web01"), v.start("web02")]
        with pytest.raises(LimitExceededError, match="2 verifications are running"):
            v.start("web03")
        with pytest.raises(UsageError, match="memory_mib: between 128 and 2048, got 4096"):
            v.start("web03", memory_mib=4096)
        with pytest.raises(UsageError, match="timeout: a number"):
            v.start("web03", timeout="10")  # type: ignore[arg-type]
    finally:
        release.set()
    deadline = time.monotonic() + 10
    while any(v.get(j["id"])["state"] == "running" for j in jobs):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert v.start("web03")["state"] == "running", "a finished job frees its place"
