"""A minimal ONC RPC client over TCP for protocol tests: raw calls, raw bytes, raw replies."""

from __future__ import annotations

import os
import socket
import struct

from nfsd.xdr import Packer, Unpacker


def auth_sys(uid: int = 0, gid: int = 0, machine: str = "test") -> tuple[int, bytes]:
    body = Packer().u32(0).string(machine).u32(uid).u32(gid).u32(0).bytes()
    return 1, body


def call_bytes(
    xid: int, prog: int, vers: int, proc: int, args: bytes = b"", cred: tuple[int, bytes] = (0, b""), rpcvers: int = 2
) -> bytes:
    p = Packer().u32(xid).u32(0).u32(rpcvers).u32(prog).u32(vers).u32(proc)
    p.u32(cred[0]).opaque(cred[1]).u32(0).u32(0)
    return p.bytes() + args


def record(payload: bytes, fragment: int | None = None) -> bytes:
    """Record-mark ``payload``, split into fragments of ``fragment`` bytes if given."""
    if not fragment:
        return struct.pack(">I", 0x80000000 | len(payload)) + payload
    out = b""
    for i in range(0, len(payload), fragment):
        part = payload[i : i + fragment]
        last = i + fragment >= len(payload)
        out += struct.pack(">I", (0x80000000 if last else 0) | len(part)) + part
    return out


class RpcClient:
    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_record(self) -> bytes:
        out = b""
        while True:
            (mark,) = struct.unpack(">I", self._exact(4))
            out += self._exact(mark & 0x7FFFFFFF)
            if mark & 0x80000000:
                return out

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        return buf

    def call(
        self, prog: int, vers: int, proc: int, args: bytes = b"", cred: tuple[int, bytes] | None = None
    ) -> Unpacker:
        """Make a call; returns the reply body after an accepted SUCCESS header, else raises."""
        xid = int.from_bytes(os.urandom(4), "big")
        self.send_raw(record(call_bytes(xid, prog, vers, proc, args, cred or auth_sys())))
        u = Unpacker(self.recv_record())
        assert u.u32() == xid
        assert u.u32() == 1  # REPLY
        stat = u.u32()
        if stat != 0:
            raise RuntimeError(f"call denied: reject_stat {u.u32()}")
        u.u32()
        u.opaque(400)
        accept = u.u32()
        if accept != 0:
            raise RuntimeError(f"call not accepted: accept_stat {accept}")
        return u

    def mount(self, path: str) -> bytes:
        u = self.call(100005, 3, 1, Packer().string(path).bytes())
        status = u.u32()
        if status != 0:
            raise RuntimeError(f"MNT {path}: status {status}")
        return bytes(u.opaque(64))


class NfsDir:
    """NFSv3 calls on the files of one mounted directory: just enough for tests to act like a hypervisor."""

    def __init__(self, mount_port: int, nfs_port: int, directory: str, host: str = "127.0.0.1") -> None:
        self.dir = RpcClient(host, mount_port).mount(directory)
        self.nfs = RpcClient(host, nfs_port)

    def lookup(self, name: str) -> bytes:
        u = self.nfs.call(100003, 3, 3, Packer().opaque(self.dir).string(name).bytes())
        status = u.u32()
        assert status == 0, f"LOOKUP {name}: status {status}"
        return bytes(u.opaque(64))

    def write(self, fh: bytes, offset: int, data: bytes, stable: int = 2) -> int:
        """WRITE (stable 2 = FILE_SYNC, 0 = UNSTABLE); returns the nfsstat3."""
        u = self.nfs.call(100003, 3, 7, Packer().opaque(fh).u64(offset).u32(len(data)).u32(stable).opaque(data).bytes())
        return u.u32()

    def commit(self, fh: bytes) -> int:
        return self.nfs.call(100003, 3, 21, Packer().opaque(fh).u64(0).u32(0).bytes()).u32()

    def read(self, fh: bytes, offset: int, count: int) -> bytes:
        u = self.nfs.call(100003, 3, 6, Packer().opaque(fh).u64(offset).u32(count).bytes())
        status = u.u32()
        assert status == 0, f"READ: status {status}"
        if u.bool():  # post_op_attr
            u.fixed(84)
        u.u32()  # count
        u.bool()  # eof
        return bytes(u.opaque(1 << 21))

    def read_all(self, fh: bytes, offset: int, length: int) -> bytes:
        """READ in 1 MiB calls (the server's rtmax) until ``length`` bytes or end of file."""
        out = bytearray()
        while len(out) < length:
            piece = self.read(fh, offset + len(out), min(1 << 20, length - len(out)))
            if not piece:
                break
            out += piece
        return bytes(out)


def nfs_write(
    mount_port: int, nfs_port: int, directory: str, name: str, offset: int, data: bytes, host: str = "127.0.0.1"
) -> None:
    """One FILE_SYNC NFS WRITE into DIRECTORY/NAME (what a guest's disk write looks like on the wire)."""
    d = NfsDir(mount_port, nfs_port, directory, host)
    assert d.write(d.lookup(name), offset, data) == 0, "WRITE failed"
