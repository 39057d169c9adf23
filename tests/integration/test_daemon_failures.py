"""The daemon under failure: bad control requests, too little cache space, a cache that fills up while a guest
writes, and kill -9 with acknowledged writes in flight. Nothing acknowledged is lost; the backup never changes."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.daemon_process import DaemonProcess, bootback, tree_hash
from tests.nfsd_process import PRIVATE_PORTS
from tests.rpcclient import NfsDir

NFS3ERR_NOSPC = 28
MiB = 1 << 20


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("failures")
    rnd = random.Random(11)
    for vm in ("app01", "app02", "app03"):
        disk = base / f"{vm}.raw"
        disk.write_bytes(rnd.randbytes(3 * MiB) + bytes(MiB))
    path = base / "repo"
    bootback("init", path)
    for vm in ("app01", "app02", "app03"):
        bootback("backup", path, "--vm", vm, base / f"{vm}.raw")
    return path


def ports(d: DaemonProcess) -> dict:
    return json.loads(control(d, {"op": "status"}))["result"]["ports"]


def control(d: DaemonProcess, request: dict | bytes) -> bytes:
    raw = request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n"
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(d.state / "control.sock"))
        s.sendall(raw)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return buf


def extent_of(doc: dict) -> str:
    return next(f for f in doc["files"] if f.endswith("-flat.vmdk"))


def test_bad_control_requests_get_clear_errors_and_the_daemon_keeps_serving(repo: Path, tmp_path: Path) -> None:
    d = DaemonProcess(repo, tmp_path / "state", *PRIVATE_PORTS).start()
    try:
        cases = {
            b"this is not json\n": "malformed request",
            b"[1, 2]\n": "malformed request",
            b'{"op": 5}\n': "malformed request",
            b'{"op": "explode"}\n': "unknown operation 'explode'",
            b'{"op": "publish", "params": []}\n': "'params' must be an object",
            b'{"op": "publish", "params": {"vm": "app01", "bogus": 1}}\n': "bad parameters for publish",
            b'{"op": "publish", "params": {"vm": "app01", "mode": "live"}}\n': "mode must be one of",
            b'{"op": "stop", "params": {"id": "nope"}}\n': "no session 'nope'",
        }
        for raw, message in cases.items():
            doc = json.loads(control(d, raw))
            assert message in doc["error"]["message"], (raw, doc)
        assert json.loads(control(d, {"op": "status"}))["result"]["sessions"] == 0
        # the CLI turns them into exit codes
        p = d.cli("stop", "nope", ok=False)
        assert p.returncode == 41 and "no session 'nope'" in p.stderr
    finally:
        d.stop()
    assert d.proc.returncode == 0


def test_publish_refused_below_the_minimum_free_space(repo: Path, tmp_path: Path) -> None:
    before = tree_hash(repo)
    d = DaemonProcess(repo, tmp_path / "state", *PRIVATE_PORTS, "--min-free", "1000T").start()
    try:
        p = d.cli("publish", "app01", ok=False)
        assert p.returncode == 30 and "below the minimum" in p.stderr, p.stderr
        assert json.loads(d.cli("sessions", "--json").stdout) == []
        cache = tmp_path / "state" / "cache"
        assert not cache.exists() or not any(cache.iterdir()), "a refused publish left a cache behind"
    finally:
        d.stop()
    assert tree_hash(repo) == before


def test_mass_publish_isolates_sessions(repo: Path, tmp_path: Path) -> None:
    d = DaemonProcess(repo, tmp_path / "state", *PRIVATE_PORTS).start()
    try:
        docs = d.publish("app01", "app02", "app03", "app01", mode="sandbox")
        assert [x["vm"] for x in docs] == ["app01", "app02", "app03", "app01"]
        assert len({x["folder"] for x in docs}) == 4
        p = ports(d)
        first, second = NfsDir(p["mount"], p["nfs"], docs[0]["path"]), NfsDir(p["mount"], p["nfs"], docs[3]["path"])
        fh1, fh2 = first.lookup(extent_of(docs[0])), second.lookup(extent_of(docs[3]))
        assert first.write(fh1, 0, b"only in session one") == 0
        assert first.read(fh1, 0, 19) == b"only in session one"
        backup = (repo.parent / "app01.raw").read_bytes()[:19]
        assert backup != b"only in session one"
        assert second.read(fh2, 0, 19) == backup  # same restore point, its own cache: the backup's bytes
    finally:
        d.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_cache_answers_nospc_and_keeps_what_was_written(repo: Path, tmp_path: Path) -> None:
    before = tree_hash(repo)
    small = tmp_path / "small-cache"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    allowed = ("--cache-dir", str(tmp_path / "state" / "cache"), "--cache-dir", str(small))  # default, then others
    d = DaemonProcess(repo, tmp_path / "state", *PRIVATE_PORTS, *allowed).start()
    try:
        doc = d.publish("app01", mode="instant", extra=("--cache", str(small)))
        p = ports(d)
        nfs = NfsDir(p["mount"], p["nfs"], doc["path"])
        fh = nfs.lookup(extent_of(doc))
        written: list[tuple[int, bytes]] = []
        status = 0
        for i in range(64):  # 64 x 64 KiB blocks: four times what the tmpfs holds
            data = bytes([i + 1]) * 65536
            status = nfs.write(fh, i * 65536, data)
            if status != 0:
                break
            written.append((i * 65536, data))
        assert status == NFS3ERR_NOSPC, f"expected NFS3ERR_NOSPC, got {status}"
        assert written, "some writes must have fit"
        for off, data in written:  # everything acknowledged is intact
            assert nfs.read(fh, off, 65536) == data
        assert "app01" in d.cli("sessions").stdout  # the daemon still serves
        warnings = json.loads(control(d, {"op": "status"}))["result"]["cache_warnings"]
        assert str(small) in warnings, warnings  # and says that this cache is short of space
        assert "may soon get NFS3ERR_NOSPC" in d.log()
    finally:
        d.stop()
        subprocess.run(["umount", str(small)], check=False)
    assert tree_hash(repo) == before


def test_kill_9_keeps_acknowledged_writes(repo: Path, tmp_path: Path) -> None:
    """FILE_SYNC writes, and UNSTABLE writes once COMMITted, survive SIGKILL of the daemon."""
    before = tree_hash(repo)
    d = DaemonProcess(repo, tmp_path / "state", *PRIVATE_PORTS).start()
    doc = d.publish("app02", mode="instant")
    p = ports(d)
    nfs = NfsDir(p["mount"], p["nfs"], doc["path"])
    fh = nfs.lookup(extent_of(doc))
    rnd = random.Random(12)
    model = bytearray(nfs.read_all(fh, 0, 4 * MiB))
    for i in range(40):
        off, data = rnd.randrange(0, 4 * MiB - 70_000), rnd.randbytes(rnd.choice([512, 4096, 65536, 70_000]))
        assert nfs.write(fh, off, data, stable=2 if i % 2 else 0) == 0
        model[off : off + len(data)] = data
        if i % 10 == 9:
            assert nfs.commit(fh) == 0
    assert nfs.commit(fh) == 0  # from here on every write is acknowledged as stable
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    d.start()
    try:
        assert [s["id"] for s in json.loads(d.cli("sessions", "--json").stdout)] == [doc["id"]]
        p = ports(d)
        nfs = NfsDir(p["mount"], p["nfs"], doc["path"])
        assert nfs.read_all(nfs.lookup(extent_of(doc)), 0, 4 * MiB) == bytes(model)
    finally:
        d.stop()
    assert tree_hash(repo) == before


def test_an_empty_repository_directory_serves_new_repositories_as_they_appear(tmp_path: Path) -> None:
    """A fresh appliance has no backups yet: it starts, says so, and serves a repository created later
    (as the fleet role or an operator does) without a restart; a damaged one beside it is skipped, not fatal."""
    repos = tmp_path / "repositories"
    repos.mkdir()
    d = DaemonProcess(repos, tmp_path / "state", *PRIVATE_PORTS, repo_flag="--repo-dir").start()
    try:
        assert "no repository under" in d.log()
        assert json.loads(control(d, {"op": "repositories"}))["result"] == []
        err = d.cli("publish", "web01", "--mode", "sandbox", ok=False)
        assert err.returncode != 0 and "no repository is served yet" in err.stderr

        bootback("init", repos / "main")
        disk = tmp_path / "web01.raw"
        disk.write_bytes(os.urandom(2 * MiB))
        bootback("backup", repos / "main", "--vm", "web01", disk)
        (repos / "broken").mkdir()
        (repos / "broken" / "config.json").write_text('{"magic": "bootback-repository", "format": 99}')

        listed = json.loads(control(d, {"op": "repositories"}))["result"]
        assert [(r["name"], r["vms"]) for r in listed] == [("main", ["web01"])]
        doc = d.publish("web01", mode="sandbox")
        p = ports(d)
        folder = NfsDir(p["mount"], p["nfs"], doc["path"])
        assert folder.read_all(folder.lookup(extent_of(doc)), 0, 2 * MiB) == disk.read_bytes()
        control(d, {"op": "status"})
        assert d.log().count("not serving") == 1, "a refused repository is reported once, not at every look"
        assert "format 99, newer than this bootback supports" in d.log()
    finally:
        d.stop()
