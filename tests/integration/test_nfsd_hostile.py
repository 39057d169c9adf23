"""Hostile clients cannot exhaust the NFS daemon (STYLE.md rule 14, nfsd/limits.py): a real `python -m nfsd`
process, attacked over raw sockets, keeps answering other clients (raw RPC and libnfs' nfs-cat) within a
second, and its memory, descriptors and log stay bounded. Every loop here is bounded in count and time."""

from __future__ import annotations

import resource
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfsd.xdr import Packer, Unpacker
from tests.nfsd_process import PRIVATE_PORTS, NfsdProcess
from tests.rpcclient import RpcClient, auth_sys, call_bytes, record

NFS, MOUNT, PMAP = 100003, 100005, 100000
MiB = 1 << 20


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def client(port: int, source: str = "127.0.0.1", timeout: float = 5.0) -> RpcClient:
    """An RpcClient whose connection comes from ``source`` (any 127.x address: another client)."""
    c = RpcClient.__new__(RpcClient)
    c.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
    return c


def getattr_ok(srv: NfsdProcess, root: bytes, source: str = "127.0.0.1") -> float:
    """NULL then GETATTR on a fresh connection; returns the seconds both took."""
    t0 = time.monotonic()
    c = client(srv.nfs_port, source)
    try:
        c.call(NFS, 3, 0)
        assert c.call(NFS, 3, 1, Packer().opaque(root).bytes()).u32() == 0
    finally:
        c.close()
    return time.monotonic() - t0


def nfs_cat(srv: NfsdProcess, name: str) -> str:
    return subprocess.run(["nfs-cat", srv.url(name)], capture_output=True, text=True, timeout=20, check=True).stdout


def mount_root(srv: NfsdProcess, source: str = "127.0.0.1") -> bytes:
    c = client(srv.mount_port, source)
    try:
        return c.mount(str(srv.directory))
    finally:
        c.close()


