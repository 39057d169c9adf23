"""python -m nfsd DIR: serve a plain directory over NFSv3."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import fields
from pathlib import Path

from nfsd import eventloop
from nfsd.exports import Export
from nfsd.limits import Limits
from nfsd.localfs import LocalFS
from nfsd.server import NFSServer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nfsd", description="Serve a directory over NFSv3.")
    ap.add_argument("dir", type=Path)
    ap.add_argument("--bind", default="0.0.0.0")
    ap.add_argument("--nfs-port", type=int, default=2049)
    ap.add_argument("--mount-port", type=int, default=1058)
    ap.add_argument("--portmap-port", type=int, default=111, help="0 to run without a portmapper")
    ap.add_argument("--export-path", help="the path clients mount (default: DIR's absolute path)")
    ap.add_argument("--clients", default="0.0.0.0/0,::/0", help="allowed client networks, comma separated CIDR")
    ap.add_argument("--read-only", action="store_true")
    ap.add_argument("--root-squash", action="store_true")
    ap.add_argument("--secure-ports", action="store_true", help="require privileged client source ports")
    ap.add_argument("--secret", type=Path, help="handle secret file (default: DIR/../.nfsd-secret-<name>)")
    ap.add_argument("-v", "--verbose", action="store_true")
    lim = ap.add_argument_group("limits on what clients can make the server hold (see nfsd/limits.py)")
    for f in fields(Limits):
        lim.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            default=f.default,
            metavar="N",
            help=f"default {f.default}",
        )
    args = ap.parse_args(argv)
    try:
        limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
    except ValueError as exc:
        ap.error(str(exc))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="nfsd: %(message)s")
    directory = args.dir.resolve()
    if not directory.is_dir():
        print(f"nfsd: error: {directory} is not a directory", file=sys.stderr)
        return 2
    secret = args.secret or Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state")) / "bootback-nfsd" / (
        "secret-" + str(directory).strip("/").replace("/", "_")
    )
    export = Export(
        path=args.export_path or str(directory),
        backend=LocalFS(directory, read_only=args.read_only),
        clients=[c.strip() for c in args.clients.split(",") if c.strip()],
        read_only=args.read_only,
        root_squash=args.root_squash,
        require_privileged_port=args.secure_ports,
    )
    server = NFSServer(
        [export],
        secret_path=secret,
        bind=args.bind,
        nfs_port=args.nfs_port,
        mount_port=args.mount_port,
        portmap_port=args.portmap_port or None,
        limits=limits,
    )
    return eventloop.run(_serve(server, export))


async def _serve(server: NFSServer, export: Export) -> int:
    ports = await server.start()
    pm = "no portmapper"
    if ports.portmap:
        pm = f"portmapper {ports.portmap}{' (external)' if ports.portmap_external else ''}"
    print(f"nfsd: serving {export.path} on NFS port {ports.nfs}, MOUNT port {ports.mount}, {pm}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
