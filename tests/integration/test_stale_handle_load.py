"""A stale handle is not a lever for making the server walk its export (issue 8).

The server places a handle it has no path for by walking the export (a handle from before a restart). A client
that removes a file and repeats its old handle, or that keeps changing files behind the server's back, must not
buy one walk per call: the real ``python -m nfsd`` over a tree of a few thousand entries, raw RPC over TCP,
the walks counted and timed from the server's own debug log, and a GETATTR of a live file timed meanwhile.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from nfsd.treesearch import SearchLimits
from nfsd.xdr import Packer
from tests.nfsd_process import PRIVATE_PORTS, NfsdProcess
from tests.rpcclient import RpcClient

VERBOSE = (*PRIVATE_PORTS, "-v")  # the walks are logged at debug level
DIRS, FILES = 40, 100  # 4,040 entries
OK, STALE, JUKEBOX = 0, 70, 10008
WALK = re.compile(r"handle search for object (\d+) walked (\d+) entries in ([0-9.]+) s")


class Nfs:
    def __init__(self, server: NfsdProcess) -> None:
        self.root = RpcClient("127.0.0.1", server.mount_port).mount(str(server.directory))
        self.c = RpcClient("127.0.0.1", server.nfs_port)

    def lookup(self, *names: str) -> bytes:
        fh = self.root
        for name in names:
            u = self.c.call(100003, 3, 3, Packer().opaque(fh).string(name).bytes())
            assert u.u32() == OK, f"LOOKUP {name}"
            fh = bytes(u.opaque(64))
        return fh

    def getattr(self, fh: bytes) -> int:
        return self.c.call(100003, 3, 1, Packer().opaque(fh).bytes()).u32()

    def remove(self, d: bytes, name: str) -> int:
        return self.c.call(100003, 3, 12, Packer().opaque(d).string(name).bytes()).u32()


def walks(server: NfsdProcess) -> list[float]:
    """The duration of every walk the server logged so far."""
    return [float(m[3]) for m in WALK.finditer(server.log())]


class LiveProbe(threading.Thread):
    """GETATTRs of a live file on its own connection, as ESXi's heartbeat, timing the slowest."""

    def __init__(self, server: NfsdProcess, path: tuple[str, ...]) -> None:
        super().__init__(daemon=True)
        self.nfs = Nfs(server)
        self.fh = self.nfs.lookup(*path)
        self.stop = threading.Event()
        self.slowest, self.calls, self.failures = 0.0, 0, []

    def run(self) -> None:
        while not self.stop.is_set() and self.calls < 100_000:
            t = time.monotonic()
            st = self.nfs.getattr(self.fh)
            self.slowest = max(self.slowest, time.monotonic() - t)
            self.calls += 1
            if st != OK:
                self.failures.append(st)
            time.sleep(0.005)

    def finish(self) -> None:
        self.stop.set()
        self.join(10)


@pytest.fixture
def export(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    for d in range(DIRS):
        (root / f"d{d}").mkdir(parents=True)
        for f in range(FILES):
            (root / f"d{d}" / f"f{f}").write_bytes(b"x")
    return root


def test_a_removed_files_handle_repeated_costs_no_walks(export: Path) -> None:
    with NfsdProcess(export, *VERBOSE) as first:
        nfs = Nfs(first)
        old = nfs.lookup("d20", "f50")
        victim_dir, victim = nfs.lookup("d39"), nfs.lookup("d39", "f99")
    with NfsdProcess(export, *VERBOSE, secret=first.secret) as server:  # a restart
        nfs = Nfs(server)
        assert nfs.getattr(old) == OK, "a handle from before the restart must resolve"
        assert nfs.getattr(victim) == OK and len(walks(server)) == 1, "one walk places every old handle"
        one_walk = walks(server)[0]
        assert nfs.remove(victim_dir, "f99") == OK
        probe = LiveProbe(server, ("d0", "f0"))
        probe.start()
        n = 300
        t = time.monotonic()
        answers = [nfs.getattr(victim) for _ in range(n)]
        elapsed = time.monotonic() - t
        probe.finish()
        assert answers == [STALE] * n
        assert len(walks(server)) <= 2, f"{len(walks(server)) - 1} walks for {n} calls with a stale handle"
        assert elapsed < n * one_walk / 4, f"{n} stale GETATTRs took {elapsed:.2f} s; one walk takes {one_walk} s"
        assert probe.calls > 0 and not probe.failures and probe.slowest < 1.0


def test_changes_behind_the_servers_back_buy_a_bounded_share_of_walking(export: Path) -> None:
    """Each file removed on the host, then its handle used twice: the first use finds the path gone (the tree
    changed behind the server's back), the second needs a walk. Walks must stay within the duty cycle."""
    with NfsdProcess(export, *VERBOSE) as server:
        nfs = Nfs(server)
        nfs.getattr(nfs.lookup("d0"))
        probe = LiveProbe(server, ("d0", "f0"))
        probe.start()
        answers: set[int] = set()
        rounds = 0
        t = time.monotonic()
        while time.monotonic() - t < 3 and rounds < DIRS * (FILES - 1):
            d, f = divmod(rounds, FILES - 1)
            fh = nfs.lookup(f"d{d}", f"f{f + 1}")
            (export / f"d{d}" / f"f{f + 1}").unlink()
            answers |= {nfs.getattr(fh), nfs.getattr(fh)}
            rounds += 1
        elapsed = time.monotonic() - t
        probe.finish()
        done = walks(server)
        assert answers <= {STALE, JUKEBOX} and STALE in answers, answers
        assert rounds >= 10 and len(done) >= 2, f"{rounds} rounds, {len(done)} walks: the test proves nothing"
        budget = SearchLimits().duty * elapsed + max(done) + 0.05
        assert sum(done) <= budget, f"{len(done)} walks took {sum(done):.2f} s of {elapsed:.2f} s for {rounds} rounds"
        assert probe.calls > 0 and not probe.failures and probe.slowest < 1.0