def lookup(srv: NfsdProcess, root: bytes, name: str) -> bytes:
    c = client(srv.nfs_port)
    try:
        u = c.call(NFS, 3, 3, Packer().opaque(root).string(name).bytes())
        assert u.u32() == 0
        return bytes(u.opaque(64))
    finally:
        c.close()


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """True if the server closes (or resets) the connection within ``within`` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hostile") / "export"
    d.mkdir()
    (d / "hello.txt").write_text("hello from nfsd\n")
    (d / "big.bin").write_bytes(bytes(range(256)) * (64 * 4096))  # 64 MiB of real data
    for i in range(50):
        (d / f"file-{i:03d}-with-a-longish-name").write_text("x")
    return d


@pytest.fixture()
def server(export: Path, request: pytest.FixtureRequest) -> Iterator[NfsdProcess]:
    extra = getattr(request, "param", ())
    srv = NfsdProcess(export, *PRIVATE_PORTS, *extra).start()
    try:
        yield srv
    finally:
        srv.stop()


# --- a client that sends READs and never reads the replies --------------------------------------------------

RSS_GROWTH_BOUND_MIB = 64  # one connection may hold 2 x connection_bytes (8 MiB): 16 MiB, plus slack


def test_slow_reader_cannot_grow_memory(server: NfsdProcess) -> None:
    root = mount_root(server)
    fh = lookup(server, root, "big.bin")
    base = rss_mib(server.proc.pid)
    hog = client(server.nfs_port)
    hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.sock.settimeout(0.2)
    cred = auth_sys()
    sent = blocked = 0
    peak = base
    worst_answer = 0.0
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        batch = b"".join(
            record(
                call_bytes(sent + i, NFS, 3, 6, Packer().opaque(fh).u64(((sent + i) % 64) * MiB).u32(MiB).bytes(), cred)
            )
            for i in range(64)
        )
        try:
            hog.sock.sendall(batch)
            sent += 64
        except TimeoutError:
            blocked += 1  # the server stopped reading us: what it should do
        peak = max(peak, rss_mib(server.proc.pid))
        if peak - base > RSS_GROWTH_BOUND_MIB:
            break  # failing already; stop before the machine suffers
        if blocked and blocked % 10 == 0:
            worst_answer = max(worst_answer, getattr_ok(server, root))
    assert peak - base <= RSS_GROWTH_BOUND_MIB, f"RSS grew {peak - base:.0f} MiB after {sent} pipelined 1 MiB READs"
    assert blocked, f"the server read all {sent} calls ({sent} MiB of replies) from a client that reads nothing"
    assert worst_answer < 1.0, f"GETATTR on another connection took {worst_answer:.2f} s"
    assert getattr_ok(server, root) < 1.0
    assert nfs_cat(server, "hello.txt") == "hello from nfsd\n"
    print(f"slow reader: RSS {base:.0f} -> peak {peak:.0f} MiB; {sent} calls sent before the server stopped reading")
    hog.close()


@pytest.mark.parametrize(
    "server", [("--connection-bytes", str(4 * MiB), "--total-bytes", str(16 * MiB))], indirect=True
)
def test_many_slow_readers_are_held_to_total_bytes(server: NfsdProcess) -> None:
    """16 connections from 4 addresses that never read could hold 16 x 4 MiB of replies; together they get
    total_bytes (16 MiB). Heartbeats on another connection are answered meanwhile; READs wait for room."""
    root = mount_root(server)
    fh = lookup(server, root, "big.bin")
    base = rss_mib(server.proc.pid)
    hogs = [client(server.nfs_port, f"127.0.2.{i % 4 + 1}") for i in range(16)]
    for h in hogs:
        h.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        h.sock.settimeout(0.05)
    cred = auth_sys()
    batch = b"".join(
        record(call_bytes(i, NFS, 3, 6, Packer().opaque(fh).u64(i * MiB).u32(MiB).bytes(), cred)) for i in range(16)
    )
    peak = base
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for h in hogs:
            try:
                h.sock.sendall(batch)
            except TimeoutError:
                pass
        peak = max(peak, rss_mib(server.proc.pid))
        if peak - base > 48:
            break
    assert peak - base <= 48, f"RSS grew {peak - base:.0f} MiB with total_bytes 16 MiB"
    print(f"16 slow readers: RSS {base:.0f} -> peak {peak:.0f} MiB")
    assert getattr_ok(server, root, "127.0.0.7") < 1.0
    for h in hogs:
        h.close()
    time.sleep(0.5)
    assert nfs_cat(server, "hello.txt") == "hello from nfsd\n"  # room again once they are gone


def test_fast_pipelined_reads_still_flow(server: NfsdProcess) -> None:
    """The bounds do not starve a client that reads: 256 pipelined 1 MiB READs all arrive."""
    root = mount_root(server)
    fh = lookup(server, root, "big.bin")
    c = client(server.nfs_port, timeout=20)
    cred = auth_sys()
    c.send_raw(
        b"".join(
            record(call_bytes(i, NFS, 3, 6, Packer().opaque(fh).u64((i % 64) * MiB).u32(MiB).bytes(), cred))
            for i in range(32)
        )
    )
    got = 0
    for i in range(32, 256 + 32):
        reply = c.recv_record()
        assert len(reply) > MiB
        got += 1
        if i < 256:
            c.send_raw(record(call_bytes(i, NFS, 3, 6, Packer().opaque(fh).u64((i % 64) * MiB).u32(MiB).bytes(), cred)))
    assert got == 256
    c.close()


# --- connection counts and idle connections -----------------------------------------------------------------


@pytest.mark.parametrize("server", [("--max-connections-per-client", "4", "--max-connections", "8")], indirect=True)
def test_connections_are_capped_per_client_and_in_total(server: NfsdProcess) -> None:
    root = mount_root(server, "127.0.0.5")  # its connection may still count for a moment after it closes
    mine = [client(server.nfs_port) for _ in range(12)]
    refused = [s for s in mine if closed_by_server(s.sock, 0.5)]
    assert len(refused) == 8, f"{len(refused)} of 12 connections from one client were closed, expected 8"
    kept = [s for s in mine if s not in refused]
    for c in kept:
        c.call(NFS, 3, 0)  # the first four still work
    assert getattr_ok(server, root, "127.0.0.2") < 1.0  # another client is served
    time.sleep(0.3)  # until the server has seen that connection close
    others = [client(server.nfs_port, "127.0.0.3") for _ in range(4)]  # 4 + 4 = the total of 8
    assert not any(closed_by_server(c.sock, 0.3) for c in others)
    late = client(server.nfs_port, "127.0.0.4")
    assert closed_by_server(late.sock, 1.0), "a ninth connection was kept beyond max_connections 8"
    for c in [*mine, *others, late]:
        c.close()
    time.sleep(0.3)
    assert getattr_ok(server, root, "127.0.0.4") < 1.0  # closing frees the places
    assert nfs_cat(server, "hello.txt") == "hello from nfsd\n"


@pytest.mark.parametrize("server", [("--clients", "127.0.0.1/32")], indirect=True)
def test_connections_from_addresses_no_export_allows_are_closed(server: NfsdProcess) -> None:
    root = mount_root(server)
    stranger = client(server.nfs_port, "127.0.0.9")
    assert closed_by_server(stranger.sock, 1.0), "a connection from a network no export allows was kept"
    stranger.close()
    assert getattr_ok(server, root) < 1.0


def test_descriptor_limit_keeps_a_reserve(export: Path) -> None:
    """Under a low descriptor limit, a flood of connections is refused before the process runs out of
    descriptors: an open connection can still read a file (which needs one), and the log stays small."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (200, hard))  # the server inherits it
    try:
        srv = NfsdProcess(export, *PRIVATE_PORTS).start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    flood: list[socket.socket] = []
    try:
        root = mount_root(srv)
        fh = lookup(srv, root, "big.bin")
        kept = client(srv.nfs_port)
        before = len(srv.log())
        for i in range(400):  # 25 addresses x 16: far beyond 200 descriptors
            try:
                flood.append(
                    socket.create_connection(
                        ("127.0.0.1", srv.nfs_port), timeout=2, source_address=(f"127.0.1.{i // 16 + 1}", 0)
                    )
                )
            except OSError:
                pass
        time.sleep(0.5)
        u = kept.call(NFS, 3, 6, Packer().opaque(fh).u64(0).u32(4096).bytes())
        assert u.u32() == 0, "READ failed on an open connection: the server ran out of descriptors"
        log = srv.log()[before:]
        assert "Too many open files" not in log and "out of system resource" not in log, log[-2000:]
        assert len(log) < 4000, log[-2000:]
        kept.close()
    finally:
        for s in flood:
            s.close()
        srv.stop()


