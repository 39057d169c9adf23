"""The bounds of nfsd/limits.py at the RPC layer, deterministically: a transport whose client never reads,
records already buffered but not yet started, the rate-limited log, and client listing from another thread
while connections come and go."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from nfsd.exports import Export
from nfsd.handles import HandleCodec
from nfsd.limits import Limits
from nfsd.localfs import LocalFS
from nfsd.ratelog import RateLimitedLog
from nfsd.rpc import Budget, Call, Dispatcher, Program, TcpConnection
from nfsd.server import NFSServer
from tests.rpcclient import call_bytes, record
from tests.unit.test_nfsd_concurrency import running

MiB = 1 << 20


class Sink(asyncio.WriteTransport):
    """A socket whose client reads nothing until ``drain()``: like asyncio's, it calls pause_writing when its
    buffer passes the high water mark (0 here, as the connection sets) and resume_writing once it is empty."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.buffered = 0
        self.sent = 0
        self.reading = True
        self.closing = False
        self.high = 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 700) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = high or 0

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: bytes) -> None:
        was = self.buffered
        self.buffered += len(data)
        if was <= self.high < self.buffered:
            self.protocol.pause_writing()

    def drain(self) -> None:
        self.sent += self.buffered
        self.buffered = 0
        self.protocol.resume_writing()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


class BigReplies(Program):
    """Procedure 1 answers 1 MiB after reserving room for it, like an NFS READ; procedure 2 never returns."""

    prog, vers, name = 400100, 1, "BIG"

    def __init__(self) -> None:
        self.started = 0
        self.forever = asyncio.Event()

    def procedures(self) -> dict:
        return {1: self.big, 2: self.stuck}

    async def big(self, call: Call) -> list:
        await call.reserve(MiB)
        self.started += 1
        return [bytes(MiB)]

    async def stuck(self, call: Call) -> list:
        self.started += 1
        await self.forever.wait()
        return []


def connection(limits: Limits) -> tuple[TcpConnection, Sink, BigReplies]:
    program = BigReplies()
    d = Dispatcher()
    d.register(program)
    conn = TcpConnection(d, limits=limits, budget=Budget(limits.total_bytes))
    sink = Sink(conn)
    conn.connection_made(sink)
    return conn, sink, program


async def settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0)


def test_a_client_that_never_reads_is_held_to_connection_bytes() -> None:
    async def go() -> None:
        limits = Limits(connection_bytes=4 * MiB)
        conn, sink, program = connection(limits)
        conn.data_received(b"".join(record(call_bytes(i, 400100, 1, 1)) for i in range(500)))  # 500 MiB asked
        await settle()
        held = sink.buffered + conn._out_held - conn._unsent  # written + in progress
        assert sink.buffered <= 4 * MiB + 4096, f"{sink.buffered} bytes written to a client that reads nothing"
        assert held <= 8 * MiB
        assert not sink.reading, "the socket is still read while replies pile up"
        assert program.started <= 5
        for _ in range(200):  # the client reads now: everything asked for arrives, a window at a time
            sink.drain()
            await settle()
            if program.started == 500 and not sink.buffered:
                break
        assert program.started == 500 and sink.sent >= 500 * MiB
        assert sink.reading and conn._out_held == 0 and conn.budget.held < 64

    asyncio.run(go())


def test_buffered_records_wait_for_max_in_flight() -> None:
    """One read of the socket may carry thousands of calls: only max_in_flight of them start."""

    async def go() -> None:
        conn, sink, program = connection(Limits(max_in_flight=8))
        conn.data_received(b"".join(record(call_bytes(i, 400100, 1, 2)) for i in range(1000)))
        await settle()
        assert program.started == 8
        assert not sink.reading
        program.forever.set()
        await settle()
        assert program.started > 8

    asyncio.run(go())


def test_total_bytes_bound_all_connections() -> None:
    async def go() -> None:
        limits = Limits(connection_bytes=4 * MiB, total_bytes=6 * MiB)
        budget = Budget(limits.total_bytes)
        conns = []
        for _ in range(4):
            program = BigReplies()
            d = Dispatcher()
            d.register(program)
            conn = TcpConnection(d, limits=limits, budget=budget)
            sink = Sink(conn)
            conn.connection_made(sink)
            conn.data_received(b"".join(record(call_bytes(i, 400100, 1, 1)) for i in range(50)))
            conns.append((conn, sink, program))
        await settle()
        assert budget.held <= 6 * MiB + 4 * 64 * 1024
        assert sum(p.started for _, _, p in conns) <= 6
        conns[0][0].connection_lost(None)  # a connection that goes frees what it held for the others
        await settle()
        assert sum(p.started for _, _, p in conns[1:]) > sum(1 for _, s, _ in conns[1:] if s.buffered)

    asyncio.run(go())


def test_limits_refuse_nonsense_and_name_it() -> None:
    with pytest.raises(ValueError, match="idle_timeout must be a positive number, got 0"):
        Limits(idle_timeout=0)
    with pytest.raises(ValueError, match="connection_bytes 1000 is less than 2 MiB"):
        Limits(connection_bytes=1000)
    with pytest.raises(ValueError, match="max_connections_per_client 20 exceeds max_connections 10"):
        Limits(max_connections=10, max_connections_per_client=20)


def test_rate_limited_log_counts_what_it_leaves_out(caplog: pytest.LogCaptureFixture) -> None:
    rl = RateLimitedLog(burst=3, interval=0.2)
    logger = logging.getLogger("nfsd.test")
    with caplog.at_level(logging.INFO, logger="nfsd.test"):
        written = [rl.log(logger, logging.INFO, "refused %s", i) for i in range(100)]
        assert written.count(True) == 3
        assert rl.log(logger, logging.INFO, "another template %s", 1)  # each template has its own window
        time.sleep(0.25)
        assert rl.log(logger, logging.INFO, "refused %s", 100)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == ["refused 0", "refused 1", "refused 2"]
    assert lines[-1] == "refused 100 (and 97 more like it not logged)"


def test_listing_clients_from_another_thread_while_connections_churn(tmp_path: Path) -> None:
    """The control socket lists clients from a worker thread while the event loop adds and drops connections."""
    (tmp_path / "e").mkdir()
    server = NFSServer(
        [Export(path="/e", backend=LocalFS(tmp_path / "e"))],
        codec=HandleCodec(b"k" * 32),
        bind="127.0.0.1",
        nfs_port=0,
        mount_port=0,
        portmap_port=None,
        limits=Limits(max_connections_per_client=200, max_connections=400),
    )
    errors: list[BaseException] = []
    stop = threading.Event()

    def churn(port: int) -> None:
        deadline = time.monotonic() + 5
        while not stop.is_set() and time.monotonic() < deadline:
            socks = [socket.create_connection(("127.0.0.1", port), timeout=2) for _ in range(40)]
            for s in socks:
                s.close()

    with running(server) as ports:
        threads = [threading.Thread(target=churn, args=(ports.nfs,)) for _ in range(4)]
        for t in threads:
            t.start()
        listed = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                for entry in server.clients():
                    assert entry["address"] == "127.0.0.1"
                listed += 1
            except RuntimeError as exc:  # "Set changed size during iteration"
                errors.append(exc)
                break
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, f"listing clients failed after {listed} listings: {errors[0]!r}"
    assert listed > 10
