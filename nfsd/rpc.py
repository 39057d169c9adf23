"""ONC RPC v2 (RFC 5531): call decoding, AUTH_NONE/AUTH_SYS, accept/reject replies, dispatch by program,
and the two transports: TCP with record marking (many calls in flight, replies as they finish) and UDP.

Hostile input never crashes the server: a record over ``MAX_RECORD`` closes the connection, a call that
does not decode gets GARBAGE_ARGS (or is dropped if not even its xid is readable), and a handler that raises
something unexpected gets SYSTEM_ERR.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from nfsd.vfs import Cred
from nfsd.xdr import Packer, Unpacker, XDRError

log = logging.getLogger("nfsd.rpc")

CALL, REPLY = 0, 1
MSG_ACCEPTED, MSG_DENIED = 0, 1
SUCCESS, PROG_UNAVAIL, PROG_MISMATCH, PROC_UNAVAIL, GARBAGE_ARGS, SYSTEM_ERR = 0, 1, 2, 3, 4, 5
RPC_MISMATCH, AUTH_ERROR = 0, 1
AUTH_OK, AUTH_BADCRED, AUTH_REJECTEDCRED, AUTH_BADVERF, AUTH_REJECTEDVERF, AUTH_TOOWEAK = 0, 1, 2, 3, 4, 5
AUTH_NONE, AUTH_SYS = 0, 1
MAX_AUTH_BYTES = 400
MAX_RECORD = (1 << 20) + 64 * 1024  # a 1 MiB WRITE plus headers; anything bigger is hostile
MAX_IN_FLIGHT = 64  # per connection; reading pauses beyond it

_REPLY_HEAD = struct.Struct(">IIIIII")  # xid, REPLY, MSG_ACCEPTED, verf flavor, verf len, accept_stat

Body = Sequence[bytes | bytearray | memoryview]


class RpcError(Exception):
    """Raised by handlers to answer with an accept_stat other than SUCCESS."""

    def __init__(self, accept_stat: int, mismatch: tuple[int, int] | None = None) -> None:
        super().__init__(accept_stat)
        self.accept_stat = accept_stat
        self.mismatch = mismatch


class AuthError(Exception):
    def __init__(self, stat: int) -> None:
        super().__init__(stat)
        self.stat = stat


@dataclass
class Call:
    xid: int
    prog: int
    vers: int
    proc: int
    flavor: int
    cred: Cred
    args: Unpacker
    address: tuple[str, int]
    transport: str  # "tcp" or "udp"

    @property
    def privileged_port(self) -> bool:
        return self.address[1] < 1024


Handler = Callable[[Call], Awaitable[Body]]


class Program:
    """One RPC program version: ``procedures`` maps a procedure number to an async handler."""

    prog: int = 0
    vers: int = 0
    name: str = ""

    def procedures(self) -> dict[int, Handler]:
        raise NotImplementedError

    def requires_auth_sys(self, proc: int) -> bool:
        return False


def parse_auth_sys(body: memoryview, address: tuple[str, int]) -> Cred:
    u = Unpacker(body)
    u.u32("auth_sys stamp")
    machine = u.string(255, "auth_sys machinename")
    uid, gid = u.u32("auth_sys uid"), u.u32("auth_sys gid")
    n = u.u32("auth_sys gids count")
    if n > 16:
        raise XDRError(f"auth_sys: {n} groups, at most 16 allowed")
    gids = tuple(u.u32("auth_sys gid") for _ in range(n))
    return Cred(uid=uid, gid=gid, gids=gids, machine=machine, address=address[0])


def accepted(xid: int, stat: int, body: Body = ()) -> list:
    return [_REPLY_HEAD.pack(xid, REPLY, MSG_ACCEPTED, AUTH_NONE, 0, stat), *body]


def denied(xid: int, reject_stat: int, *values: int) -> list:
    p = Packer().u32(xid).u32(REPLY).u32(MSG_DENIED).u32(reject_stat)
    for v in values:
        p.u32(v)
    return [p.bytes()]


class Dispatcher:
    """Routes calls to programs; shared by every listener of a server."""

    def __init__(self) -> None:
        self._programs: dict[int, dict[int, tuple[Program, dict[int, Handler]]]] = {}
        self._creds: dict[tuple[bytes, str], Cred] = {}

    def register(self, program: Program) -> None:
        self._programs.setdefault(program.prog, {})[program.vers] = (program, program.procedures())

    def programs(self) -> list[Program]:
        return [p for versions in self._programs.values() for p, _ in versions.values()]

    async def handle(self, record: bytes | memoryview, address: tuple[str, int], transport: str) -> list | None:
        """Decode one call and produce the reply's parts (None: not a call, nothing to answer)."""
        u = Unpacker(record)
        try:
            xid = u.u32("xid")
            if u.u32("msg_type") != CALL:
                return None
        except XDRError:
            return None
        try:
            rpcvers = u.u32("rpcvers")
            if rpcvers != 2:
                return denied(xid, RPC_MISMATCH, 2, 2)
            prog, vers, proc = u.u32("prog"), u.u32("vers"), u.u32("proc")
            flavor = u.u32("cred flavor")
            cred_body = u.opaque(MAX_AUTH_BYTES, "cred body")
            u.u32("verf flavor")
            u.opaque(MAX_AUTH_BYTES, "verf body")
        except XDRError:
            return denied(xid, AUTH_ERROR, AUTH_BADCRED)
        if flavor == AUTH_SYS:
            # A client sends the same credential on every call: decode each distinct one once.
            key = (bytes(cred_body), address[0])
            cred = self._creds.get(key)
            if cred is None:
                try:
                    cred = parse_auth_sys(cred_body, address)
                except XDRError:
                    return denied(xid, AUTH_ERROR, AUTH_BADCRED)
                if len(self._creds) >= 4096:
                    self._creds.clear()
                self._creds[key] = cred
        elif flavor == AUTH_NONE:
            cred = Cred(address=address[0])
        else:
            return denied(xid, AUTH_ERROR, AUTH_REJECTEDCRED)
        versions = self._programs.get(prog)
        if not versions:
            return accepted(xid, PROG_UNAVAIL)
        entry = versions.get(vers)
        if entry is None:
            low, high = min(versions), max(versions)
            return accepted(xid, PROG_MISMATCH, [struct.pack(">II", low, high)])
        program, procs = entry
        handler = procs.get(proc)
        if handler is None:
            return accepted(xid, PROC_UNAVAIL)
        if flavor != AUTH_SYS and program.requires_auth_sys(proc):
            return denied(xid, AUTH_ERROR, AUTH_TOOWEAK)
        call = Call(xid, prog, vers, proc, flavor, cred, u, address, transport)
        try:
            body = await handler(call)
        except XDRError as exc:
            log.info("garbage arguments from %s for %s proc %d: %s", address[0], program.name, proc, exc)
            return accepted(xid, GARBAGE_ARGS)
        except RpcError as exc:
            return accepted(xid, exc.accept_stat)
        except AuthError as exc:
            return denied(xid, AUTH_ERROR, exc.stat)
        except Exception:
            log.exception("%s proc %d failed", program.name, proc)
            return accepted(xid, SYSTEM_ERR)
        return accepted(xid, SUCCESS, body)


