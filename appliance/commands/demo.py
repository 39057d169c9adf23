"""`bootback demo`: the embedded default — a local repository with a demo VM, the NFS datastore and the
admin page, started with one command."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import secrets
import shlex
import shutil
import sys
from pathlib import Path

from appliance.commands.daemon import start_web_app
from appliance.config import DaemonConfig
from nfsd import eventloop


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="start bootback with an embedded demo repository, NFS and the admin page")
    p.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("BOOTBACK_DEMO_DIR", "demo-data")),
        help="where the demo repository and state live (default ./demo-data)",
    )
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--control-port", type=int, default=6161)
    p.add_argument(
        "--portmap-port",
        type=int,
        default=_portmapper_default(),
        help="0: no portmapper (the default when this user cannot bind 111)",
    )
    p.add_argument("--nfs-port", type=int, default=2049)
    p.add_argument("--mount-port", type=int, default=1058)
    p.add_argument("--no-web", action="store_true")
    p.add_argument("--prepare-only", action="store_true", help="create the demo repository and exit")
    p.set_defaults(func=cmd_demo)


def _portmapper_default() -> int:
    """111 when this process may bind it: as root, or where the kernel lets every user bind low ports (Docker
    sets net.ipv4.ip_unprivileged_port_start=0 in a container's network namespace, so the image's demo has a
    portmapper under --user bootback too: qemu's nfs:// driver and kernel clients need it); else 0 (off)."""
    if os.geteuid() == 0:
        return 111
    try:
        first = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 0
    return 111 if first <= 111 else 0


def _demo_password(data: Path) -> str:
    """A password kept beside the demo data, so every run can print it (a real appliance prints it once)."""
    if os.environ.get("BOOTBACK_ADMIN_PASSWORD"):
        return os.environ["BOOTBACK_ADMIN_PASSWORD"]
    path = data / "admin-password"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(12))
    return path.read_text().strip()


def command_as_typed(argv0: str) -> str:
    """How to call this same bootback from the current directory, for the printed "try" lines: `bootback` only
    when PATH finds this one (`./run demo` starts .venv/bin/bootback, which is not on PATH), else its path
    (relative when under the current directory), or `python -m appliance` when started that way."""
    script = os.path.abspath(argv0)
    if os.path.basename(script) != "bootback":
        return f"{shlex.quote(sys.executable)} -m appliance"
    found = shutil.which("bootback")
    if found and os.path.abspath(found) == script:
        return "bootback"
    relative = os.path.relpath(script)
    return shlex.quote(relative if not relative.startswith("..") else script)


def cmd_demo(args: argparse.Namespace) -> int:
    from appliance.daemon import Daemon
    from appliance.demo.embedded import VM, prepare_demo

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    print("bootback demo: preparing the demo repository (first run builds the demo VM) ...", file=sys.stderr)
    demo = prepare_demo(args.data)
    kind = "bootable (Debian kernel + busybox)" if demo.bootable else "data disk (no boot tools here)"
    print(f"bootback demo: repository {demo.repo}: VM '{VM}', {demo.points} restore points, {kind}", file=sys.stderr)
    if args.prepare_only:
        return 0
    web = not args.no_web and importlib.util.find_spec("web.launcher") is not None
    password = _demo_password(Path(args.data).resolve())
    os.environ["BOOTBACK_ADMIN_PASSWORD"] = password
    config = DaemonConfig(
        repos=[demo.repo],
        state_dir=demo.state,
        bind=args.bind,
        nfs_port=args.nfs_port,
        mount_port=args.mount_port,
        portmap_port=args.portmap_port or None,
        control_port=args.control_port,
        export_path="/bootback-demo",
        min_free_bytes=1 << 30,
        web=web,
    )
    daemon = Daemon(config, start_web=start_web_app if web else None)

    async def run() -> None:
        await daemon.start()
        ports = daemon.server.ports
        host = config.host
        direct = f"?nfsport={ports.nfs}&mountport={ports.mount}"
        me, state, repo = command_as_typed(sys.argv[0]), shlex.quote(str(demo.state)), shlex.quote(str(demo.repo))
        lines = [
            "",
            "bootback demo is running (Ctrl-C stops it; instant sessions come back next time)",
            f"  admin page : https://{host}:{config.control_port}/   user admin, password {password}"
            if web
            else "  admin page : off (--no-web)",
            f"  NFS export : {host}:{config.export_path}  (NFS {ports.nfs}, MOUNT {ports.mount}, portmapper "
            f"{ports.portmap or 'off'})",
            f"  try        : {me} publish {VM} --mode sandbox --state {state}",
            f"               nfs-ls 'nfs://{host}{config.export_path}/{direct}'",
            f"               {me} files {repo} {VM} /p1   # files inside the backup (or Browse files)",
            *(
                [f"               {me} lab verify demo-lab --state {state}   # two VMs on an isolated network"]
                if demo.lab
                else []
            ),
            "",
        ]
        print("\n".join(lines), flush=True)
        await daemon.run_until_stopped()

    eventloop.run(run())
    return 0
