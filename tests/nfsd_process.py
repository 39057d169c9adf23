"""Run `python -m nfsd` as a real server process for integration tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Loopback only, ports the kernel picks, no portmapper: servers of parallel tests never meet (python -m nfsd and
# bootback serve take the same options).
PRIVATE_PORTS = ("--bind", "127.0.0.1", "--nfs-port", "0", "--mount-port", "0", "--portmap-port", "0")


class NfsdProcess:
    def __init__(self, directory: Path, *args: str, secret: Path | None = None) -> None:
        self.directory = Path(directory)
        self.args = list(args)
        self.secret = secret or self.directory.parent / f".secret-{self.directory.name}"
        self.proc: subprocess.Popen | None = None
        self.nfs_port = self.mount_port = 0
        self.output = ""

    def start(self, timeout: float = 20) -> NfsdProcess:
        log = open(self.directory.parent / f".nfsd-{self.directory.name}.log", "w+")  # noqa: SIM115
        self._log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nfsd", str(self.directory), "--secret", str(self.secret), *self.args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.output = Path(log.name).read_text()
            m = re.search(r"NFS port (\d+), MOUNT port (\d+)", self.output)
            if m:
                self.nfs_port, self.mount_port = int(m[1]), int(m[2])
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"nfsd exited: {self.output}")
            time.sleep(0.05)
        raise TimeoutError(f"nfsd did not start: {self.output}")

    def log(self) -> str:
        return Path(self._log.name).read_text()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def url(self, rel: str = "", direct: bool = True) -> str:
        """nfs:// URL of a path under the export; ``direct`` skips the portmapper (libnfs only)."""
        base = f"nfs://127.0.0.1{self.directory}"
        path = f"{base}/{rel}" if rel else base
        return f"{path}?nfsport={self.nfs_port}&mountport={self.mount_port}" if direct else path

    def __enter__(self) -> NfsdProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
