"""A client's symlink never leads out of the export, over the wire (issue 8).

The attack as reported: SYMLINK esc -> /some/dir in the export (or a session folder), then use esc's handle as
a directory handle — LOOKUP, READDIR, CREATE, MKDIR, REMOVE, RENAME, LINK into it — or a link to a file as a
file handle — READ, WRITE, SETATTR size. Here the target is a canary directory beside the export; every
attempt must fail with the right nfsstat3 and the canary must be unchanged. Real servers (``python -m nfsd``
and the daemon's datastore), a raw RPC client over TCP, and libnfs-utils' ``nfs-ls``/``nfs-cat``/``nfs-cp``.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
from pathlib import Path

import pytest

from nfsd.xdr import Packer
from tests.daemon_process import EXPORT, DaemonProcess, bootback
from tests.nfsd_process import PRIVATE_PORTS, NfsdProcess
from tests.rpcclient import RpcClient

SECRET = b"canary: must never be read through the export\n"
OK, NOTDIR, INVAL = 0, 20, 22
NO_SATTR = Packer().u32(0).u32(0).u32(0).u32(0).u32(0).u32(0).bytes()  # change nothing
TRUNCATE = Packer().u32(0).u32(0).u32(0).u32(1).u64(0).u32(0).u32(0).bytes()  # size = 0


class Nfs:
    """Just the NFSv3 calls the attack uses; each returns the reply's nfsstat3 (and a handle where one comes)."""

    def __init__(self, nfs_port: int) -> None:
        self.c = RpcClient("127.0.0.1", nfs_port)

    def status(self, proc: int, args: bytes) -> int:
        return self.c.call(100003, 3, proc, args).u32()

    def symlink(self, d: bytes, name: str, target: str) -> bytes:
        u = self.c.call(
            100003, 3, 10, Packer().opaque(d).string(name).bytes() + NO_SATTR + Packer().string(target).bytes()
        )
        assert u.u32() == OK, f"SYMLINK {name} -> {target} failed"
        assert u.bool()
        return bytes(u.opaque(64))

    def readlink(self, fh: bytes) -> str:
        u = self.c.call(100003, 3, 5, Packer().opaque(fh).bytes())
        assert u.u32() == OK
        if u.bool():
            u.fixed(84)
        return u.string(4096)

    def attempts(self, root: bytes, esc: bytes, link: bytes) -> dict[str, int]:
        """Every way through ``esc`` (a symlink to the canary directory) and ``link`` (to the canary file)."""
        dirop = lambda d, n: Packer().opaque(d).string(n).bytes()  # noqa: E731
        return {
            "LOOKUP": self.status(3, dirop(esc, "secret.txt")),
            "READDIR": self.status(16, Packer().opaque(esc).u64(0).fixed(bytes(8)).u32(4096).bytes()),
            "READDIRPLUS": self.status(17, Packer().opaque(esc).u64(0).fixed(bytes(8)).u32(4096).u32(8192).bytes()),
            "CREATE": self.status(8, dirop(esc, "planted") + Packer().u32(0).bytes() + NO_SATTR),
            "MKDIR": self.status(9, dirop(esc, "planted") + NO_SATTR),
            "SYMLINK": self.status(10, dirop(esc, "planted") + NO_SATTR + Packer().string("x").bytes()),
            "REMOVE": self.status(12, dirop(esc, "secret.txt")),
            "RMDIR": self.status(13, dirop(esc, "sub")),
            "RENAME out": self.status(14, dirop(esc, "secret.txt") + dirop(root, "stolen")),
            "RENAME in": self.status(14, dirop(root, "esc") + dirop(esc, "planted")),
            "LINK": self.status(15, Packer().opaque(link).bytes() + dirop(esc, "planted")),
            "READ": self.status(6, Packer().opaque(link).u64(0).u32(4096).bytes()),
            "WRITE": self.status(7, Packer().opaque(link).u64(0).u32(5).u32(2).opaque(b"owned").bytes()),
            "SETATTR size": self.status(2, Packer().opaque(link).bytes() + TRUNCATE + Packer().u32(0).bytes()),
            "COMMIT": self.status(21, Packer().opaque(link).u64(0).u32(0).bytes()),
        }


