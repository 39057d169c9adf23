"""Virtual labs end to end: small guests backed up into a real repository, served by the real daemon, booted by
``bootback lab`` over nfs:// on a lab network of their own, checked from inside it.

The guests (appliance.lab.guests): "db" answers on 5432, "app" serves a page saying whether it reached the db
and a probe page that tries any address:port from inside the guest. A second restore point of "db" has its
service off. Disks are built once and cached (BOOTBACK_TEST_CACHE)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from appliance.demo.bootdisk import demo_vmx
from appliance.lab.guests import DB_ADDRESS, build_guest_disk
from appliance.sessions.control import ControlClient
from tests.daemon_process import EXPORT, DaemonProcess, bootback, tree_hash

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="labs need root (network namespaces, bridges, taps)"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"),
]
APP_ADDRESS = "10.0.0.20"
BIND = "127.0.12.1"  # the appliance's address in these tests (see start_owning_the_portmapper)
FETCH = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"


def _vm_folder(base: Path, name: str, disk: Path) -> Path:
    folder = base / "vms" / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / f"{name}.vmx").write_text(demo_vmx(name, f"{name}.img"))
    os.symlink(disk, folder / f"{name}.img")
    return folder


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, build_cache: Path):
    """A repository with db (service on), app, then db again (service off), and a daemon serving it."""
    base = tmp_path_factory.mktemp("lab")
    repo = base / "repo"
    bootback("init", repo)
    bootback("backup", repo, "--vm", "db", _vm_folder(base, "db", build_guest_disk(build_cache, "db").path))
    bootback("backup", repo, "--vm", "app", _vm_folder(base, "app", build_guest_disk(build_cache, "app").path))
    broken = base / "broken.raw"
    with open(broken, "wb") as f:
        f.truncate(4 << 20)  # no boot sector: the BIOS finds nothing to boot
    bootback("backup", repo, "--vm", "broken", _vm_folder(base, "broken", broken))
    time.sleep(1.1)  # the second db point is clearly later than the group's time
    consistent = datetime.now().astimezone().isoformat()
    time.sleep(1.1)
    db_off = build_guest_disk(build_cache, "db-off").path
    bootback("backup", repo, "--vm", "db", _vm_folder(base, "db", db_off))
    daemon = start_owning_the_portmapper(repo, base / "state")
    yield base, repo, daemon, consistent
    daemon.stop()
    owner = hashlib.sha256(str((base / "state").resolve()).encode()).hexdigest()[:6]  # another test's labs may run
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"bootback-lab-{owner}-" not in leftover, f"lab networks left behind: {leftover}"


# A custom check: run in the lab's namespace with the VM's address last; asks the app's front page over HTTP.
APP_SCRIPT = """#!/bin/sh
[ "$1" = up ] && [ "$2" = "$LAB_ADDRESS" ] || exit 3
printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 3 "$2" 80 | grep -q 'app: up'
"""


def start_owning_the_portmapper(repo: Path, state: Path, wait: float = 120) -> DaemonProcess:
    """qemu's nfs driver asks the portmapper on port 111 of the URL's host. A daemon that finds another program
    there registers with it, and loses its registration when that program ends (another test's daemon, run in
    parallel). So this daemon has a loopback address of its own, and starts once it can own 111 there."""
    deadline = time.monotonic() + wait
    while True:
        with socket.socket() as s:
            free = s.connect_ex((BIND, 111)) != 0  # nobody on BIND:111, nor on the wildcard address
        if free:
            daemon = DaemonProcess(repo, state, "--bind", BIND, "--clients", "127.0.0.0/8").start()
            if "portmapper on 111 is another program's" not in daemon.log():
                return daemon
            daemon.stop()
        if time.monotonic() > deadline:
            pytest.fail(f"another program keeps the portmapper port {BIND}:111, which qemu's nfs driver needs")
        time.sleep(1)


def shop(name: str, at: str | None = None, app_timeout: float = 60) -> dict:
    """db first (it must answer on its port before app starts), then app, whose page must say it reached db."""
    group = {
        "name": name,
        "vms": [
            {
                "vm": "db",
                "address": DB_ADDRESS,
                "memory_mib": 96,
                "checks": [
                    {"type": "console", "expect": "bootback-lab: db (listening|service off)", "timeout": 120},
                    {"type": "ping", "timeout": 20},
                    {"type": "screenshot", "timeout": 10},
                ],
            },
            {
                "vm": "app",
                "address": APP_ADDRESS,
                "memory_mib": 96,
                "checks": [
                    {"type": "console", "expect": "app serving http", "timeout": 120},
                    {"type": "tcp", "port": 80, "timeout": 20},
                    {"type": "http", "path": "/cgi-bin/status", "text": "db: reachable", "timeout": app_timeout},
                    {"type": "screenshot", "timeout": 10},
                ],
            },
        ],
    }
    if at:
        group["at"] = at
    return group


def write_group(base: Path, group: dict) -> Path:
    path = base / f"{group['name']}.yaml"
    path.write_text(yaml.safe_dump(group))
    return path


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.slow
def test_group_verifies_in_order_with_screenshots(lab, artifacts_dir: Path) -> None:
    base, repo, daemon, consistent = lab
    before = tree_hash(repo)
    script = daemon.state / "lab-scripts" / "app-page.sh"
    script.write_text(APP_SCRIPT)
    script.chmod(0o755)
    group = shop("shop-then", at=consistent)
    group["vms"][1]["checks"].insert(3, {"type": "script", "script": [str(script), "up"], "timeout": 20})
    p = daemon.cli("lab", "verify", write_group(base, group), "--json", ok=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    record = json.loads(p.stdout)
    report = record["report"]
    assert record["state"] == "passed" and report["ok"] is True, report
    db, app = report["vms"]
    assert (db["vm"], db["state"], app["vm"], app["state"]) == ("db", "passed", "app", "passed")
    assert db["finished"] <= app["started"], "app started before db had passed"
    points = {p["id"]: p for p in json.loads(bootback("points", repo, "--json").stdout)}
    assert points[db["point"]]["time"] <= consistent, "the db point is not the one at the group's time"
    assert [c["type"] for c in app["checks"]] == ["console", "tcp", "http", "script", "screenshot"]
    assert app["checks"][3]["line"].startswith(f"script {script} up {APP_ADDRESS}: passed"), app["checks"][3]
    assert all(c["ok"] and c["line"] for vm in (db, app) for c in vm["checks"])
    assert "db: reachable (db-ok)" in app["checks"][2]["detail"]
    for vm in (db, app):
        png = Path(vm["screenshot"])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        shutil.copy(png, artifacts_dir / f"lab-{vm['vm']}.png")
        assert vm["boot_seconds"] is not None and vm["address"] in (DB_ADDRESS, APP_ADDRESS)
    assert json.loads(daemon.cli("sessions", "--json").stdout) == [], "the lab's sandboxes were not thrown away"
    assert report["namespace"] not in namespaces()
    assert tree_hash(repo) == before


@pytest.mark.slow
def test_db_service_off_fails_the_apps_check_and_the_report_names_it(lab) -> None:
    """The newest db point has its service off: db still boots and answers pings, app's page says it cannot
    reach db, the verification fails naming app's http check, exit 70."""
    base, repo, daemon, _ = lab
    p = daemon.cli("lab", "verify", write_group(base, shop("shop-now", app_timeout=15)), "--json", ok=False)
    assert p.returncode == 70, p.stdout[-3000:] + p.stderr
    assert "app: http http://10.0.0.20:80/cgi-bin/status: FAILED" in p.stderr, p.stderr
    record = json.loads(p.stdout)
    db, app = record["report"]["vms"]
    assert record["state"] == "failed" and (db["state"], app["state"]) == ("passed", "failed")
    assert "service off" in db["checks"][0]["detail"]
    failed = [c for c in app["checks"] if not c["ok"]]
    assert [c["type"] for c in failed] == ["http"], app["checks"]
    assert "'db: unreachable" in failed[0]["detail"] and "15 s timeout" in failed[0]["detail"]
    assert app["screenshot"] and Path(app["screenshot"]).exists(), "a failed VM keeps its screenshot too"
    assert json.loads(daemon.cli("sessions", "--json").stdout) == []


