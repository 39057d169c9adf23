"""Daemon subcommands: serve, publish, sessions, stop, migrate."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from appliance.commands.keys import add_key_options
from appliance.config import DaemonConfig, default_export_name, default_state_dir
from appliance.errors import ConfigError, UsageError, VerificationFailedError
from appliance.progress import byte_progress
from appliance.repo.backends import repository_arg
from appliance.repo.keys import KEY_FILE_ENV
from appliance.sessions.control import ControlClient
from appliance.units import parse_size
from nfsd.limits import parse_limits


def _state_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state", type=Path, default=None, help="state directory (default $BOOTBACK_STATE, /var/lib/bootback as root)"
    )


def _client_args(p: argparse.ArgumentParser) -> None:
    """What every command that asks the daemon takes: where its state (and control socket) is, and --json."""
    _state_arg(p)
    p.add_argument("--json", action="store_true")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the appliance daemon: NFS datastore, sessions, control port")
    p.add_argument(
        "--repo",
        type=repository_arg,
        action="append",
        default=[],
        help="a repository to serve, a directory or s3://BUCKET/PREFIX (repeatable)",
    )
    p.add_argument(
        "--repo-dir",
        type=Path,
        action="append",
        default=[],
        help="serve every repository found in this directory (the container's /repositories)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        action="append",
        default=[],
        help="where write caches go (default STATE/cache); repeat it to let a publish name other "
        "directories with --cache: the first is the default, caches go nowhere else",
    )
    p.add_argument(
        "--migration-dir",
        type=Path,
        action="append",
        default=None,
        help="a directory migrations may write into (repeatable; $BOOTBACK_MIGRATION_DIRS, colon-"
        "separated); outputs anywhere else are refused. Default: STATE/migrations, and "
        "/migrations when it exists (the container's volume)",
    )
    _state_arg(p)
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--nfs-port", type=int, default=2049)
    p.add_argument("--mount-port", type=int, default=1058)
    p.add_argument("--portmap-port", type=int, default=111, help="0: no portmapper")
    p.add_argument("--control-port", type=int, default=6161)
    p.add_argument(
        "--export",
        default=os.environ.get("BOOTBACK_EXPORT"),
        help="export path (default /bootback-<hostname>; $BOOTBACK_EXPORT)",
    )
    p.add_argument(
        "--clients",
        default=os.environ.get("BOOTBACK_CLIENTS", "0.0.0.0/0,::/0"),
        help="allowed client networks, comma-separated CIDR ($BOOTBACK_CLIENTS)",
    )
    p.add_argument(
        "--min-free",
        default=os.environ.get("BOOTBACK_MIN_FREE", "100G"),
        help="refuse new sessions below this free cache space ($BOOTBACK_MIN_FREE)",
    )
    p.add_argument(
        "--read-cache",
        default=os.environ.get("BOOTBACK_READ_CACHE", "20G"),
        help="local space for decompressed chunks of published disks, at most half the free space; "
        "0 turns it off ($BOOTBACK_READ_CACHE)",
    )
    p.add_argument(
        "--advertise",
        default=os.environ.get("BOOTBACK_ADVERTISE"),
        help="host name or address to put in nfs:// URLs ($BOOTBACK_ADVERTISE)",
    )
    for option, env, default, what in (
        ("--max-sessions", "BOOTBACK_MAX_SESSIONS", 100, "sessions published at once, at most"),
        ("--max-publish", "BOOTBACK_MAX_PUBLISH", 25, "VMs one publish request may name, at most"),
        ("--max-verifications", "BOOTBACK_MAX_VERIFICATIONS", 2, "verifications booting at once, at most"),
        ("--verify-max-memory", "BOOTBACK_VERIFY_MAX_MEMORY", 4096, "guest RAM in MiB a verification may ask for"),
    ):
        # argparse applies the type to a string default too: a bad $BOOTBACK_... is a usage error naming the option
        p.add_argument(
            option,
            type=_positive_int,
            default=os.environ.get(env, str(default)),
            help=f"{what} (default {default}; ${env})",
        )
    p.add_argument(
        "--nfs-limit",
        action="append",
        default=None,
        metavar="NAME=VALUE",
        help="a bound on what NFS clients can make the daemon hold, e.g. max_connections_per_client=8 "
        "(repeatable; $BOOTBACK_NFS_LIMITS, comma-separated; names and defaults in docs/security.md)",
    )
    p.add_argument(
        "--fixed-ports",
        action="store_true",
        default=os.environ.get("BOOTBACK_FIXED_PORTS", "") not in ("", "0", "false", "no"),
        help="refuse to start when the NFS or MOUNT port is taken instead of moving to the next free one, so a "
        "firewall opened for them always matches ($BOOTBACK_FIXED_PORTS=1)",
    )
    p.add_argument("--no-web", action="store_true", help="do not start the web app on the control port")
    add_key_options(p)  # each key file names its repository; BOOTBACK_PASSPHRASE opens the others
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("publish", help="publish restore points as VM folders on the datastore")
    p.add_argument("vms", nargs="+", metavar="VM[@POINT]", help="one or more VMs (mass recovery)")
    p.add_argument("--mode", choices=("instant", "sandbox"), default="instant")
    p.add_argument("--cache", help="write cache directory for these sessions")
    p.add_argument("--repo", help="repository name or path, when the daemon serves several")
    p.add_argument(
        "--prefetch",
        action="store_true",
        help="warm the whole disk into the read cache in the background while the VM runs (S3 repositories)",
    )
    _client_args(p)
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("sessions", help="list sessions")
    _client_args(p)
    p.set_defaults(func=cmd_sessions)

    p = sub.add_parser("stop", help="stop a session (a sandbox's cache is discarded)")
    p.add_argument("session")
    p.add_argument("--force", action="store_true", help="discard an instant session's unmigrated changes")
    _client_args(p)
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("verify-boot", help="verify a backup: boot it as a sandbox, in isolation, and check it runs")
    p.add_argument("vms", nargs="*", metavar="VM[@POINT]", help="one or more VMs (latest point unless named)")
    p.add_argument(
        "--all",
        action="store_true",
        help="every VM's latest restore point, one after the other (a nightly job); exit 70 when any does not verify",
    )
    p.add_argument("--expect", help="a regular expression the guest's serial console must print")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the guest (default 300)")
    p.add_argument("--memory", type=int, default=1024, help="guest memory in MiB")
    p.add_argument(
        "--console-log",
        type=Path,
        help="keep the guest's console output in this file "
        "(a directory, VM.console in it, when several VMs are verified)",
    )
    _client_args(p)
    p.set_defaults(func=cmd_verify_boot)

    p = sub.add_parser("health", help="check that the daemon (and the web app) answer; exit 0 when healthy")
    p.add_argument("--port", type=int, default=6161, help="web app port to check (0: daemon only)")
    _state_arg(p)
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("migrate", help="copy a session's current disks (backup + changes) out, while it runs")
    p.add_argument("session")
    p.add_argument("-o", "--output", required=True, help="a file (one disk) or a directory (a whole VM folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--no-wait", action="store_true")
    _client_args(p)
    p.set_defaults(func=cmd_migrate)


def _client(args: argparse.Namespace) -> ControlClient:
    return ControlClient(args.state or default_state_dir())


def cmd_serve(args: argparse.Namespace) -> int:
    # The daemon's own: the client commands (publish, sessions, stop, ...) start without any of these.
    from appliance.daemon import Daemon
    from appliance.repo.repository import find_repositories
    from nfsd import eventloop
    from nfsd.server import PortError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    web = not args.no_web and importlib.util.find_spec("web.launcher") is not None
    for d in args.repo_dir:
        find_repositories(d)  # a wrong directory is a usage error now, not a silent empty appliance
    if args.key_file:  # the daemon and the web app (a child: file downloads) open repositories with these
        os.environ[KEY_FILE_ENV] = os.pathsep.join(str(f.resolve()) for f in args.key_file)
    migration_dirs = args.migration_dir
    if migration_dirs is None and os.environ.get("BOOTBACK_MIGRATION_DIRS"):
        migration_dirs = [Path(d) for d in os.environ["BOOTBACK_MIGRATION_DIRS"].split(":") if d]
    pairs = args.nfs_limit
    if pairs is None:
        pairs = [p for p in os.environ.get("BOOTBACK_NFS_LIMITS", "").split(",") if p.strip()]
    try:
        nfs_limits = parse_limits(pairs)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    config = DaemonConfig(
        repos=list(args.repo),
        repo_dirs=list(args.repo_dir),
        cache_dir=args.cache_dir[0] if args.cache_dir else None,
        cache_dirs=list(args.cache_dir[1:]),
        migration_dirs=migration_dirs,
        max_sessions=args.max_sessions,
        max_publish=args.max_publish,
        max_verifications=args.max_verifications,
        verify_max_memory_mib=args.verify_max_memory,
        state_dir=args.state or default_state_dir(),
        bind=args.bind,
        nfs_port=args.nfs_port,
        mount_port=args.mount_port,
        portmap_port=args.portmap_port or None,
        control_port=args.control_port,
        export_path=args.export or default_export_name(),
        clients=[c.strip() for c in args.clients.split(",") if c.strip()],
        min_free_bytes=parse_size(args.min_free),
        read_cache_bytes=parse_size(args.read_cache),
        advertise=args.advertise,
        web=web,
        nfs_limits=nfs_limits,
        fixed_ports=args.fixed_ports,
    )
    daemon = Daemon(config, start_web=start_web_app if web else None)
    try:
        eventloop.run(daemon.run())
    except PortError as exc:  # a taken port is the operator's to resolve: one line, not a traceback
        raise ConfigError(f"cannot listen: {exc.strerror}") from None
    return 0


def start_web_app(*args: Any, **kwargs: Any) -> subprocess.Popen:
    """The web app's starter, wired into the daemon here (the composition root): the domain never imports web.
    Imported late, so commands that do not serve work without the web layer."""
    from web.launcher import start_web

    return start_web(*args, **kwargs)


def _print(args: argparse.Namespace, doc: object, text: str) -> None:
    print(json.dumps(doc, indent=2) if args.json else text)


def cmd_publish(args: argparse.Namespace) -> int:
    extra = {"prefetch": True} if args.prefetch else {}
    docs = _client(args).call("publish", vms=args.vms, mode=args.mode, cache=args.cache, repo=args.repo, **extra)
    if args.json:
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
        return 0
    for d in docs:
        print(f"published {d['vm']}@{d['point']} as session {d['id']} ({d['mode']}): {d['nfs_url']}")
        print(f"  files: {', '.join(d['files'])}")
    return 0


def cmd_sessions(args: argparse.Namespace) -> int:
    docs = _client(args).call("sessions")
    if args.json:
        print(json.dumps(docs, indent=2))
        return 0
    if not docs:
        print("no sessions")
    for d in docs:
        mig = f", migrated to {d['migrated_to']}" if d.get("migrated_to") else ""
        print(
            f"{d['id']}  {d['mode']:<8} {d['vm']}@{d['point']}  {d['path']}  "
            f"cache {d['cache_used_bytes'] / 1e6:.1f} MB{mig}"
        )
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    doc = _client(args).call("stop", id=args.session, force=args.force)
    _print(args, doc, f"stopped session {doc['id']} ({doc['folder']})")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    client = _client(args)
    output = str(Path(args.output).resolve())
    status = client.call("migrate", id=args.session, output=output, overwrite=args.overwrite)
    if not args.no_wait:
        with byte_progress(not args.json) as update:
            while status["running"]:
                update("migrate", status["copied_bytes"], status["total_bytes"])
                time.sleep(0.2)
                status = client.call("migrate_status", id=args.session)
            update("migrate", status["copied_bytes"], status["total_bytes"])
    if status.get("error"):
        print(f"bootback: error: migration failed: {status['error']}", file=sys.stderr)
        return 30 if "space" in status["error"] else 40
    _print(
        args,
        status,
        f"migrated session {args.session} to {output} ({status['total_bytes']} bytes, {status['passes']} passes)"
        if not status["running"]
        else f"migrating to {output}",
    )
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the web app answers on its port and reaches the daemon (container HEALTHCHECK); with
    --port 0, when the daemon answers on its control socket."""
    import ssl
    import urllib.request

    if not args.port:
        try:
            _client(args).call("status")
        except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy", with its reason
            print(f"unhealthy: daemon: {exc}", file=sys.stderr)
            return 1
    else:  # the web app's health endpoint asks the daemon itself, wherever its state directory is
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # our own self-signed certificate, on loopback
        # no proxies: the check is about this host's loopback, whatever https_proxy says
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
        try:
            with opener.open(f"https://127.0.0.1:{args.port}/api/v1/health", timeout=5) as r:
                body = json.loads(r.read())
        except Exception as exc:  # noqa: BLE001
            print(f"unhealthy: web app: {exc}", file=sys.stderr)
            return 1
        if body.get("status") != "ok":
            print(f"unhealthy: web app says {body}", file=sys.stderr)
            return 1
    print("healthy")
    return 0


