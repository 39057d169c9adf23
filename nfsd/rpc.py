"""ONC RPC v2 (RFC 5531): call decoding, AUTH_NONE/AUTH_SYS, accept/reject replies, dispatch by program,
and the two transports: TCP with record marking (many calls in flight, replies as they finish) and UDP.

Hostile input never crashes the server: a record over ``MAX_RECORD`` closes the connection, a call that
does not decode gets GARBAGE_ARGS (or is dropped if not even its xid is readable), and a handler that raises
something unexpected gets SYSTEM_ERR. What a client makes the server hold is bounded (nfsd/limits.py): a TCP
connection whose replies are not drained stops being read, a READ waits for room before it reads, a UDP reply
stays small, and log lines a client can cause are rate-limited (nfsd/ratelog.py).
"""

from __future__ import annotations

import asyncio
import collections.abc
import logging
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass
from typing import Any

from nfsd.filerange import FileRange
from nfsd.limits import DEFAULT, FLOOR_BYTES, Limits
from nfsd.ratelog import limited
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

_REPLY_HEAD = struct.Struct(">IIIIII")  # xid, REPLY, MSG_ACCEPTED, verf flavor, verf len, accept_stat
_CALL_HEAD = struct.Struct(">IIIIIIII")  # xid, CALL, rpcvers, prog, vers, proc, cred flavor, cred length
_VERF_HEAD = struct.Struct(">II")  # verf flavor, verf length

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
    flow: _Ticket | None = None
    max_data: int = 0xFFFFFFFF  # bytes of file data or directory entries a reply may carry (small over UDP)

    async def reserve(self, nbytes: int) -> None:
        """Wait for room to hold a reply of about ``nbytes`` (a READ or READDIR asks before the backend reads)."""
        ticket = self.flow
        if ticket is None:
            return
        conn = ticket.conn
        if not conn._waiters and conn._fits(nbytes):  # the usual case: no await, no future
            conn._charge_out(nbytes)
            ticket.reserved += nbytes
        else:
            await conn.wait_for_room(ticket, nbytes)

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

    async def handle(
        self,
        record: bytes | memoryview,
        address: tuple[str, int],
        transport: str,
        flow: _Ticket | None = None,
        max_data: int = 0xFFFFFFFF,
    ) -> list | None:
        """Decode one call and produce the reply's parts (None: not a call, nothing to answer)."""
        head = _well_formed_head(record)
        if head is not None:
            # the common case in one struct call; anything unusual takes the checked path below
            xid, rpcvers, prog, vers, proc, flavor, cred_body, pos = head
            if rpcvers != 2:
                return denied(xid, RPC_MISMATCH, 2, 2)
            u = Unpacker(record, pos)
        else:
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
        call = Call(xid, prog, vers, proc, flavor, cred, u, address, transport, flow, max_data)
        try:
            body = await handler(call)
        except XDRError as exc:
            limited.log(
                log, logging.INFO, "garbage arguments from %s for %s proc %d: %s", address[0], program.name, proc, exc
            )
            return accepted(xid, GARBAGE_ARGS)
        except RpcError as exc:
            return accepted(xid, exc.accept_stat)
        except AuthError as exc:
            return denied(xid, AUTH_ERROR, exc.stat)
        except Exception:
            limited.log(log, logging.ERROR, "%s proc %d failed", program.name, proc, exc_info=True)
            return accepted(xid, SYSTEM_ERR)
        return accepted(xid, SUCCESS, body)


def _well_formed_head(record: bytes | memoryview) -> tuple[int, int, int, int, int, int, bytes, int] | None:
    """The call header of a record whose header is complete and within bounds: (xid, rpcvers, prog, vers,
    proc, cred flavor, cred body, offset of the arguments); None for anything else (not a call, short, over a
    bound), which ``Dispatcher.handle`` then decodes field by field to give the precise answer."""
    n = len(record)
    if n < 40:
        return None
    xid, mtype, rpcvers, prog, vers, proc, flavor, clen = _CALL_HEAD.unpack_from(record)
    if mtype != CALL or clen > MAX_AUTH_BYTES:
        return None
    pos = 32 + clen + (-clen % 4)
    if pos + 8 > n:
        return None
    _, vlen = _VERF_HEAD.unpack_from(record, pos)
    end = pos + 8 + vlen + (-vlen % 4)
    if vlen > MAX_AUTH_BYTES or end > n:
        return None
    return xid, rpcvers, prog, vers, proc, flavor, bytes(record[32 : 32 + clen]), end


