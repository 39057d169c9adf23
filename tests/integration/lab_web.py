"""An appliance for the labs' API and page tests: a repository of the lab test guests (db, app, and a VM that
never boots), a daemon on a loopback address of its own that owns its portmapper (qemu's nfs driver asks port
111 of the URL's host: see tests/integration/test_lab.py), with the web app on a free port."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import requests

from appliance.demo.bootdisk import demo_vmx
from appliance.lab.guests import build_guest_disk
from tests.daemon_process import DaemonProcess, bootback, free_port

BIND = "127.0.12.7"  # not test_lab.py's 127.0.12.1: both may run at once on one machine


def _vm_folder(base: Path, name: str, disk: Path) -> Path:
    folder = base / "vms" / name
    folder.mkdir(parents=True)
    (folder / f"{name}.vmx").write_text(demo_vmx(name, f"{name}.img"))
    os.symlink(disk, folder / f"{name}.img")
    return folder


def lab_repository(base: Path, build_cache: Path, roles: tuple[str, ...] = ("db", "app")) -> Path:
    """db and app guests (disks built once, cached) and 'broken', a blank disk the BIOS cannot boot."""
    repo = base / "repo"
    bootback("init", repo)
    for role in roles:
        bootback("backup", repo, "--vm", role, _vm_folder(base, role, build_guest_disk(build_cache, role).path))
    broken = base / "broken.raw"
    with open(broken, "wb") as f:
        f.truncate(4 << 20)
    bootback("backup", repo, "--vm", "broken", _vm_folder(base, "broken", broken))
    return repo


def lab_web_appliance(repo: Path, state: Path, password: str, wait: float = 120) -> tuple[DaemonProcess, str]:
    """The daemon (web on, labs able to boot guests over nfs://BIND) and the web app's URL."""
    deadline = time.monotonic() + wait
    while True:
        with socket.socket() as s:
            free = s.connect_ex((BIND, 111)) != 0
        if free:
            port = free_port()
            d = DaemonProcess(
                repo,
                state,
                "--bind",
                BIND,
                "--clients",
                "127.0.0.0/8",
                "--advertise",
                BIND,  # the web's certificate names it
                web_port=port,
                env={"BOOTBACK_ADMIN_PASSWORD": password},
            ).start()
            if "portmapper on 111 is another program's" not in d.log():
                return d, f"https://{BIND}:{port}"
            d.stop()
        if time.monotonic() > deadline:
            pytest.fail(f"another program keeps the portmapper port {BIND}:111, which qemu's nfs driver needs")
        time.sleep(1)


def api_session(d: DaemonProcess, token: str | None = None) -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # no proxies for loopback, no $REQUESTS_CA_BUNDLE
    s.verify = str(d.state / "web" / "tls.crt")
    if token:
        s.headers["Authorization"] = f"Bearer {token}"
    return s


def needs_labs() -> list[pytest.MarkDecorator]:
    return [
        pytest.mark.skipif(os.geteuid() != 0, reason="labs need root (network namespaces, bridges, taps)"),
        pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"),
    ]
