"""nfsd with real clients nobody here wrote: libnfs-utils, qemu-img/qemu-io, rpcinfo, and raw RPC over sockets."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from nfsd.xdr import Packer
from tests.nfsd_process import NfsdProcess
from tests.rpcclient import RpcClient, call_bytes, record


def sh(*cmd: str, ok: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if ok and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}): {p.stdout} {p.stderr}")
    return p


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("nfs") / "export"
    d.mkdir()
    (d / "hello.txt").write_text("hello from nfsd\n")
    (d / "sub").mkdir()
    (d / "sub" / "grüße-日本.txt").write_text("utf-8 names\n")
    rnd = random.Random(1)
    (d / "big.bin").write_bytes(rnd.randbytes(20 * 1024 * 1024 + 1536))
    return d


@pytest.fixture(scope="module")
def server(export: Path):
    with NfsdProcess(export) as srv:  # standard ports: qemu's nfs driver asks the portmapper on 111
        yield srv


def test_libnfs_ls_cat_cp_both_ways(server: NfsdProcess, export: Path, tmp_path: Path) -> None:
    listing = sh("nfs-ls", server.url()).stdout
    assert "hello.txt" in listing and "big.bin" in listing and "sub" in listing
    assert sh("nfs-ls", server.url("sub")).stdout.count("grüße-日本.txt") == 1
    assert sh("nfs-cat", server.url("hello.txt")).stdout == "hello from nfsd\n"
    assert sh("nfs-cat", server.url("sub/grüße-日本.txt")).stdout == "utf-8 names\n"
    sh("nfs-cp", server.url("big.bin"), str(tmp_path / "down.bin"))
    assert (tmp_path / "down.bin").read_bytes() == (export / "big.bin").read_bytes()
    up = tmp_path / "up.bin"
    up.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    sh("nfs-cp", str(up), server.url("uploaded-ü.bin"))
    assert (export / "uploaded-ü.bin").read_bytes() == up.read_bytes()


def test_rpcinfo_lists_our_programs(server: NfsdProcess) -> None:
    out = sh("rpcinfo", "-p", "127.0.0.1").stdout
    assert f"100003    3   tcp   {server.nfs_port}" in out
    assert f"100005    3   udp   {server.mount_port}" in out
    assert "100000    2   tcp    111" in out
    # NULL calls from rpcinfo itself, over both transports: the programs answer on UDP as on TCP
    for proto in ("-u", "-t"):
        for prog in ("100003", "100005"):
            ping = sh("rpcinfo", proto, "127.0.0.1", prog, "3").stdout
            assert f"program {prog} version 3 ready and waiting" in ping, ping


def test_qemu_img_and_qemu_io_over_nfs(server: NfsdProcess, export: Path, tmp_path: Path) -> None:
    url = server.url("disk.raw", direct=False)
    sh("qemu-img", "create", "-f", "raw", url, "64M")
    assert "virtual size: 64 MiB" in sh("qemu-img", "info", url).stdout
    pattern = []
    rnd = random.Random(2)
    for i in range(12):
        off = rnd.randrange(0, 60) * 1024 * 1024 + rnd.randrange(0, 1024) * 512
        length = rnd.choice([512, 4096, 65536, 1 << 20, 1536])
        pattern.append((off, length, 0x10 + i))
    writes = [a for off, n, v in pattern for a in ("-c", f"write -P {v} {off} {n}")]
    sh("qemu-io", "-f", "raw", *writes, url)
    reads = [a for off, n, v in pattern for a in ("-c", f"read -P {v} {off} {n}")]
    out = sh("qemu-io", "-f", "raw", *reads, url).stdout
    assert "Pattern verification failed" not in out and out.count("read ") == len(pattern)
    data = (export / "disk.raw").read_bytes()
    for off, n, v in pattern:
        assert data[off : off + n] == bytes([v]) * n
    qcow = server.url("conv.qcow2", direct=False)
    sh("qemu-img", "convert", "-O", "qcow2", str(export / "big.bin"), qcow)
    assert "No errors were found" in sh("qemu-img", "check", qcow).stdout
    sh("qemu-img", "convert", "-O", "raw", qcow, str(tmp_path / "back.raw"))
    assert (tmp_path / "back.raw").read_bytes() == (export / "big.bin").read_bytes()


def test_handles_stable_across_restart(export: Path, tmp_path: Path) -> None:
    # a private server on private ports, so the module's server keeps running
    d = tmp_path / "x"
    d.mkdir()
    (d / "f").write_text("stable")
    args = ("--nfs-port", "0", "--mount-port", "0", "--portmap-port", "0")
    srv = NfsdProcess(d, *args).start()
    try:
        c = RpcClient("127.0.0.1", srv.mount_port)
        root = c.mount(str(d))
        c.close()
        c = RpcClient("127.0.0.1", srv.nfs_port)
        u = c.call(100003, 3, 3, Packer().opaque(root).string("f").bytes())
        assert u.u32() == 0
        fh = bytes(u.opaque(64))
        assert len(fh) <= 56
        fileid_before = os.stat(d / "f").st_ino
        c.close()
    finally:
        srv.stop()
    srv = NfsdProcess(d, *args).start()
    try:
        c = RpcClient("127.0.0.1", srv.nfs_port)
        u = c.call(100003, 3, 1, Packer().opaque(fh).bytes())  # GETATTR with the old handle
        assert u.u32() == 0
        u.u32(), u.u32(), u.u32(), u.u32(), u.u32(), u.u64(), u.u64(), u.u32(), u.u32(), u.u64()
        assert u.u64() == fileid_before
        forged = bytearray(fh)
        forged[-1] ^= 1
        assert c.call(100003, 3, 1, Packer().opaque(bytes(forged)).bytes()).u32() == 10001  # BADHANDLE
        (d / "f").unlink()
        assert c.call(100003, 3, 1, Packer().opaque(fh).bytes()).u32() == 70  # STALE
        c.close()
    finally:
        srv.stop()


def test_access_control_and_read_only(tmp_path: Path) -> None:
    d = tmp_path / "ro"
    d.mkdir()
    (d / "f").write_text("x")
    args = ("--nfs-port", "0", "--mount-port", "0", "--portmap-port", "0")
    with NfsdProcess(d, *args, "--clients", "10.99.0.0/16") as srv:
        p = sh("nfs-ls", srv.url(), ok=False)
        assert p.returncode != 0 and "MNT3ERR_ACCES" in p.stderr
    with NfsdProcess(d, *args, "--read-only") as srv:
        assert sh("nfs-cat", srv.url("f")).stdout == "x"
        (tmp_path / "up").write_text("y")
        p = sh("nfs-cp", str(tmp_path / "up"), srv.url("new"), ok=False)
        assert p.returncode != 0 and not (d / "new").exists()


def test_hostile_packets_do_not_hurt_the_server(server: NfsdProcess) -> None:
    for garbage in (os.urandom(1000), b"\xff\xff\xff\xff" + os.urandom(64), record(os.urandom(300))):
        s = socket.create_connection(("127.0.0.1", server.nfs_port))
        s.sendall(garbage)
        s.close()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(os.urandom(500), ("127.0.0.1", server.nfs_port))
    s.close()
    c = RpcClient("127.0.0.1", server.nfs_port)
    c.send_raw(record(call_bytes(99, 100003, 3, 0), fragment=3))  # NULL in 3-byte fragments
    assert c.recv_record()[:4] == (99).to_bytes(4, "big")
    c.close()
    assert sh("nfs-cat", server.url("hello.txt")).stdout == "hello from nfsd\n"


def test_ports_move_when_taken_and_portmapper_tells(tmp_path: Path, server: NfsdProcess) -> None:
    # The module's server holds 2049/1058 and the portmapper; a second one must move and register with it.
    d = tmp_path / "second"
    d.mkdir()
    (d / "two.txt").write_text("second server\n")
    with NfsdProcess(d) as srv:
        assert srv.nfs_port != 2049 and srv.mount_port != 1058
        assert "is taken; using" in srv.log()
        assert "external" in srv.log()
        out = sh("rpcinfo", "-p", "127.0.0.1").stdout
        assert f"100003    3   tcp   {srv.nfs_port}" in out
        # qemu-img finds it through the portmapper alone
        assert "file format: raw" in sh("qemu-img", "info", f"nfs://127.0.0.1{d}/two.txt").stdout
    # its registrations are withdrawn when it stops
    time.sleep(0.3)
    out = sh("rpcinfo", "-p", "127.0.0.1").stdout
    assert f"tcp   {srv.nfs_port}" not in out


@pytest.mark.skipif(shutil.which("rpcbind") is None, reason="rpcbind is installed by scripts/setup.sh")
def test_registers_with_an_existing_rpcbind(tmp_path: Path, server: NfsdProcess) -> None:
    server.stop()  # free port 111 for rpcbind
    if not port_free(111):
        pytest.skip("something else holds port 111")
    sh("rpcbind", "-w")
    try:
        time.sleep(0.5)
        d = tmp_path / "withrpcbind"
        d.mkdir()
        (d / "a").write_text("via rpcbind\n")
        with NfsdProcess(d) as srv:
            assert "external" in srv.log()
            out = sh("rpcinfo", "-p", "127.0.0.1").stdout
            assert f"100003    3   tcp   {srv.nfs_port}" in out
            assert "file format: raw" in sh("qemu-img", "info", f"nfs://127.0.0.1{d}/a").stdout
    finally:
        sh("pkill", "-x", "rpcbind", ok=False)
        time.sleep(0.3)
        server.start()


def test_big_file_hash_matches(server: NfsdProcess, export: Path) -> None:
    p = subprocess.run(["nfs-cat", server.url("big.bin")], capture_output=True, timeout=60)
    why = f"nfs-cat failed after {len(p.stdout)} bytes: {p.stderr.decode()[-500:]}\n{server.log()[-2000:]}"
    assert p.returncode == 0, why
    out = p.stdout
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256((export / "big.bin").read_bytes()).hexdigest()
