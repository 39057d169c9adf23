"""Accepting TCP connections within the limits (nfsd/limits.py): per client address, in total, only from
addresses an export allows, and closing idle ones.

Our own accept loop rather than ``loop.create_server``: asyncio accepts a whole backlog of sockets before any
protocol sees them, so a flood runs the process out of descriptors before a refusal could close one. Here each
socket is judged as it is accepted and a refused one is closed at once; the descriptors in use stay within
the cap plus one.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import time
from collections.abc import Callable

from nfsd.limits import Limits
from nfsd.ratelog import limited
from nfsd.rpc import TcpConnection

log = logging.getLogger("nfsd")

ACCEPT_BATCH = 32  # sockets accepted per readiness event, so accepting never starves the other work
ACCEPT_RETRY = 1.0  # seconds to stop accepting after the process ran out of descriptors
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Connections:
    """The TCP connections of one server. ``open`` changes on the event loop only."""

    def __init__(self, limits: Limits, make: Callable[[], TcpConnection], allowed: Callable[[str], bool]) -> None:
        self.limits = limits
        self.make = make  # a new connection whose on_close is ours
        self.allowed = allowed  # does some export allow this client address?
        self.open: set[TcpConnection] = set()
        self.max_total = limits.max_connections
        self._per_client: dict[str, int] = {}
        self._listeners: list[tuple[socket.socket, bool]] = []
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None

    def start(self) -> None:
        room = _descriptor_room(self.limits.fd_reserve)
        if room < self.limits.max_connections:
            log.warning(
                "the descriptor limit allows %d connections, not %d: raise it (LimitNOFILE)",
                room,
                self.limits.max_connections,
            )
        self.max_total = max(1, min(self.limits.max_connections, room))
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_idle())

    def listen(self, sock: socket.socket, exports_only: bool) -> None:
        """Accept on ``sock``; ``exports_only``: only from addresses some export allows (the NFS port)."""
        self._listeners.append((sock, exports_only))
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock, exports_only)

    def _refusal(self, address: str, exports_only: bool) -> str | None:
        if exports_only and not self.allowed(address):
            return "no export allows it"
        if len(self.open) >= self.max_total:
            return f"{len(self.open)} connections are open, the limit"
        if self._per_client.get(address, 0) >= self.limits.max_connections_per_client:
            return f"it has {self.limits.max_connections_per_client} open, the per-client limit"
        return None

    def _accept(self, sock: socket.socket, exports_only: bool) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            try:
                conn_sock, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    limited.log(log, logging.WARNING, "cannot accept connections for %.0f s: %s", ACCEPT_RETRY, exc)
                    loop.remove_reader(sock.fileno())
                    loop.call_later(ACCEPT_RETRY, self._resume, sock, exports_only)
                    return
                continue  # the client went away before we accepted (ECONNABORTED ...)
            address = peer[0]
            why = self._refusal(address, exports_only)
            if why is not None:
                conn_sock.close()
                limited.log(log, logging.WARNING, "refused a connection from %s: %s", address, why)
                continue
            conn_sock.setblocking(False)
            conn = self.make()
            conn.address = (address, peer[1])
            self.open.add(conn)
            self._per_client[address] = self._per_client.get(address, 0) + 1
            task = loop.create_task(self._connect(conn, conn_sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: TcpConnection, sock: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: conn, sock)
        except BaseException as exc:
            sock.close()
            self.closed(conn)
            if not isinstance(exc, OSError):
                raise
            log.debug("connection from %s failed at once: %s", conn.address[0], exc)

    def _resume(self, sock: socket.socket, exports_only: bool) -> None:
        if (sock, exports_only) in self._listeners and sock.fileno() >= 0:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock, exports_only)

    def closed(self, conn: TcpConnection) -> None:
        """A connection ended (its on_close)."""
        if conn not in self.open:
            return
        self.open.discard(conn)
        address = conn.address[0]
        left = self._per_client.get(address, 1) - 1
        if left > 0:
            self._per_client[address] = left
        else:
            self._per_client.pop(address, None)

    async def _sweep_idle(self) -> None:
        """Close connections with nothing received or drained for ``idle_timeout`` seconds."""
        timeout = self.limits.idle_timeout
        while True:
            await asyncio.sleep(min(max(timeout / 4, 0.05), 10.0))
            now = time.monotonic()
            for conn in list(self.open):
                since = conn.idle_since
                if since is not None and now - since > timeout and conn.transport is not None:
                    limited.log(
                        log, logging.INFO, "closing a connection from %s: idle for %.0f s", conn.address[0], now - since
                    )
                    conn.transport.abort()

    def close(self) -> None:
        """Stop accepting, close every connection (their connection_lost follows on the loop)."""
        loop = asyncio.get_running_loop()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for sock, _ in self._listeners:
            loop.remove_reader(sock.fileno())
            sock.close()
        self._listeners.clear()
        for task in self._tasks:
            task.cancel()
        for conn in list(self.open):
            if conn.transport is not None:
                conn.transport.close()


def _descriptor_room(reserve: int) -> int:
    """Connections the descriptor limit allows, keeping ``reserve`` for the rest of the process."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 64
    return soft - open_now - reserve
