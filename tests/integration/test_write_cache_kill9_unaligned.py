"""kill -9 of the real daemon with UNSTABLE unaligned writes never COMMITted: their copy-ins' map changes wait in
the pending log, which the restarted daemon replays (same boot: the page cache kept the data), so the disk reads
back as written, not as the backup, and the backup never changes."""

from __future__ import annotations

import json
import random
import signal
import socket
from pathlib import Path

import pytest

from tests.daemon_process import DaemonProcess, bootback, tree_hash
from tests.nfsd_process import PRIVATE_PORTS
from tests.rpcclient import NfsDir

MiB = 1 << 20


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("kill9-unaligned")
    (base / "vm.raw").write_bytes(random.Random(21).randbytes(4 * MiB))
    path = base / "repo"
    bootback("init", path)
    bootback("backup", path, "--vm", "vm", base / "vm.raw")
    return path


def _nfs(d: DaemonProcess, doc: dict) -> tuple[NfsDir, bytes]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(d.state / "control.sock"))
        s.sendall(b'{"op": "status"}\n')
        buf = b""
        while not buf.endswith(b"\n") and (chunk := s.recv(65536)):
            buf += chunk
    p = json.loads(buf)["result"]["ports"]
    nfs = NfsDir(p["mount"], p["nfs"], doc["path"])
    return nfs, nfs.lookup(next(f for f in doc["files"] if f.endswith("-flat.vmdk")))


def test_unstable_unaligned_writes_survive_kill_9_uncommitted(repo: Path, tmp_path: Path) -> None:
    before = tree_hash(repo)
    d = DaemonProcess(repo, tmp_path / "state", *PRIVATE_PORTS).start()
    doc = d.publish("vm", mode="instant")
    nfs, fh = _nfs(d, doc)
    rnd = random.Random(22)
    model = bytearray(nfs.read_all(fh, 0, 4 * MiB))
    for _ in range(60):  # cut sectors of blocks still in the backup: each copies bytes in
        off, data = rnd.randrange(0, 4 * MiB - 70_000), rnd.randbytes(rnd.choice([1, 100, 3000, 5000, 70_000]))
        assert nfs.write(fh, off, data, stable=0) == 0
        model[off : off + len(data)] = data
    d.proc.send_signal(signal.SIGKILL)  # no COMMIT: the map changes are only in the log
    d.proc.wait()
    d.start()
    try:
        nfs, fh = _nfs(d, doc)
        assert nfs.read_all(fh, 0, 4 * MiB) == bytes(model)
    finally:
        d.stop()
    assert tree_hash(repo) == before