def start_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Task | None:
    """Run ``coro`` right here until it first waits; only then does it become a Task (None: it finished).

    Most calls (a READ from memory, a GETATTR) never wait, so they skip a Task and a trip through the event
    loop's ready queue, and their replies join the same send as the calls read with them. Python 3.12's
    ``eager_task_factory`` does the same for a whole loop; this one is for the calls of one connection only."""
    try:
        pending = coro.send(None)
    except StopIteration:
        return None
    except Exception:  # noqa: BLE001 - what a Task would have reported as "exception never retrieved"
        log.exception("call failed before it waited")
        return None
    return asyncio.get_running_loop().create_task(_Resumed(coro, pending))


class _Resumed(collections.abc.Coroutine):
    """``coro``, already started by hand and waiting for ``pending``, in the shape a Task drives: the Task's first
    step gets ``pending`` (what ``coro`` waits for) without resuming ``coro``; after that, what the Task sends or
    throws (a result, an error, a cancellation, even before that first step) goes to ``coro`` itself."""

    __slots__ = ("_coro", "_pending", "_first")

    def __init__(self, coro: Coroutine[Any, Any, None], pending: Any) -> None:  # noqa: ANN401 - what coro yields
        self._coro = coro
        self._pending: Any = pending
        self._first = True

    def send(self, value: Any) -> Any:  # noqa: ANN401
        if self._first:
            self._first = False
            pending, self._pending = self._pending, None
            return pending
        return self._coro.send(value)

    def throw(self, *exc: Any) -> Any:  # noqa: ANN401
        self._first = False
        self._pending = None
        return self._coro.throw(*exc)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, Any, None]:
        value = self.send(None)
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # noqa: BLE001 - cancellation and the rest belong to coro
                try:
                    value = self.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    value = self.send(sent)
                except StopIteration:
                    return