def cmd_verify_boot(args: argparse.Namespace) -> int:
    from appliance.verification import require_verified, verify_boot

    client = _client(args)
    targets: list[tuple[str, str | None]] = [(vm, None) for vm in args.vms]
    if args.all:
        repos = client.call("repositories")
        targets += [(vm, r["name"] if len(repos) > 1 else None) for r in repos for vm in r["vms"]]
    if not targets:
        raise UsageError("verify-boot: name one or more VMs, or --all")
    several = len(targets) > 1
    if several and args.console_log:
        args.console_log.mkdir(parents=True, exist_ok=True)
    reports = []
    for vm, repo in targets:
        log_path = args.console_log
        if several and args.console_log:
            log_path = args.console_log / f"{vm.replace('@', '_')}.console"
        report = verify_boot(
            client,
            vm,
            timeout=args.timeout,
            expect=args.expect,
            console_log=log_path,
            memory_mib=args.memory,
            repo=repo,
        )
        reports.append(report)
        if not args.json:
            state = "verified" if report["verified"] else "NOT verified"
            print(
                f"{report['vm']}@{report['point']}: {state} in {report['seconds']} s (first console line after "
                f"{report['first_console_line_seconds']} s)",
                flush=True,
            )
    if args.json:
        print(json.dumps(reports if several else reports[0], indent=2))
    failed = [r for r in reports if not r["verified"]]
    if several and failed:
        names = ", ".join(f"{r['vm']}@{r['point']}" for r in failed)
        raise VerificationFailedError(f"{len(failed)} of {len(reports)} did not verify: {names}")
    require_verified(reports[0])
    return 0
