"""The portmapper's port taken by a program that then goes away (rpcbind restarting, another appliance stopping
while this one starts): the server takes the port itself instead of dying on the refused registration."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from nfsd import portmap
from nfsd.exports import Export
from nfsd.handles import HandleCodec
from nfsd.localfs import LocalFS
from nfsd.server import NFSServer


def test_portmapper_port_whose_owner_went_away_is_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    owner = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # holds the port, answers no portmap call
    owner.bind(("127.0.0.1", 0))
    port = owner.getsockname()[1]
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