class Budget:
    """Bytes that all connections of one server hold, requests and replies (``Limits.total_bytes``).

    Connections register in ``blocked`` while they wait for room; a release that leaves room wakes them.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.blocked: set[TcpConnection] = set()
        self._wake_scheduled = False

    def charge(self, n: int) -> None:
        """Count ``n`` more bytes held (negative: released)."""
        self.held += n
        if n < 0 and self.blocked:
            self.released()

    def released(self) -> None:
        if not self._wake_scheduled and self.held < self.limit:
            # woken from the loop, not from inside the releasing connection's own bookkeeping
            self._wake_scheduled = True
            asyncio.get_running_loop().call_soon(self._wake)

    def _wake(self) -> None:
        self._wake_scheduled = False
        for conn in list(self.blocked):
            conn.pump()


class _Ticket:
    """One call's share of its connection's reply budget."""

    __slots__ = ("conn", "reserved")

    def __init__(self, conn: TcpConnection) -> None:
        self.conn = conn
        self.reserved = 0


class TcpConnection(asyncio.Protocol):
    """Record marking over a stream: fragments joined into records, each record a call handled concurrently.

    What the connection holds is bounded (limits.py): ``_in_held`` counts request bytes (unparsed input and
    the records of calls in progress), ``_out_held`` reply bytes (reserved by a READ before it reads, produced,
    or written to a socket the client has not drained). Over a bound, or with ``max_in_flight`` calls running,
    records already received are left unparsed and the socket is not read (``pump``). The transport tells us
    when its buffer is non-empty/empty (``pause_writing``/``resume_writing``, high water 0), which is when
    written replies stop/start counting as drained.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        on_close: Callable[[TcpConnection], None] | None = None,
        limits: Limits = DEFAULT,
        budget: Budget | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.on_close = on_close
        self.limits = limits
        self.budget = budget or Budget(limits.total_bytes)
        self.transport: asyncio.Transport | None = None
        self.address: tuple[str, int] = ("", 0)
        self.closed = False
        self.last_active = 0.0
        self._buf = bytearray()
        self._frags: list[bytes] = []
        self._frag_total = 0
        self._in_flight = 0
        self._reading = True
        self._in_held = 0
        self._out_held = 0
        self._unsent = 0  # written while the transport's buffer was non-empty
        self._draining = False
        self._waiters: deque[tuple[int, asyncio.Future, _Ticket]] = deque()
        self._tasks: set[asyncio.Task] = set()
        self._out: list = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self._parsing = False
        self._sock_fd = -1
        self.calls = 0

    # --- lifecycle --------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.address[0]:  # the listener sets it as it accepts; peername is None once the peer is gone
            peer = transport.get_extra_info("peername") or ("", 0)
            self.address = (peer[0], peer[1])
        self.last_active = time.monotonic()
        sock = transport.get_extra_info("socket")
        self._sock_fd = sock.fileno() if sock is not None else -1  # for sendfile(2) of FileRange replies
        # pause_writing as soon as the socket would block, resume_writing when the buffer is empty again
        transport.set_write_buffer_limits(0)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for t in self._tasks:
            t.cancel()
        for _, fut, _ in self._waiters:
            fut.cancel()
        self._waiters.clear()
        self.budget.blocked.discard(self)
        self.budget.charge(-(self._in_held + self._out_held))
        self._in_held = self._out_held = 0
        self._buf = bytearray()
        self._frags = []
        self._out = []
        if self.on_close:
            self.on_close(self)

    def pause_writing(self) -> None:
        self._draining = True

    def resume_writing(self) -> None:
        self._draining = False
        self.last_active = time.monotonic()
        n, self._unsent = self._unsent, 0
        self._charge_out(-n)
        self.pump()

    @property
    def idle_since(self) -> float | None:
        """When it went idle (nothing received or drained, and no call the server is still working on for a
        client that reads its replies), or None if it is busy."""
        if self._in_flight and not self._unsent:
            return None
        return self.last_active

    # --- accounting -------------------------------------------------------------------------------------
    def _charge_in(self, n: int) -> None:
        if not self.closed:
            self._in_held += n
            b = self.budget
            b.held += n
            if n < 0 and b.blocked:
                b.released()

    def _charge_out(self, n: int) -> None:
        if not self.closed:
            self._out_held += n
            b = self.budget
            b.held += n
            if n < 0 and b.blocked:
                b.released()

    def _room(self) -> bool:
        """May another call start (and the socket be read)?"""
        lim = self.limits
        if self._in_flight >= lim.max_in_flight:
            return False
        if self._in_held >= lim.connection_bytes or self._out_held >= lim.connection_bytes:
            return False
        b = self.budget
        return b.held < b.limit or self._in_held + self._out_held < FLOOR_BYTES

    def _fits(self, n: int) -> bool:
        """Is there room for a reply of ``n`` bytes? A connection holding no reply may always have one."""
        if self._out_held and self._out_held + n > self.limits.connection_bytes:
            return False
        return self.budget.held + n <= self.budget.limit

    async def wait_for_room(self, ticket: _Ticket, n: int) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut, ticket))
        self.budget.blocked.add(self)
        await fut  # granted by pump(), which charges for it

    def pump(self) -> None:
        """Grant reservations, start buffered calls, and read the socket, as far as the limits allow."""
        if self.closed or self.transport is None:
            return
        waiters = self._waiters
        while waiters:
            n, fut, ticket = waiters[0]
            if fut.cancelled():
                waiters.popleft()
                continue
            if not self._fits(n):
                break
            waiters.popleft()
            self._charge_out(n)
            ticket.reserved += n
            fut.set_result(None)
        self._parse()
        room = self._room()
        if room != self._reading and not self.transport.is_closing():
            self._reading = room
            if room:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()
        if room and not waiters:
            self.budget.blocked.discard(self)
        else:
            self.budget.blocked.add(self)

    # --- input ------------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        self._buf += data
        self._charge_in(len(data))
        self._parse()
        if not self._room():
            self.pump()

    def _parse(self) -> None:
        """Start the complete records in the buffer while there is room; leave the rest for later.

        Calls run eagerly (``start_eagerly``), so a call answered at once releases its bytes, or calls
        ``pump``, while this loop still holds its place in the buffer: that nested call must not parse."""
        if self._parsing or not self._room():
            return
        self._parsing = True
        try:
            self._parse_records()
        finally:
            self._parsing = False

    def _parse_records(self) -> None:
        buf = self._buf
        pos = marks = 0
        n = len(buf)
        while n - pos >= 4 and self._room():
            (mark,) = struct.unpack_from(">I", buf, pos)
            size = mark & 0x7FFFFFFF
            if self._frag_total + size > MAX_RECORD:
                limited.log(
                    log,
                    logging.WARNING,
                    "closing %s: record of %d+ bytes exceeds %d",
                    self.address[0],
                    size,
                    MAX_RECORD,
                )
                self.transport.close()
                self._buf = bytearray()
                return
            if n - pos - 4 < size:
                break
            frag = bytes(memoryview(buf)[pos + 4 : pos + 4 + size])  # one copy (a bytearray slice is another)
            pos += 4 + size
            marks += 1
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
            self._charge_in(-4 * marks)  # the record marks; fragments stay held until their call is answered

    def _spawn(self, record: bytes) -> None:
        self.calls += 1
        self._in_flight += 1
        task = start_eagerly(self._run(record))
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, record: bytes) -> None:
        ticket = _Ticket(self)
        try:
            parts = await self.dispatcher.handle(record, self.address, "tcp", flow=ticket)
            if parts is not None and not self.transport.is_closing():
                total = 0
                for p in parts:
                    total += len(p)
                self._charge_out(total + 4 - ticket.reserved)  # the reply replaces what was reserved for it
                ticket.reserved = 0
                self._out.append(struct.pack(">I", 0x80000000 | total))
                self._out.extend(parts)
                self._out_bytes += total + 4
                if not self._flush_scheduled:
                    # Replies finishing in the same loop iteration leave in one send() instead of one each.
                    self._flush_scheduled = True
                    asyncio.get_running_loop().call_soon(self._flush)
        finally:
            if ticket.reserved:
                self._charge_out(-ticket.reserved)
            self._in_flight -= 1
            self._charge_in(-len(record))
            if not self._reading or self._waiters:
                self.pump()

    # --- output -----------------------------------------------------------------------------------------
    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        nbytes, self._out_bytes = self._out_bytes, 0
        if not out or self.transport.is_closing():
            return
        try:
            self._write_out(out)
        except ConnectionError:  # the client went away while a FileRange was being sent to it
            self.transport.abort()
            return
        except OSError as exc:  # a FileRange's file failed us: the record stream cannot be resumed
            limited.log(log, logging.ERROR, "closing %s: reply data unreadable: %s", self.address[0], exc)
            self.transport.abort()
            return
        if self._draining:
            # What the transport still buffers is exactly what the client has not read yet.
            left = self.transport.get_write_buffer_size()
            freed = self._unsent + nbytes - left
            self._unsent = left
            if freed > 0:
                self.last_active = time.monotonic()
                self._charge_out(-freed)
        else:
            self.last_active = time.monotonic()
            self._charge_out(-nbytes)
            if self._waiters or not self._reading:
                self.pump()

    def _write_out(self, out: list) -> None:
        transport = self.transport
        small: list = []  # small parts are joined into one write; large ones go as they are
        for p in out:
            large = type(p) is FileRange or len(p) > 65536
            if not large:
                small.append(p)
                continue
            if small:
                transport.write(b"".join(small))
                small = []
            if type(p) is FileRange:
                # Straight from the page cache when nothing waits before it in the transport, else copied.
                sent = p.send(self._sock_fd) if self._sock_fd >= 0 and not transport.get_write_buffer_size() else 0
                if sent < p.length:
                    transport.write(p.tail(sent).read())
            else:
                # big READ data: handed to the transport as is instead of being copied into a join
                transport.write(p)
        if small:
            transport.write(b"".join(small))