class TcpConnection(asyncio.Protocol):
    """Record marking over a stream: fragments joined into records, each record a call handled concurrently."""

    def __init__(self, dispatcher: Dispatcher, on_close: Callable[[TcpConnection], None] | None = None) -> None:
        self.dispatcher = dispatcher
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.address: tuple[str, int] = ("", 0)
        self._buf = bytearray()
        self._frags: list[bytes] = []
        self._frag_total = 0
        self._in_flight = 0
        self._paused = False
        self._tasks: set[asyncio.Task] = set()
        self._out: list = []
        self._flush_scheduled = False
        self.calls = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("", 0)
        self.address = (peer[0], peer[1])
        transport.set_write_buffer_limits(high=8 << 20)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        for t in self._tasks:
            t.cancel()
        if self.on_close:
            self.on_close(self)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            (mark,) = struct.unpack_from(">I", buf, pos)
            size = mark & 0x7FFFFFFF
            if self._frag_total + size > MAX_RECORD:
                log.warning("closing %s: record of %d+ bytes exceeds %d", self.address[0], size, MAX_RECORD)
                self.transport.close()
                self._buf = bytearray()
                return
            if n - pos - 4 < size:
                break
            frag = bytes(buf[pos + 4 : pos + 4 + size])
            pos += 4 + size
            if mark & 0x80000000:
                if self._frags:
                    self._frags.append(frag)
                    frag = b"".join(self._frags)
                    self._frags = []
                    self._frag_total = 0
                self._spawn(frag)
            else:
                self._frags.append(frag)
                self._frag_total += size
        if pos:
            del buf[:pos]

    def _spawn(self, record: bytes) -> None:
        self.calls += 1
        self._in_flight += 1
        if self._in_flight >= MAX_IN_FLIGHT and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._run(record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, record: bytes) -> None:
        try:
            parts = await self.dispatcher.handle(record, self.address, "tcp")
            if parts is not None and not self.transport.is_closing():
                total = sum(len(p) for p in parts)
                self._out.append(struct.pack(">I", 0x80000000 | total))
                self._out.extend(parts)
                if not self._flush_scheduled:
                    # Replies finishing in the same loop iteration leave in one send() instead of one each.
                    self._flush_scheduled = True
                    asyncio.get_running_loop().call_soon(self._flush)
        finally:
            self._in_flight -= 1
            if self._paused and self._in_flight <= MAX_IN_FLIGHT // 2 and not self.transport.is_closing():
                self._paused = False
                self.transport.resume_reading()


    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if not out or self.transport.is_closing():
            return
        small: list = []
        for p in out:
            if len(p) > 65536:
                # big READ data: hand the buffer to the transport as is instead of copying it into a join
                if small:
                    self.transport.write(b"".join(small))
                    small = []
                self.transport.write(p)
            else:
                small.append(p)
        if small:
            self.transport.write(b"".join(small))


class UdpEndpoint(asyncio.DatagramProtocol):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        task = asyncio.get_running_loop().create_task(self._run(data, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, data: bytes, addr: tuple[str, int]) -> None:
        parts = await self.dispatcher.handle(data, (addr[0], addr[1]), "udp")
        if parts is not None and self.transport is not None:
            self.transport.sendto(b"".join(parts), addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error: %s", exc)
