"""The call header's one-struct fast path (``nfsd.rpc._well_formed_head``) answers exactly as the field-by-field
decoder does, for well-formed calls and for every kind of damage to the header: short records, credential and
verifier lengths over the bound or past the end, padding, other message types and RPC versions."""

from __future__ import annotations

import asyncio
import itertools
import struct

import pytest

import nfsd.rpc
from nfsd.rpc import MAX_AUTH_BYTES, Call, Dispatcher, Program
from nfsd.xdr import Packer


class Echo(Program):
    prog, vers, name = 400123, 1, "echo"

    async def PROC_1(self, call: Call) -> list:  # noqa: N802 - named as procedures are
        data = call.args.opaque(64, "data")
        return [Packer().opaque(bytes(data)).u32(call.cred.uid).bytes()]

    def procedures(self) -> dict:
        return {0: self.PROC_1, 1: self.PROC_1}


def header(xid: int, mtype: int, rpcvers: int, prog: int, vers: int, proc: int, flavor: int, cred: bytes,
           vflavor: int, verf: bytes, cred_len: int | None = None, verf_len: int | None = None) -> bytes:  # fmt: skip
    p = Packer().u32(xid).u32(mtype).u32(rpcvers).u32(prog).u32(vers).u32(proc).u32(flavor)
    p.u32(len(cred) if cred_len is None else cred_len).fixed(cred)
    p.u32(vflavor).u32(len(verf) if verf_len is None else verf_len).fixed(verf)
    return p.bytes()


def auth_sys(uid: int, gids: int = 2) -> bytes:
    p = Packer().u32(7).string("host").u32(uid).u32(uid)
    p.u32(gids)
    for g in range(gids):
        p.u32(g)
    return p.bytes()


async def answer(d: Dispatcher, record: bytes) -> bytes | None:
    parts = await d.handle(record, ("127.0.0.1", 700), "tcp")
    return None if parts is None else b"".join(bytes(p) for p in parts)


def answers(record: bytes, fast: bool, monkeypatch: pytest.MonkeyPatch) -> bytes | None:
    d = Dispatcher()
    d.register(Echo())
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(nfsd.rpc, "_well_formed_head", lambda record: None)
        return asyncio.run(answer(d, record))


CREDS = [b"", auth_sys(0), auth_sys(1000, 16), b"\x01\x02\x03", bytes(MAX_AUTH_BYTES)]
LENS = [None, 0, 3, 5, MAX_AUTH_BYTES, MAX_AUTH_BYTES + 1, 2**32 - 1]
VERFS = [b"", b"v" * 5, bytes(MAX_AUTH_BYTES + 4)]
ARGS = [b"", Packer().opaque(b"ping").bytes()]


def records() -> list[bytes]:
    out = []
    for mtype, rpcvers, flavor, cred, cred_len, verf, verf_len, args in itertools.product(
        [0, 1], [2, 3], [1, 0, 6], CREDS, LENS, VERFS, [None, 1, MAX_AUTH_BYTES + 1], ARGS
    ):
        record = header(7, mtype, rpcvers, Echo.prog, 1, 1, flavor, cred, 0, verf, cred_len, verf_len) + args
        out += [record, record[:-1], record[:39], record[:40], record[:44]]
    return out


def test_fast_path_answers_as_the_checked_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every combination, both ways, in one event loop per way."""
    cases = records()

    def all_answers(fast: bool) -> list[bytes | None]:
        d = Dispatcher()
        d.register(Echo())

        async def run() -> list[bytes | None]:
            return [await answer(d, r) for r in cases]

        with monkeypatch.context() as m:
            if not fast:
                m.setattr(nfsd.rpc, "_well_formed_head", lambda record: None)
            return asyncio.run(run())

    fast, checked = all_answers(True), all_answers(False)
    differ = [(cases[i].hex(), fast[i], checked[i]) for i in range(len(cases)) if fast[i] != checked[i]]
    assert not differ, differ[:3]
    assert sum(nfsd.rpc._well_formed_head(r) is not None for r in cases) > 1000  # the fast path ran


def test_a_well_formed_call_takes_the_fast_path_and_is_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    record = header(9, 0, 2, Echo.prog, 1, 1, 1, auth_sys(1234), 0, b"") + Packer().opaque(b"ping").bytes()
    assert nfsd.rpc._well_formed_head(record) is not None
    reply = answers(record, True, monkeypatch)
    assert reply is not None and reply.endswith(Packer().opaque(b"ping").u32(1234).bytes())
    assert struct.unpack(">I", reply[:4])[0] == 9
