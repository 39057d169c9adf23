"""`bootback demo` on a fresh machine carries a virtual lab: the application group ``demo-lab`` (a web VM and a
client VM that reaches it over the lab network) verifies with `bootback lab verify demo-lab --state STATE`.

One demo is started for the module (its disks come from the shared build cache); the lab's Prometheus metrics
and its schedule are checked against the same running demo."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.daemon_process import ROOT, free_port

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="labs need root (network namespaces, bridges, taps)"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"),
]
BIND = "127.0.12.2"  # this demo's own loopback address: its portmapper (which qemu's nfs driver asks) is its own


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, build_cache: Path):
    data = tmp_path_factory.mktemp("labdemo") / "demo"
    env = {**os.environ, "BOOTBACK_BUILD_CACHE": str(build_cache), "PYTHONUNBUFFERED": "1"}
    port = free_port()
    deadline = time.monotonic() + 120
    while True:
        with socket.socket() as s:
            free = s.connect_ex((BIND, 111)) != 0
        if free:
            proc = subprocess.Popen(
                [sys.executable, "-m", "appliance", "demo", "--data", str(data), "--bind", BIND]
                + ["--control-port", str(port), "--portmap-port", "111", "--nfs-port", "0", "--mount-port", "0"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            out = ""
            while not out.endswith("\n\n") or "try" not in out:
                line = proc.stdout.readline()
                if not line:
                    break
                out += line
            if proc.poll() is None and "another program's" not in out:
                break
            proc.kill()
            proc.communicate()
        if time.monotonic() > deadline:
            pytest.fail(f"another program keeps the portmapper port {BIND}:111, which qemu's nfs driver needs")
        time.sleep(1)
    password = re.search(r"user admin, password (\S+)", out)[1]
    yield {"data": data, "state": data / "state", "out": out, "port": port, "password": password}
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + rest
    owner = hashlib.sha256(str((data / "state").resolve()).encode()).hexdigest()[:6]  # as Labs names them
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"bootback-lab-{owner}-" not in leftover, f"lab networks left behind: {leftover}"


def lab(demo: dict, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "lab", *args, "--state", str(demo["state"])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_demo_lab_verifies_out_of_the_box(demo: dict, artifacts_dir: Path) -> None:
    assert "lab verify demo-lab" in demo["out"], demo["out"]
    groups = json.loads(lab(demo, "groups", "--json").stdout)
    assert [g["name"] for g in groups] == ["demo-lab"], groups
    started = time.monotonic()
    p = lab(demo, "verify", "demo-lab", "--json")
    seconds = time.monotonic() - started
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    record = json.loads(p.stdout)
    assert record["state"] == "passed" and record["report"]["ok"] is True, record
    web, client = record["report"]["vms"]
    assert (web["vm"], web["state"], client["vm"], client["state"]) == ("demo-web", "passed", "demo-client", "passed")
    assert [c["type"] for c in web["checks"]] == ["console", "ping", "http", "screenshot"]
    assert all(c["ok"] and c["line"] for vm in (web, client) for c in vm["checks"])
    assert "client reached 10.0.0.10: demo-web: up" in client["checks"][0]["detail"], client["checks"][0]
    for vm in (web, client):
        png = Path(vm["screenshot"])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        shutil.copy(png, artifacts_dir / f"lab-{vm['vm']}.png")
    print(f"demo-lab verified in {seconds:.1f} s")
