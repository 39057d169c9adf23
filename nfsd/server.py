"""Starts the listeners: portmapper on 111 (or registration with one already there), MOUNT on 1058 and NFS
on 2049, each moving to the next free port when its default is taken, over TCP and UDP."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

from nfsd import portmap
from nfsd.errors import StatusMapping
from nfsd.exports import Export, ExportTable
from nfsd.handles import HandleCodec
from nfsd.limits import DEFAULT, Limits
from nfsd.listener import Connections
from nfsd.mount import MOUNT_PROGRAM, MOUNT_V3, MountV3
from nfsd.nfs3 import NFS_PROGRAM, NFS_V3, NFSv3
from nfsd.portmap import IPPROTO_TCP, IPPROTO_UDP, Mapping, PortmapV2
from nfsd.ratelog import limited
from nfsd.rpc import Budget, Dispatcher, TcpConnection, UdpEndpoint

log = logging.getLogger("nfsd")

DEFAULT_NFS_PORT = 2049
DEFAULT_MOUNT_PORT = 1058
PORT_SEARCH = 200


class PortError(OSError):
    pass


@dataclass
class Ports:
    portmap: int | None
    nfs: int
    mount: int
    portmap_external: bool = False  # another portmapper owns 111; we registered with it
    moved: list[str] = field(default_factory=list)


def _bind_pair(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """A TCP and a UDP socket on the same port, or OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    tcp = socket.socket(family, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    udp = socket.socket(family, socket.SOCK_DGRAM)
    try:
        tcp.bind((host, port))
        udp.bind((host, tcp.getsockname()[1]))
    except OSError:
        tcp.close()
        udp.close()
        raise
    tcp.listen(128)
    tcp.setblocking(False)
    udp.setblocking(False)
    return tcp, udp


def _bind_first_free(host: str, port: int, search: bool) -> tuple[socket.socket, socket.socket]:
    last: OSError | None = None
    for candidate in range(port, port + (PORT_SEARCH if search and port else 1)):
        try:
            return _bind_pair(host, candidate)
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
            last = exc
    if not search or not port:
        raise PortError(errno.EADDRINUSE, f"port {port} on {host} is taken (fixed ports: not moving): {last}")
    raise PortError(errno.EADDRINUSE, f"no free port from {port} to {port + PORT_SEARCH - 1} on {host}: {last}")


class NFSServer:
    def __init__(
        self,
        exports: list[Export],
        secret_path: Path | None = None,
        bind: str = "0.0.0.0",
        nfs_port: int = DEFAULT_NFS_PORT,
        mount_port: int = DEFAULT_MOUNT_PORT,
        portmap_port: int | None = portmap.PMAP_PORT,
        codec: HandleCodec | None = None,
        limits: Limits = DEFAULT,
        fixed_ports: bool = False,
        error_statuses: tuple[StatusMapping, ...] = (),
    ) -> None:
        """``fixed_ports``: refuse to start when the NFS or MOUNT port is taken instead of moving to the next
        free one (a firewall opened for the configured ports then always matches). ``error_statuses``: the
        backends' domain errors as (exception class, nfsstat3) pairs, this server's only."""
        if codec is None:
            codec = HandleCodec.from_file(secret_path) if secret_path else HandleCodec(__import__("os").urandom(32))
        self.table = ExportTable(codec)
        for e in exports:
            self.table.add(e)
        self.bind = bind
        self.want = (nfs_port, mount_port, portmap_port)
        self.fixed_ports = fixed_ports
        self.dispatcher = Dispatcher()
        self.nfs = NFSv3(self.table, error_statuses=error_statuses)
        self.mount = MountV3(self.table)
        self.portmap = PortmapV2()
        self.limits = limits
        limited.configure(limits.log_burst, limits.log_interval)
        self.budget = Budget(limits.total_bytes)
        self.conns = Connections(limits, self._new_connection, self._allowed)
        self.connections = self.conns.open  # changes on the event loop only (see clients())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transports: list[asyncio.BaseTransport] = []
        self._registered: list[Mapping] = []
        self.ports: Ports | None = None

    async def _listen(self, tcp: socket.socket, udp: socket.socket, exports_only: bool = True) -> None:
        """Serve both sockets; ``exports_only``: TCP connections only from addresses some export allows."""
        self.conns.listen(tcp, exports_only)
        endpoint = lambda: UdpEndpoint(self.dispatcher, self.limits)  # noqa: E731
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(endpoint, sock=udp)
        self._transports.append(transport)

    def _new_connection(self) -> TcpConnection:
        return TcpConnection(self.dispatcher, on_close=self.conns.closed, limits=self.limits, budget=self.budget)

    def _allowed(self, address: str) -> bool:
        return any(e.allows(address) for e in self.table.all())

    async def start(self) -> Ports:
        nfs_port, mount_port, pmap_port = self.want
        self._loop = asyncio.get_running_loop()
        self.conns.start()
        for program in (self.nfs, self.mount):
            self.dispatcher.register(program)
        moved = []
        nfs_socks = _bind_first_free(self.bind, nfs_port, search=not self.fixed_ports)
        mount_socks = _bind_first_free(self.bind, mount_port, search=not self.fixed_ports)
        got_nfs, got_mount = nfs_socks[0].getsockname()[1], mount_socks[0].getsockname()[1]
        if nfs_port and got_nfs != nfs_port:
            moved.append(f"NFS port {nfs_port} is taken; using {got_nfs}")
        if mount_port and got_mount != mount_port:
            moved.append(f"MOUNT port {mount_port} is taken; using {got_mount}")
        for msg in moved:
            log.warning(msg)
        await self._listen(*nfs_socks)
        await self._listen(*mount_socks, exports_only=False)  # a refused client is told MNT3ERR_ACCES here
        mappings = [
            Mapping(NFS_PROGRAM, NFS_V3, IPPROTO_TCP, got_nfs),
            Mapping(NFS_PROGRAM, NFS_V3, IPPROTO_UDP, got_nfs),
            Mapping(MOUNT_PROGRAM, MOUNT_V3, IPPROTO_TCP, got_mount),
            Mapping(MOUNT_PROGRAM, MOUNT_V3, IPPROTO_UDP, got_mount),
        ]
        external = False
        got_pmap: int | None = None
        if pmap_port is not None:
            pm_socks = await self._portmap_port(pmap_port, mappings)
            if pm_socks is None:
                log.info("portmapper on %d is another program's; registered with it", pmap_port)
                external, got_pmap = True, pmap_port
            else:
                self.dispatcher.register(self.portmap)
                got_pmap = pm_socks[0].getsockname()[1]
                self.portmap.set(Mapping(portmap.PMAP_PROGRAM, portmap.PMAP_V2, IPPROTO_TCP, got_pmap))
                self.portmap.set(Mapping(portmap.PMAP_PROGRAM, portmap.PMAP_V2, IPPROTO_UDP, got_pmap))
                for m in mappings:
                    self.portmap.set(m)
                await self._listen(*pm_socks, exports_only=False)
        self.ports = Ports(got_pmap, got_nfs, got_mount, external, moved)
        return self.ports

    async def _portmap_port(self, port: int, mappings: list[Mapping]) -> tuple[socket.socket, socket.socket] | None:
        """Take the portmapper's port (its sockets), or, when another portmapper (rpcbind) owns it, register
        ``mappings`` with that one (None). An owner that goes away between the two (rpcbind restarting, another
        appliance stopping) leaves the port free again: try to take it once more rather than fail."""
        for attempt in range(3):
            try:
                return _bind_pair(self.bind, port)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
            try:
                for m in mappings:
                    await asyncio.to_thread(portmap.remote_unset, m, "127.0.0.1", port)
                for m in mappings:
                    if await asyncio.to_thread(portmap.remote_set, m, "127.0.0.1", port):
                        self._registered.append(m)
                return None
            except (ConnectionRefusedError, ConnectionResetError) as exc:
                log.warning("portmapper port %d: taken, but its owner does not answer (%s); retrying", port, exc)
                self._registered.clear()
                await asyncio.sleep(0.2 * (attempt + 1))
        raise PortError(errno.EADDRINUSE, f"portmapper port {port} is taken by a program that does not answer")

    async def stop(self) -> None:
        for m in self._registered:
            try:
                await asyncio.to_thread(portmap.remote_unset, m, "127.0.0.1", self.ports.portmap)
            except OSError:
                pass
        self._registered.clear()
        self.conns.close()
        await asyncio.sleep(0)  # let the connections' connection_lost run
        for t in self._transports:
            t.close()
        self._transports.clear()
        self.nfs.close()
        for e in self.table.all():
            e.backend.close()

    def clients(self) -> list[dict]:
        """Connected clients and mounts, for the admin page. Safe from any thread: the connection and mount
        sets change on the event loop, so another thread gets a snapshot taken there."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running() or _on_loop(loop):
            return self._clients_snapshot()
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def snapshot() -> None:
            try:
                fut.set_result(self._clients_snapshot())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                fut.set_exception(exc)

        loop.call_soon_threadsafe(snapshot)
        return fut.result(timeout=10)

    def _clients_snapshot(self) -> list[dict]:
        by_addr: dict[str, dict] = {}
        for conn in self.connections:
            entry = by_addr.setdefault(conn.address[0], {"address": conn.address[0], "connections": 0, "calls": 0})
            entry["connections"] += 1
            entry["calls"] += conn.calls
        for client, path in self.mount.mounts:
            by_addr.setdefault(client, {"address": client, "connections": 0, "calls": 0}).setdefault(
                "mounts", []
            ).append(path)
        return sorted(by_addr.values(), key=lambda e: e["address"])


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
