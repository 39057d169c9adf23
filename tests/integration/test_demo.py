"""The README's main job: `bootback demo` makes a repository with a demo VM and serves it, with the admin page."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.daemon_process import ROOT, bootback, free_port


def test_demo_prepares_once_then_serves_and_stops_cleanly(tmp_path: Path, build_cache: Path) -> None:
    data = tmp_path / "demo"
    env = {**os.environ, "BOOTBACK_BUILD_CACHE": str(build_cache), "PYTHONUNBUFFERED": "1"}
    first = subprocess.run(
        [sys.executable, "-m", "appliance", "demo", "--data", str(data), "--prepare-only"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr
    assert "VM 'demo-vm', 2 restore points" in first.stderr
    points = json.loads(bootback("points", data / "repo", "--vm", "demo-vm", "--json").stdout)
    assert len(points) == 2
    # the second restore point is incremental: it stored a small fraction of the disk
    assert points[1]["stats"]["bytes_new"] < points[0]["stats"]["bytes_new"] / 4

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance",
            "demo",
            "--data",
            str(data),
            "--bind",
            "127.0.0.1",
            "--control-port",
            str(port),
            "--portmap-port",
            "0",
            "--nfs-port",
            "0",
            "--mount-port",
            "0",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = ""
    try:
        deadline = time.monotonic() + 60
        while "nfs-ls" not in out and time.monotonic() < deadline and proc.poll() is None:
            out += proc.stdout.readline()
        assert "2 restore points" in out, out  # reused, not rebuilt
        password = re.search(r"user admin, password (\S+)", out)[1]
        nfs_ls = re.search(r"nfs-ls '([^']+)'", out)[1]
        s = requests.Session()
        s.trust_env = False
        s.verify = str(data / "state" / "web" / "tls.crt")  # the certificate the demo made for itself
        login = s.get(f"https://127.0.0.1:{port}/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', login.text)[1]
        page = s.post(
            f"https://127.0.0.1:{port}/login", data={"csrf_token": csrf, "username": "admin", "password": password}
        )
        assert page.status_code == 200 and "demo-vm" in page.text
        listing = subprocess.run(["nfs-ls", nfs_ls], capture_output=True, text=True, timeout=30)
        assert listing.returncode == 0, listing.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + rest
