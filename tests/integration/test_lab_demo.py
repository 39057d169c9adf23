"""`bootback demo` on a fresh machine carries a virtual lab: the application group ``demo-lab`` (a web VM, and a
client VM that finds it in the lab's DNS and reaches it over the lab network) verifies with
`bootback lab verify demo-lab --state STATE`.

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
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from appliance.lab.service import LIVE
from appliance.sessions.control import ControlClient
from tests.daemon_process import ROOT, free_port

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="labs need root (network namespaces, bridges, taps)"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"),
]
BIND = "127.0.12.2"
# demo-client has no guest agent (no virtio_console in its initramfs): the agent check fails at its timeout
TICK = {
    "name": "demo-tick",
    "schedule": "* * * * *",
    "vms": [
        {
            "vm": "demo-client",
            "memory_mib": 96,
            "checks": [
                {"type": "console", "expect": "bootback-lab: client booted", "timeout": 120},
                {"type": "agent", "timeout": 5},
            ],
        }
    ],
}  # this demo's own loopback address: its portmapper (which qemu's nfs driver asks) is its own


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
    # a second group on a schedule of every minute: its run comes while demo-lab is verified (see below)
    tick = demo["data"] / "demo-tick.json"
    tick.write_text(json.dumps(TICK))
    assert lab(demo, "define", str(tick)).returncode == 0
    listed = lab(demo, "groups").stdout
    assert re.search(r"demo-tick: demo-client  \(schedule \* \* \* \* \*, next run \S+:00[+-]", listed), listed
    started = time.monotonic()
    p = lab(demo, "verify", "demo-lab", "--json")
    seconds = time.monotonic() - started
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    record = json.loads(p.stdout)
    assert record["state"] == "passed" and record["report"]["ok"] is True, record
    web, client = record["report"]["vms"]
    assert (web["vm"], web["state"], client["vm"], client["state"]) == ("demo-web", "passed", "demo-client", "passed")
    assert record["trigger"] == "request"
    assert [c["type"] for c in web["checks"]] == ["console", "ping", "http", "agent", "screenshot"]
    assert web["checks"][3]["line"].startswith("agent org.qemu.guest_agent.0: passed"), web["checks"][3]
    assert all(c["ok"] and c["line"] for vm in (web, client) for c in vm["checks"])
    # the client found the web VM by name in the lab's DNS, then fetched its page over the lab network
    assert "client resolved demo-web to 10.0.0.10" in client["checks"][0]["detail"], client["checks"][0]
    assert "client reached 10.0.0.10: demo-web: up" in client["checks"][1]["detail"], client["checks"][1]
    for vm in (web, client):
        png = Path(vm["screenshot"])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        shutil.copy(png, artifacts_dir / f"lab-{vm['vm']}.png")
    print(f"demo-lab verified in {seconds:.1f} s")


@pytest.mark.slow
def test_the_scheduled_group_ran_and_metrics_show_both_results(demo: dict) -> None:
    """demo-tick (defined above, every minute) ran by itself, failed at its agent check's timeout with a line
    saying so; the metrics endpoint shows demo-lab passed, demo-tick failed, and when each ran."""
    client = ControlClient(demo["state"])
    deadline = time.monotonic() + 150
    while True:
        ticks = [r for r in client.call("lab_list") if r["group"] == "demo-tick" and r["state"] not in LIVE]
        if ticks or time.monotonic() > deadline:
            break
        time.sleep(1)
    client.call("lab_group_remove", name="demo-tick")
    assert ticks, client.call("lab_list")
    record = ticks[-1]
    assert (record["trigger"], record["kind"], record["state"]) == ("schedule", "verification", "failed"), record
    (vm,) = record["report"]["vms"]
    assert [c["ok"] for c in vm["checks"]] == [True, False], vm["checks"]
    line = vm["checks"][1]["line"]
    assert line.startswith("agent org.qemu.guest_agent.0: FAILED after "), line
    assert "no answer from the guest agent" in line and "5 s timeout" in line, line
    while any(r["state"] in LIVE for r in client.call("lab_list")) and time.monotonic() < deadline + 60:
        time.sleep(1)  # a second minute's run may have started before the group was removed

    token = subprocess.run(
        [sys.executable, "-m", "appliance", "token", "create", "pytest", "--state", str(demo["state"])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # the demo's certificate names its host and 127.0.0.1, not this test's own loopback address: the chain is
    # still checked against it, the name is not
    tls = ssl.create_default_context(cafile=str(demo["state"] / "web" / "tls.crt"))
    tls.check_hostname = False
    request = urllib.request.Request(
        f"https://{BIND}:{demo['port']}/api/v1/metrics", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, context=tls, timeout=30) as resp:
        text = resp.read().decode()
    assert 'bootback_lab_last_result{group="demo-lab"} 1\n' in text, text
    assert 'bootback_lab_last_result{group="demo-tick"} 0\n' in text, text
    assert "bootback_labs_running 0\n" in text, text
    ran = {
        m[1]: float(m[2])
        for m in re.finditer(r'bootback_lab_last_run_timestamp_seconds\{group="([^"]+)"\} (\S+)', text)
    }
    assert set(ran) == {"demo-lab", "demo-tick"} and all(time.time() - 600 < t <= time.time() for t in ran.values())


def test_a_lab_whose_write_cache_would_run_out_is_refused_before_it_starts(demo: dict) -> None:
    big = json.loads((demo["state"] / "lab-groups" / "demo-lab.json").read_text())
    big["name"] = "demo-big"
    big["vms"][1]["cache_mib"] = 1 << 22  # 4 TiB: more than this disk has
    path = demo["data"] / "demo-big.json"
    path.write_text(json.dumps(big))
    before = ControlClient(demo["state"]).call("lab_list")
    p = lab(demo, "verify", str(path))
    assert p.returncode == 42, p.stdout + p.stderr
    assert re.search(
        r"lab demo-big: its sandboxes may write 4194368 MiB \(cache_mib\), the write cache at \S+ has \d+ MiB "
        r"left above its minimum of 1024 MiB",
        p.stderr,
    ), p.stderr
    assert ControlClient(demo["state"]).call("lab_list") == before, "a record or lab was made all the same"
