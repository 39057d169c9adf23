"""XDR golden bytes, RPC replies for every accept/reject status, record marking at awkward boundaries, fuzzing."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nfsd.rpc import MAX_RECORD, Dispatcher, Program, TcpConnection
from nfsd.xdr import Packer, Unpacker, XDRError
from tests.rpcclient import auth_sys, call_bytes, record


def test_xdr_golden_bytes() -> None:
    assert Packer().u32(1).bytes() == b"\0\0\0\1"
    assert Packer().i32(-2).bytes() == b"\xff\xff\xff\xfe"
    assert Packer().u64(0x0102030405060708).bytes() == bytes(range(1, 9))
    assert Packer().bool(True).bytes() == b"\0\0\0\1"
    assert Packer().opaque(b"abcde").bytes() == b"\0\0\0\5abcde\0\0\0"
    assert Packer().string("é").bytes() == b"\0\0\0\2\xc3\xa9\0\0"
    assert Packer().fixed(b"12345678").bytes() == b"12345678"


def test_xdr_unpack_checks_lengths() -> None:
    u = Unpacker(b"\0\0\0\5abcde\0\0\0")
    assert bytes(u.opaque(5)) == b"abcde"
    u.done()
    with pytest.raises(XDRError, match="exceeds the maximum 4"):
        Unpacker(b"\0\0\0\5abcde\0\0\0").opaque(4, "name")
    with pytest.raises(XDRError, match="need 16 bytes at offset 4, only 4 left"):
        Unpacker(b"\0\0\0\x10abcd").opaque(100)
    with pytest.raises(XDRError, match="bool must be 0 or 1"):
        Unpacker(b"\0\0\0\2").bool()
    with pytest.raises(XDRError, match="trailing"):
        u = Unpacker(b"\0\0\0\0\0")
        u.u32()
        u.done()


class Echo(Program):
    prog, vers, name = 400000, 1, "ECHO"

    def procedures(self):
        async def null(call):
            return []

        async def echo(call):
            data = call.args.opaque(1 << 20, "data")
            return [Packer().opaque(data).buf]

        async def boom(call):
            raise RuntimeError("handler bug")

        return {0: null, 1: echo, 2: boom}

    def requires_auth_sys(self, proc: int) -> bool:
        return proc == 1


def dispatcher() -> Dispatcher:
    d = Dispatcher()
    d.register(Echo())
    e2 = Echo()
    e2.vers = 3
    d.register(e2)
    return d


def reply(parts) -> Unpacker:
    return Unpacker(b"".join(bytes(p) for p in parts))


def handle(raw: bytes):
    return asyncio.run(dispatcher().handle(raw, ("127.0.0.1", 700), "tcp"))


def accepted_stat(parts) -> tuple[int, Unpacker]:
    u = reply(parts)
    u.u32(), u.u32()
    assert u.u32() == 0  # MSG_ACCEPTED
    u.u32(), u.opaque(400)
    return u.u32(), u


def test_success_and_body() -> None:
    stat, u = accepted_stat(handle(call_bytes(7, 400000, 1, 1, Packer().opaque(b"hi").bytes(), auth_sys())))
    assert stat == 0 and bytes(u.opaque(10)) == b"hi"


@pytest.mark.parametrize(
    "raw,expected",
    [
        (call_bytes(1, 999999, 1, 0), 1),  # PROG_UNAVAIL
        (call_bytes(1, 400000, 2, 0), 2),  # PROG_MISMATCH
        (call_bytes(1, 400000, 1, 9), 3),  # PROC_UNAVAIL
        (call_bytes(1, 400000, 1, 1, b"\0\0\0\x09ab", auth_sys()), 4),  # GARBAGE_ARGS
        (call_bytes(1, 400000, 1, 2), 5),  # SYSTEM_ERR
    ],
)
def test_accept_statuses(raw: bytes, expected: int) -> None:
    stat, u = accepted_stat(handle(raw))
    assert stat == expected
    if expected == 2:
        assert u.u32x2() == (1, 3)


def denied_stat(parts) -> tuple[int, Unpacker]:
    u = reply(parts)
    u.u32(), u.u32()
    assert u.u32() == 1  # MSG_DENIED
    return u.u32(), u


def test_reject_statuses() -> None:
    stat, u = denied_stat(handle(call_bytes(1, 400000, 1, 0, rpcvers=3)))
    assert stat == 0 and u.u32x2() == (2, 2)  # RPC_MISMATCH
    stat, u = denied_stat(handle(call_bytes(1, 400000, 1, 0, cred=(6, b"gss"))))
    assert stat == 1 and u.u32() == 2  # AUTH_ERROR / REJECTEDCRED for an unknown flavor
    stat, u = denied_stat(handle(call_bytes(1, 400000, 1, 0, cred=(1, b"\0\0\0\1"))))
    assert stat == 1 and u.u32() == 1  # AUTH_BADCRED for a malformed AUTH_SYS body
    stat, u = denied_stat(handle(call_bytes(1, 400000, 1, 1, Packer().opaque(b"x").bytes())))
    assert stat == 1 and u.u32() == 5  # AUTH_TOOWEAK: procedure needs AUTH_SYS


def test_non_calls_are_dropped() -> None:
    assert handle(b"\0\0\0") is None
    assert handle(b"\0\0\0\1\0\0\0\1") is None  # a REPLY sent to us


class FakeTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.paused = False

    def get_extra_info(self, name):
        return ("127.0.0.1", 1000) if name == "peername" else None

    def set_write_buffer_limits(self, high):
        pass

    def write(self, data) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


async def _feed(chunks: list[bytes]) -> FakeTransport:
    conn = TcpConnection(dispatcher())
    t = FakeTransport()
    conn.connection_made(t)
    for c in chunks:
        conn.data_received(c)
    for _ in range(20):
        await asyncio.sleep(0)
    return t


def split_replies(data: bytes) -> list[bytes]:
    out = []
    while data:
        (mark,) = struct.unpack(">I", data[:4])
        n = mark & 0x7FFFFFFF
        out.append(data[4 : 4 + n])
        data = data[4 + n :]
    return out


def test_record_marking_one_byte_at_a_time_and_multi_fragment() -> None:
    calls = b"".join(
        record(call_bytes(i, 400000, 1, 1, Packer().opaque(bytes([i]) * (i * 10)).bytes(), auth_sys()), fragment=7)
        for i in range(1, 6)
    )
    t = asyncio.run(_feed([calls[i : i + 1] for i in range(len(calls))]))
    replies = split_replies(bytes(t.out))
    assert sorted(Unpacker(r).u32() for r in replies) == [1, 2, 3, 4, 5]
    for r in replies:
        u = Unpacker(r)
        xid = u.u32()
        stat, body = accepted_stat([r])
        assert stat == 0 and bytes(body.opaque(100)) == bytes([xid]) * (xid * 10)


def test_oversized_record_closes_connection() -> None:
    t = asyncio.run(_feed([struct.pack(">I", 0x80000000 | (MAX_RECORD + 1)) + b"x" * 100]))
    assert t.closed and not t.out
    # the cap holds across fragments too
    frag = struct.pack(">I", MAX_RECORD // 2 + 10)
    t = asyncio.run(_feed([frag + b"\0" * (MAX_RECORD // 2 + 10), frag + b"\0" * 10]))
    assert t.closed


# The RPC layer with a toy program; NFSv3 and MOUNT arguments are fuzzed through the real programs in
# test_nfsd_fuzz_dispatch.py.
FUZZ = dict(derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=400, **FUZZ)
@given(st.binary(max_size=600))
def test_fuzz_dispatcher_never_raises(data: bytes) -> None:
    result = handle(data)
    if result is not None:  # a reply: to the xid it was sent, whatever else the bytes said
        u = reply(result)
        assert u.u32() == int.from_bytes(data[:4], "big") and u.u32() == 1


@settings(max_examples=300, **FUZZ)
@given(st.integers(0, 2**32 - 1), st.integers(0, 30), st.binary(max_size=200))
def test_fuzz_valid_headers_with_garbage_args(xid: int, proc: int, args: bytes) -> None:
    for vers in (1, 3):
        result = handle(call_bytes(xid, 400000, vers, proc, args, auth_sys()))
        assert result is not None and reply(result).u32() == xid
        stat, _ = accepted_stat(result)
        # NULL ignores its arguments, ECHO decodes them or calls them garbage, BOOM is the handler bug
        expected = {0: {0}, 1: {0, 4}, 2: {5}}.get(proc, {3})
        assert stat in expected, (vers, proc, stat)
    stat, _ = accepted_stat(handle(call_bytes(xid, 100003, 3, proc, args, auth_sys())))
    assert stat == 1  # PROG_UNAVAIL: no NFS program is registered here