@pytest.mark.parametrize("server", [("--idle-timeout", "1")], indirect=True)
def test_idle_connections_are_closed(server: NfsdProcess) -> None:
    root = mount_root(server)
    idle = client(server.nfs_port)
    idle.call(NFS, 3, 0)
    busy = client(server.nfs_port)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # a heartbeat every 0.3 s, as ESXi does every few seconds
        busy.call(NFS, 3, 1, Packer().opaque(root).bytes())
        time.sleep(0.3)
    assert closed_by_server(idle.sock, 0.1), "a connection idle for 3 s outlived idle_timeout 1"
    busy.call(NFS, 3, 0)  # the busy one is still open
    busy.close()
    idle.close()


@pytest.mark.parametrize("server", [("--max-connections-per-client", "2", "--log-interval", "2")], indirect=True)
def test_log_stays_small_under_a_flood(server: NfsdProcess) -> None:
    root = mount_root(server)
    before = len(server.log())
    held = [client(server.nfs_port) for _ in range(2)]
    for _ in range(300):  # refused connections
        s = socket.create_connection(("127.0.0.1", server.nfs_port), timeout=2)
        s.close()
    c = client(server.nfs_port, "127.0.0.2")
    for i in range(300):  # garbage arguments, and mounts of exports that do not exist
        c.send_raw(record(call_bytes(i, NFS, 3, 1, b"\x00\x00\x10\x00", auth_sys())))
        c.recv_record()
    m = client(server.mount_port, "127.0.0.2")
    for _ in range(300):
        assert m.call(MOUNT, 3, 1, Packer().string("/nope").bytes()).u32() == 2  # MNT3ERR_NOENT
    grown = len(server.log()) - before
    assert grown < 4000, f"the log grew {grown} bytes for 900 hostile requests:\n{server.log()[-2000:]}"
    time.sleep(2.1)  # a new window: the next line says how many were left out
    c.send_raw(record(call_bytes(1, NFS, 3, 1, b"\x00\x00\x10\x00", auth_sys())))
    c.recv_record()
    assert "more like it not logged" in server.log()
    assert getattr_ok(server, root, "127.0.0.3") < 1.0
    for x in [*held, c, m]:
        x.close()


