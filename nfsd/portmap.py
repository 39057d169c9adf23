"""Portmapper version 2 (RFC 1833): our own on port 111, or registration with one that already runs there."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from nfsd.rpc import PROC_UNAVAIL, Call, Program, RpcError
from nfsd.xdr import Packer, Unpacker, XDRError

PMAP_PROGRAM = 100000
PMAP_V2 = 2
PMAP_PORT = 111
IPPROTO_TCP, IPPROTO_UDP = 6, 17


@dataclass(frozen=True)
class Mapping:
    prog: int
    vers: int
    prot: int
    port: int


def _is_local(address: str) -> bool:
    return address.startswith("127.") or address in ("::1", "::ffff:127.0.0.1")


class PortmapV2(Program):
    prog = PMAP_PROGRAM
    vers = PMAP_V2
    name = "PORTMAPv2"

    def __init__(self) -> None:
        self.table: dict[tuple[int, int, int], int] = {}

    def procedures(self) -> dict[int, Callable]:
        return {0: self.NULL, 1: self.SET, 2: self.UNSET, 3: self.GETPORT, 4: self.DUMP, 5: self.CALLIT}

    def set(self, m: Mapping) -> bool:
        key = (m.prog, m.vers, m.prot)
        if key in self.table and self.table[key] != m.port:
            return False
        self.table[key] = m.port
        return True

    @staticmethod
    def _mapping(u: Unpacker) -> Mapping:
        return Mapping(u.u32("prog"), u.u32("vers"), u.u32("prot"), u.u32("port"))

    async def NULL(self, call: Call) -> list:
        return []

    async def SET(self, call: Call) -> list:
        m = self._mapping(call.args)
        # Only local services may register, as rpcbind does.
        ok = _is_local(call.address[0]) and self.set(m)
        return [Packer().bool(ok).buf]

    async def UNSET(self, call: Call) -> list:
        m = self._mapping(call.args)
        ok = False
        if _is_local(call.address[0]):
            for key in [k for k in self.table if k[0] == m.prog and k[1] == m.vers]:
                del self.table[key]
                ok = True
        return [Packer().bool(ok).buf]

    async def GETPORT(self, call: Call) -> list:
        m = self._mapping(call.args)
        return [Packer().u32(self.table.get((m.prog, m.vers, m.prot), 0)).buf]

    async def DUMP(self, call: Call) -> list:
        p = Packer()
        for (prog, vers, prot), port in sorted(self.table.items()):
            p.u32(1).u32(prog).u32(vers).u32(prot).u32(port)
        p.u32(0)
        return [p.buf]

    async def CALLIT(self, call: Call) -> list:
        # Indirect calls are an amplification vector; refused, as modern rpcbind does for remote callers.
        raise RpcError(PROC_UNAVAIL)


# --- a minimal client, to talk to another portmapper (rpcbind) -----------------------------------------------


def _call(host: str, port: int, proc: int, args: bytes, timeout: float = 3.0) -> Unpacker:
    xid = int.from_bytes(os.urandom(4), "big")
    msg = Packer().u32(xid).u32(0).u32(2).u32(PMAP_PROGRAM).u32(PMAP_V2).u32(proc)
    msg.u32(0).u32(0).u32(0).u32(0)  # AUTH_NONE cred and verf
    body = bytes(msg.buf) + args
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(struct.pack(">I", 0x80000000 | len(body)) + body)
        record = b""
        while True:
            head = _recv_exact(s, 4)
            (mark,) = struct.unpack(">I", head)
            record += _recv_exact(s, mark & 0x7FFFFFFF)
            if mark & 0x80000000:
                break
    u = Unpacker(record)
    if u.u32() != xid or u.u32() != 1 or u.u32() != 0:
        raise XDRError("portmapper reply is not an accepted reply to our call")
    u.u32()
    u.opaque(400)
    if u.u32() != 0:
        raise XDRError("portmapper refused the call")
    return u


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("portmapper closed the connection")
        buf += chunk
    return buf


def _mapping_args(m: Mapping) -> bytes:
    return bytes(Packer().u32(m.prog).u32(m.vers).u32(m.prot).u32(m.port).buf)


def remote_set(m: Mapping, host: str = "127.0.0.1", port: int = PMAP_PORT) -> bool:
    return _call(host, port, 1, _mapping_args(m)).bool()


def remote_unset(m: Mapping, host: str = "127.0.0.1", port: int = PMAP_PORT) -> bool:
    return _call(host, port, 2, _mapping_args(m)).bool()


def remote_getport(prog: int, vers: int, prot: int, host: str = "127.0.0.1", port: int = PMAP_PORT) -> int:
    return _call(host, port, 3, _mapping_args(Mapping(prog, vers, prot, 0))).u32()


def remote_dump(host: str = "127.0.0.1", port: int = PMAP_PORT) -> list[Mapping]:
    u = _call(host, port, 4, b"")
    out = []
    while u.bool():
        out.append(Mapping(u.u32(), u.u32(), u.u32(), u.u32()))
    return out
