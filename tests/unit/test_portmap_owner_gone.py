"""The portmapper's port taken by a program that then goes away (rpcbind restarting, another appliance stopping
while this one starts): the server takes the port itself instead of dying on the refused registration."""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path

import pytest

from nfsd import portmap
from nfsd.exports import Export
from nfsd.handles import HandleCodec
from nfsd.localfs import LocalFS
from nfsd.server import NFSServer


def _udp_owner() -> tuple[socket.socket, int]:
    """A UDP socket holding a port that is free on TCP too, below the ephemeral range: a port the kernel picked
    for the owner could also be some other process's client connection on TCP (CI runs many), and the server
    then found it taken on its last try."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.Random().sample(range(10000, min(low, 32768)), 500):
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        owner = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # holds the port, answers no portmap call
        try:
            tcp.bind(("127.0.0.1", port))
            owner.bind(("127.0.0.1", port))
        except OSError:
            owner.close()
            continue
        finally:
            tcp.close()
        return owner, port
    raise AssertionError("no port free on both TCP and UDP")


def test_portmapper_port_whose_owner_went_away_is_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    owner, port = _udp_owner()
    unset = portmap.remote_unset

    def owner_goes_away(*args: object) -> object:
        # ... and goes away while the server starts: after its bind was refused, before its registration (a
        # timer here made the test depend on the machine's load: CI once saw the owner outlive every retry)
        owner.close()
        return unset(*args)

    monkeypatch.setattr(portmap, "remote_unset", owner_goes_away)
    server = NFSServer(
        [Export(path="/x", backend=LocalFS(tmp_path))],
        codec=HandleCodec(b"k" * 32),
        bind="127.0.0.1",
        nfs_port=0,
        mount_port=0,
        portmap_port=port,
    )

    async def scenario() -> None:
        ports = await server.start()
        try:
            assert ports.portmap == port and not ports.portmap_external
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass  # our own portmapper answers there now
        finally:
            await server.stop()

    asyncio.run(scenario())
