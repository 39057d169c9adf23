"""The portmapper's port taken by a program that then goes away (rpcbind restarting, another appliance stopping
while this one starts): the server takes the port itself instead of dying on the refused registration."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

from nfsd.exports import Export
from nfsd.handles import HandleCodec
from nfsd.localfs import LocalFS
from nfsd.server import NFSServer


def test_portmapper_port_whose_owner_went_away_is_taken(tmp_path: Path) -> None:
    owner = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # holds the port, answers no portmap call
    owner.bind(("127.0.0.1", 0))
    port = owner.getsockname()[1]
    threading.Timer(0.1, owner.close).start()  # ... and goes away while the server starts
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
