"""`bootback serve` hands its NFS bounds and port policy to the real server: `--nfs-limit`, `--fixed-ports`."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_process import ROOT, DaemonProcess, bootback, free_port
from tests.nfsd_process import PRIVATE_PORTS
from tests.rpcclient import RpcClient

NFS_PROG, NFS_VERS = 100003, 3


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serveopts") / "repo"
    bootback("init", path)
    return path


def null_answers(port: int) -> bool:
    """Whether a fresh connection gets an answer to NFS NULL (a refused one is closed at once)."""
    try:
        c = RpcClient("127.0.0.1", port, timeout=5)
    except OSError:
        return False
    try:
        c.call(NFS_PROG, NFS_VERS, 0)
        return True
    except (OSError, struct.error, ConnectionError):
        return False
    finally:
        c.close()


def serve_once(repo: Path, state: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`bootback serve` expected to stop at start: its exit and what it said."""
    cmd = [sys.executable, "-m", "appliance", "serve", "--repo", str(repo), "--state", str(state), "--no-web", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env or dict(os.environ))


def test_nfs_limit_reaches_the_server(repo: Path, tmp_path: Path) -> None:
    d = DaemonProcess(repo, tmp_path / "state", *PRIVATE_PORTS, "--nfs-limit", "max_connections_per_client=2").start()
    try:
        held = [RpcClient("127.0.0.1", d.nfs_port, timeout=5) for _ in range(2)]
        for c in held:
            c.call(NFS_PROG, NFS_VERS, 0)
        assert not null_answers(d.nfs_port), "a third connection from one address was served"
        held.pop().close()
        # the slot freed is usable again (the server notices the close on its next loop turn)
        assert any(null_answers(d.nfs_port) for _ in range(20))
        for c in held:
            c.close()
    finally:
        d.stop()


def test_a_bad_limit_stops_the_start_naming_it(repo: Path, tmp_path: Path) -> None:
    p = serve_once(
        repo,
        tmp_path / "state",
        *PRIVATE_PORTS,
        env={"PATH": "/usr/bin:/bin", "BOOTBACK_NFS_LIMITS": "max_connections=lots"},
    )
    assert p.returncode != 0 and "max_connections" in p.stderr and "'lots'" in p.stderr, p.stderr


def test_fixed_ports_refuse_a_taken_port_instead_of_moving(repo: Path, tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        common = ["--bind", "127.0.0.1", "--nfs-port", str(port), "--mount-port", "0", "--portmap-port", "0"]
        moved = DaemonProcess(repo, tmp_path / "moves", *common).start()
        try:
            assert moved.nfs_port != port  # the default: the next free port
        finally:
            moved.stop()
        for how, env in ((["--fixed-ports"], {}), ([], {"BOOTBACK_FIXED_PORTS": "1"})):  # the role sets the env
            p = serve_once(repo, tmp_path / "fixed", *common, *how, env={**os.environ, **env})
            assert p.returncode == 3 and f"port {port}" in p.stderr and "taken" in p.stderr, (how, env, p.stderr)
            assert "Traceback" not in p.stderr, p.stderr  # one line for the operator


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--max-sessions", "0"], {}, "--max-sessions"),
        ([], {"BOOTBACK_MAX_PUBLISH": "many"}, "--max-publish"),
        ([], {"BOOTBACK_VERIFY_MAX_MEMORY": "-5"}, "--verify-max-memory"),
    ],
)
def test_a_bad_cap_stops_the_start_naming_it(
    repo: Path, tmp_path: Path, args: list[str], env: dict[str, str], named: str
) -> None:
    p = serve_once(repo, tmp_path / "s", *PRIVATE_PORTS, *args, env={**os.environ, **env})
    assert p.returncode == 2 and named in p.stderr and "at least 1" in p.stderr, p.stderr
