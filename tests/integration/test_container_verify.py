"""Backup verification inside the appliance image, as shipped: the container runs as the unprivileged `bootback`
user, without /dev/kvm and with an advertised host name it cannot resolve itself. Started through the API,
a verification boots the image's own bootable demo VM (the repository the image carries, the same as
`./run demo`) with the image's qemu under TCG, over nfs:// from the daemon in the same container. An instant
session published beside it, and the verification's record, survive `docker restart`."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import pytest
import requests

from appliance.demo.bootdisk import BANNER
from tests.daemon_process import ROOT, free_port
from tests.integration.test_container import wait_healthy

pytestmark = pytest.mark.slow
DEMO_REPO = "/var/lib/bootback-demo/repo"  # prepared by the Dockerfile's demo stage
ADVERTISED = "appliance.invalid"  # what hypervisors would use; never resolves (RFC 2606), not even in here
PASSWORD = "container-verify-password"


@pytest.fixture(scope="module")
def verifying_appliance(docker_engine, appliance_image: str, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("container-verify")
    web = free_port()
    container = docker_engine.containers.run(
        appliance_image,
        ["serve", "--repo", DEMO_REPO, "--cache-dir", "/cache"],
        detach=True,
        name=f"bootback-verify-{uuid.uuid4().hex[:6]}",
        user="bootback",
        ports={"6161/tcp": ("127.0.0.1", web)},
        environment={"BOOTBACK_ADVERTISE": ADVERTISED, "BOOTBACK_MIN_FREE": "1G", "BOOTBACK_ADMIN_PASSWORD": PASSWORD},
        healthcheck={
            "test": ["CMD", "bootback", "health"],
            "interval": 1_000_000_000,
            "timeout": 5_000_000_000,
            "retries": 3,
            "start_period": 1_000_000_000,
        },
    )
    try:
        wait_healthy(container)
        token = container.exec_run(["bootback", "token", "create", "pytest"]).output.decode().strip()
        assert token.startswith("bbt_"), token
        api = requests.Session()
        api.trust_env = False
        api.verify = str(base / "tls.crt")
        Path(api.verify).write_bytes(container.exec_run(["cat", "/var/lib/bootback/web/tls.crt"]).output)
        api.headers["Authorization"] = f"Bearer {token}"
        yield {
            "container": container,
            "api": api,
            "url": f"https://127.0.0.1:{web}/api/v1",
            "page": f"https://127.0.0.1:{web}",
        }
    finally:
        (ROOT / "test-artifacts").mkdir(exist_ok=True)
        (ROOT / "test-artifacts" / "container-verify.log").write_text(container.logs().decode(errors="replace"))
        container.remove(force=True, v=True)


def test_verification_boots_the_demo_vm_in_the_container_and_sessions_survive_restart(verifying_appliance) -> None:
    api, url, container = verifying_appliance["api"], verifying_appliance["url"], verifying_appliance["container"]
    assert container.exec_run(["id", "-un"]).output.decode().strip() == "bootback"
    assert api.get(f"{url}/status").json()["ports"]["portmap"] == 111  # qemu's nfs:// driver asks it

    session = api.post(f"{url}/sessions", json={"vm": "demo-vm", "mode": "instant"})
    assert session.status_code in (200, 201), session.text
    (instant,) = session.json()
    assert instant["nfs_url"].startswith(f"nfs://{ADVERTISED}/"), instant["nfs_url"]

    job = api.post(f"{url}/verifications", json={"vm": "demo-vm", "timeout": 300, "expect": BANNER}).json()
    deadline = time.monotonic() + 360
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(2)
        job = api.get(f"{url}/verifications/{job['id']}").json()
    report = job["report"] or {}
    assert job["state"] == "verified", job
    assert report["accelerator"] == "tcg" and report["matched"] is True, report
    assert BANNER in report["console_tail"], report["console_tail"]
    # the page lists it the same way, naming the accelerator
    page = requests.Session()
    page.trust_env, page.verify = False, api.verify
    login = page.get(f"{verifying_appliance['page']}/login", timeout=10)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', login.text)[1]
    form = {"csrf_token": csrf, "username": "admin", "password": PASSWORD}
    assert page.post(f"{verifying_appliance['page']}/login", data=form, timeout=10).status_code == 200
    row = re.search(
        rf'<tr data-verification="{job["id"]}" data-state="([a-z]+)">(.*?)</tr>',
        page.get(verifying_appliance["page"] + "/", timeout=10).text,
        re.S,
    )
    assert row and row[1] == "verified" and 'class="accelerator">TCG<' in row[2], row and row[0]

    container.restart(timeout=30)  # SIGTERM, then the same container (its anonymous volumes) starts again
    wait_healthy(container)
    back = api.get(f"{url}/sessions/{instant['id']}")
    assert back.status_code == 200, back.text
    assert back.json()["mode"] == "instant" and back.json()["vm"] == "demo-vm"
    sessions = api.get(f"{url}/sessions").json()
    assert [s["id"] for s in sessions] == [instant["id"]], "the verification's sandbox came back, or was kept"
    assert api.get(f"{url}/verifications/{job['id']}").json()["state"] == "verified"