def host_addresses() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines()]


class Listener:
    """A TCP service on every host address; it records every connection that reaches it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("0.0.0.0", 0))
        self.port = self.sock.getsockname()[1]
        self.peers: list[tuple] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer)
            conn.close()


@pytest.mark.slow
def test_sandbox_lab_is_isolated_from_the_host_and_the_appliance(lab) -> None:
    """``lab start``: the app guest runs in its lab until stopped. From inside the guest, its probe page tries
    the host's addresses (loopback included) and the appliance's NFS and portmapper ports: all closed, and the
    host's listener sees no connection; the same probe reaches a service inside the lab, so it can succeed."""
    base, repo, daemon, _ = lab
    group = {"name": "app-alone", "vms": [shop("x")["vms"][1]]}
    group["vms"][0]["checks"] = [group["vms"][0]["checks"][0]]  # up once it serves http
    p = daemon.cli("lab", "start", write_group(base, group), "--ttl", "10m", "--wait", "--json", ok=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    record = json.loads(p.stdout)
    try:
        assert record["state"] == "running" and record["expires"], record
        assert record["report"]["vms"][0]["state"] == "passed", record
        isolated(daemon, record)
    finally:
        stopped = json.loads(daemon.cli("lab", "stop", record["id"], "--json").stdout)
    assert stopped["state"] == "stopped"
    assert record["report"]["namespace"] not in namespaces()
    assert not Path(f"/proc/{record['report']['vms'][0]['pid']}").exists(), "the guest's qemu still runs"
    assert json.loads(daemon.cli("sessions", "--json").stdout) == []


def isolated(daemon: DaemonProcess, record: dict) -> None:
    ns = record["report"]["namespace"]
    assert ns in namespaces()
    listed = json.loads(daemon.cli("lab", "list", "--json").stdout)
    assert [(r["id"], r["state"]) for r in listed if r["state"] == "running"] == [(record["id"], "running")]

    listener = Listener()
    inside = subprocess.Popen(["ip", "netns", "exec", ns, "busybox", "nc", "-l", "-p", "9999"])
    try:

        def probe(target: str) -> str:
            url = f"http://{APP_ADDRESS}/cgi-bin/probe?{target}"
            out = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, "-c", FETCH, url],
                capture_output=True,
                text=True,
                timeout=30,
            )
            return out.stdout.strip() or out.stderr.strip()[-500:]

        assert probe("10.0.0.1:9999") == "10.0.0.1:9999: open", "the probe cannot reach even the lab"
        targets = [f"{a}:{listener.port}" for a in host_addresses()]
        targets += [f"{a}:{port}" for a in [BIND, *host_addresses()] for port in (daemon.nfs_port, 111)]
        targets.append(f"10.0.2.2:{listener.port}")  # qemu's user-mode alias of the host loopback: absent here
        for target in targets:
            assert probe(target) == f"{target}: closed", target
        # the lab's own namespace has no way out either (the checks run there)
        out = subprocess.run(
            ["ip", "netns", "exec", ns, "busybox", "nc", "-w", "2", host_addresses()[-1], str(listener.port)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        assert out.returncode != 0 and "unreachable" in out.stderr, out.stderr
        assert listener.peers == [], f"the host was reached from the lab: {listener.peers}"
    finally:
        inside.kill()
        inside.wait()
        listener.sock.close()


@pytest.mark.slow
def test_a_vm_that_never_boots_fails_at_its_timeout_while_nfs_is_served(lab) -> None:
    base, repo, daemon, _ = lab
    group = {
        "name": "broken",
        "vms": [{"vm": "broken", "checks": [{"type": "console", "expect": "login:", "timeout": 15}]}],
    }
    # a script check may only run a program the operator put in STATE/lab-scripts/
    hostile = {"name": "hostile", "vms": [{"vm": "broken", "checks": [{"type": "script", "script": "/bin/sh"}]}]}
    p = daemon.cli("lab", "verify", write_group(base, hostile), ok=False)
    assert p.returncode == 2 and "'/bin/sh' is not an executable file in" in p.stderr, p.stderr
    owner = hashlib.sha256(str(daemon.state.resolve()).encode()).hexdigest()[:6]
    assert f"bootback-lab-{owner}-" not in namespaces()  # refused before its network was made
    started = time.monotonic()
    verify = subprocess.Popen(
        [sys.executable, "-m", "appliance", "lab", "verify", str(write_group(base, group)), "--state", daemon.state],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ports = ControlClient(daemon.state).call("status")["ports"]
    url = f"nfs://{BIND}{EXPORT}/?nfsport={ports['nfs']}&mountport={ports['mount']}"
    try:
        # while the guest sits at "no bootable device", the appliance serves: NFS answers (the guest's own
        # sandbox listed), the control socket answers
        seen = 0
        while seen < 3 and verify.poll() is None:
            ls = subprocess.run(["nfs-ls", url], capture_output=True, text=True, timeout=10)
            assert ls.returncode == 0, ls.stderr
            if any("broken-sandbox" in line for line in ls.stdout.splitlines()):
                seen += 1
                assert json.loads(daemon.cli("lab", "list", "--json").stdout)[0]["state"] == "verifying"
            time.sleep(1)
        assert seen == 3, "the broken VM's sandbox was not listed while its lab ran"
        out, err = verify.communicate(timeout=120)
    finally:
        verify.kill()
    assert verify.returncode == 70, out + err
    assert "broken: console 'login:': FAILED" in err and "15 s timeout" in err, err
    assert time.monotonic() - started < 60
    assert json.loads(daemon.cli("sessions", "--json").stdout) == []