EXPECTED = {"READ": INVAL, "WRITE": INVAL, "SETATTR size": INVAL, "COMMIT": INVAL}  # the rest: NOTDIR


class Canary:
    def __init__(self, base: Path) -> None:
        self.dir = base / "outside"
        (self.dir / "sub").mkdir(parents=True)
        self.secret = self.dir / "secret.txt"
        self.secret.write_bytes(SECRET)
        self.before = self.snapshot()

    def snapshot(self) -> list:
        return [
            (str(p), p.lstat().st_mode, p.lstat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(self.dir.rglob("*"))
        ]

    def intact(self) -> bool:
        return self.snapshot() == self.before


def sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, timeout=60)


def attack(nfs_port: int, mount_port: int, path: str, canary: Canary) -> None:
    """Plant the links in the directory mounted at ``path`` and try every way through them."""
    root = RpcClient("127.0.0.1", mount_port).mount(path)
    nfs = Nfs(nfs_port)
    esc = nfs.symlink(root, "esc", str(canary.dir))
    link = nfs.symlink(root, "link", str(canary.secret))
    assert nfs.readlink(esc) == str(canary.dir)  # links stay readable as data
    got = nfs.attempts(root, esc, link)
    assert got == {k: EXPECTED.get(k, NOTDIR) for k in got}, got
    # a link that climbs by name is just as dead
    up = nfs.symlink(root, "up", "../../" + canary.dir.name)
    assert nfs.status(3, Packer().opaque(up).string("secret.txt").bytes()) == NOTDIR
    # libnfs-utils resolve links on the client side: whatever they try, the canary stays out of reach
    url = lambda rel: f"nfs://127.0.0.1{path}/{rel}?nfsport={nfs_port}&mountport={mount_port}"  # noqa: E731
    for rel in ("esc", "up"):
        listing = sh("nfs-ls", url(rel))
        assert b"secret.txt" not in listing.stdout, listing.stdout
        cat = sh("nfs-cat", url(f"{rel}/secret.txt"))
        assert SECRET not in cat.stdout and cat.returncode != 0
    assert SECRET not in sh("nfs-cat", url("link")).stdout
    planted = canary.dir.parent / "planted.src"
    planted.write_bytes(b"planted")
    for rel in ("esc/planted", "up/planted", "link"):
        sh("nfs-cp", str(planted), url(rel))
    assert canary.intact(), sorted(p.name for p in canary.dir.iterdir())


def test_nfsd_refuses_every_way_through_a_clients_symlink(tmp_path: Path) -> None:
    canary = Canary(tmp_path)
    export = tmp_path / "export"
    export.mkdir()
    with NfsdProcess(export, *PRIVATE_PORTS) as srv:
        attack(srv.nfs_port, srv.mount_port, str(export), canary)
        assert "unexpected backend error" not in srv.log()


def control_status(d: DaemonProcess) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(d.state / "control.sock"))
        s.sendall(b'{"op": "status"}\n')
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)["result"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("escape")
    disk = base / "vm01.raw"
    disk.write_bytes(random.Random(8).randbytes(1 << 20))
    bootback("init", base / "repo")
    bootback("backup", base / "repo", "--vm", "vm01", disk)
    return base / "repo"


def test_the_daemons_datastore_root_and_session_folders_refuse_them_too(repo: Path, tmp_path: Path) -> None:
    canary = Canary(tmp_path)
    d = DaemonProcess(repo, tmp_path / "state", *PRIVATE_PORTS).start()
    try:
        ports = control_status(d)["ports"]
        attack(ports["nfs"], ports["mount"], EXPORT, canary)
        doc = d.publish("vm01", mode="sandbox")
        canary.dir.joinpath("..", "planted.src").unlink()
        attack(ports["nfs"], ports["mount"], doc["path"], canary)
        assert "unexpected backend error" not in d.log()
    finally:
        d.stop()