# --- UDP must not amplify -----------------------------------------------------------------------------------


def udp_call(port: int, payload: bytes) -> tuple[int, bytes]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    try:
        s.sendto(payload, ("127.0.0.1", port))
        reply, _ = s.recvfrom(1 << 17)
    finally:
        s.close()
    return len(payload), reply


def accepted_body(reply: bytes) -> Unpacker:
    u = Unpacker(reply)
    u.u32(), u.u32()
    assert u.u32() == 0, "denied"
    u.u32()
    u.opaque(400)
    assert u.u32() == 0, "not SUCCESS"
    return u


@pytest.fixture()
def pmap_server(export: Path) -> Iterator[NfsdProcess]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = NfsdProcess(
        export, "--bind", "127.0.0.1", "--nfs-port", "0", "--mount-port", "0", "--portmap-port", str(port)
    ).start()
    srv.pmap_port = port
    try:
        yield srv
    finally:
        srv.stop()


def test_udp_replies_are_small(pmap_server: NfsdProcess) -> None:
    srv = pmap_server
    root = mount_root(srv)
    fh = lookup(srv, root, "big.bin")
    worst = 0.0
    # READ of 1 MiB, READDIR and READDIRPLUS of 1 MiB: clamped
    calls = {
        "READ": call_bytes(1, NFS, 3, 6, Packer().opaque(fh).u64(0).u32(60000).bytes(), auth_sys()),
        "READ 1 MiB": call_bytes(8, NFS, 3, 6, Packer().opaque(fh).u64(0).u32(MiB).bytes(), auth_sys()),
        "READDIR": call_bytes(2, NFS, 3, 16, Packer().opaque(root).u64(0).u64(0).u32(MiB).bytes()),
        "READDIRPLUS": call_bytes(3, NFS, 3, 17, Packer().opaque(root).u64(0).u64(0).u32(MiB).u32(MiB).bytes()),
    }
    for name, payload in calls.items():
        sent, reply = udp_call(srv.nfs_port, payload)
        assert len(reply) <= 2048, f"{name} over UDP answered {len(reply)} bytes"
        worst = max(worst, len(reply) / sent)
        u = accepted_body(reply)
        assert u.u32() == 0, f"{name} failed over UDP"
    for port, payload in (
        (srv.pmap_port, call_bytes(4, PMAP, 2, 4)),  # DUMP
        (srv.mount_port, call_bytes(5, MOUNT, 3, 5)),  # EXPORT
        (srv.mount_port, call_bytes(6, MOUNT, 3, 2)),  # DUMP
    ):
        sent, reply = udp_call(port, payload)
        worst = max(worst, len(reply) / sent)
    assert worst <= 12, f"a UDP reply was {worst:.1f} times its request"
    # FSINFO over UDP tells real clients the small size; over TCP the full one
    _, reply = udp_call(srv.nfs_port, call_bytes(7, NFS, 3, 19, Packer().opaque(root).bytes()))
    u = accepted_body(reply)
    assert u.u32() == 0
    if u.bool():
        u.fixed(84)
    assert u.u32() <= 1024  # rtmax
    c = client(srv.nfs_port)
    u = c.call(NFS, 3, 19, Packer().opaque(root).bytes())
    assert u.u32() == 0
    if u.bool():
        u.fixed(84)
    assert u.u32() == MiB
    c.close()


def test_udp_flood_is_dropped_not_queued(server: NfsdProcess) -> None:
    """Thousands of READ datagrams at once: the server answers what it can and stays responsive."""
    root = mount_root(server)
    fh = lookup(server, root, "big.bin")
    base = rss_mib(server.proc.pid)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = call_bytes(1, NFS, 3, 6, Packer().opaque(fh).u64(0).u32(MiB).bytes(), auth_sys())
    for _ in range(5000):
        s.sendto(payload, ("127.0.0.1", server.nfs_port))
    s.close()
    assert getattr_ok(server, root) < 1.0
    assert rss_mib(server.proc.pid) - base < RSS_GROWTH_BOUND_MIB
