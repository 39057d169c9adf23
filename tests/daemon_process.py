"""Run `bootback serve` as a real daemon process for integration tests."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.nfsd_process import PRIVATE_PORTS

ROOT = Path(__file__).resolve().parent.parent
EXPORT = "/bootback"


def bootback(*args: str | Path, ok: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, "-m", "appliance", *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    if ok and p.returncode != 0:
        raise AssertionError(f"bootback {args} failed ({p.returncode}): {p.stderr}")
    return p


def tree_hash(root: Path) -> str:
    """A hash of every file name and content under ``root``: the repository must never change."""
    h = hashlib.sha256()
    for path in sorted(Path(root).rglob("*")):
        if path.is_file() and path.name != "lock":
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


class DaemonProcess:
    def __init__(
        self,
        repo: Path,
        state: Path,
        *args: str,
        web_port: int | None = None,
        env: dict[str, str] | None = None,
        repo_flag: str = "--repo",
    ) -> None:
        self.repo, self.state, self.args, self.repo_flag = Path(repo), Path(state), list(args), repo_flag
        self.web_port, self.env = web_port, env or {}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.state.parent / f"{self.state.name}-daemon.log"
        self.nfs_port = 0

    def start(self, timeout: float = 30) -> DaemonProcess:
        self.state.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a")  # noqa: SIM115
        offset = self.log_path.stat().st_size
        cmd = [
            sys.executable,
            "-m",
            "appliance",
            "serve",
            self.repo_flag,
            str(self.repo),
            "--state",
            str(self.state),
            "--export",
            EXPORT,
            "--min-free",
            "1M",
            "--migration-dir",
            str(self.state.parent),
            *self.args,
        ]
        cmd += ["--control-port", str(self.web_port)] if self.web_port else ["--no-web"]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text()[offset:]
            m = re.search(r"bootback: ready, export \S+ on NFS port (\d+)", text)
            if m:
                self.nfs_port = int(m[1])
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {text}")
            time.sleep(0.05)
        raise TimeoutError(f"daemon did not start: {self.log_path.read_text()[offset:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cli(self, *args: str | Path, ok: bool = True) -> subprocess.CompletedProcess:
        return bootback(*args, "--state", self.state, ok=ok)

    def publish(self, *refs: str, mode: str = "instant", extra: tuple[str, ...] = ()) -> dict | list:
        return json.loads(self.cli("publish", *refs, "--mode", mode, "--json", *extra).stdout)

    def log(self) -> str:
        return self.log_path.read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def web_appliance(repo: Path, state: Path, password: str) -> tuple[DaemonProcess, str]:
    """A daemon on loopback with private NFS ports and the web app on a free port; returns it and its URL."""
    port = free_port()
    d = DaemonProcess(
        repo,
        state,
        *PRIVATE_PORTS,
        web_port=port,
        env={"BOOTBACK_ADMIN_PASSWORD": password},
    )
    return d.start(), f"https://127.0.0.1:{port}"
