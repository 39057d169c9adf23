"""Probe one port the way a client would, from wherever it runs (the tests run it in a network namespace).

    probe.py tcp HOST PORT        a TCP connect
    probe.py rpc-udp HOST PORT    an ONC RPC NULL call to the portmapper (program 100000, version 2) over UDP

Prints one word: "open" (connected / answered), "refused" (RST or ICMP unreachable) or "timeout" (dropped).
Standard library only: molecule's verify and the pytest harness both run it with any Python 3."""

from __future__ import annotations

import os
import socket
import struct
import sys

TIMEOUT = 3.0


def tcp(host: str, port: int) -> str:
    try:
        socket.create_connection((host, port), timeout=TIMEOUT).close()
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    return "open"


def rpc_udp(host: str, port: int) -> str:
    xid = int.from_bytes(os.urandom(4), "big")
    # xid, CALL, RPC version 2, PMAP_PROG 100000, version 2, NULL; AUTH_NONE credential and verifier.
    call = struct.pack(">10I", xid, 0, 2, 100000, 2, 0, 0, 0, 0, 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT)
        s.connect((host, port))
        try:
            s.send(call)
            reply = s.recv(512)
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "timeout"
    # xid echoed, REPLY, MSG_ACCEPTED, verifier AUTH_NONE of length 0, SUCCESS
    if len(reply) >= 24 and struct.unpack(">6I", reply[:24]) == (xid, 1, 0, 0, 0, 0):
        return "open"
    return f"bad reply {reply.hex()}"


if __name__ == "__main__":
    kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print({"tcp": tcp, "rpc-udp": rpc_udp}[kind](host, port))