class UdpEndpoint(asyncio.DatagramProtocol):
    """Datagrams: at most ``udp_max_in_flight`` calls at once (more are dropped, as a full socket would), and
    no reply larger than ``udp_max_reply``: a forged source address must not buy a large answer."""

    def __init__(self, dispatcher: Dispatcher, limits: Limits = DEFAULT) -> None:
        self.dispatcher = dispatcher
        self.limits = limits
        self.transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(self._tasks) >= self.limits.udp_max_in_flight:
            return
        task = asyncio.get_running_loop().create_task(self._run(data, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, data: bytes, addr: tuple[str, int]) -> None:
        parts = await self.dispatcher.handle(data, (addr[0], addr[1]), "udp", max_data=self.limits.udp_max_data)
        if parts is None or self.transport is None or self.transport.is_closing():
            return
        reply = b"".join(p.read() if type(p) is FileRange else p for p in parts)
        if len(reply) > self.limits.udp_max_reply:
            limited.log(
                log,
                logging.WARNING,
                "UDP reply of %d bytes to %s exceeds %d: answered SYSTEM_ERR",
                len(reply),
                addr[0],
                self.limits.udp_max_reply,
            )
            reply = b"".join(accepted(int.from_bytes(reply[:4], "big"), SYSTEM_ERR))
        self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error: %s", exc)
