"""The appliance image on a real Docker engine: build offline, run, use the API and NFS from the host,
restart the container and find the instant session back with its writes; SIGTERM ends it cleanly."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.daemon_process import ROOT, bootback, free_port, tree_hash
from tests.rpcclient import nfs_write

pytestmark = pytest.mark.slow
PASSWORD = "container-test-password"


@pytest.fixture(scope="module")
def engine(docker_engine, appliance_image):
    return docker_engine


def wait_healthy(container, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        container.reload()
        state = container.attrs["State"]
        if state.get("Health", {}).get("Status") == "healthy":
            return
        if state["Status"] == "exited":
            break
        time.sleep(0.5)
    raise AssertionError(f"container not healthy: {container.attrs['State']}\n{container.logs().decode()[-3000:]}")


@pytest.fixture(scope="module")
def appliance(engine, appliance_image: str, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("container")
    disk = base / "web01.raw"
    disk.write_bytes(os.urandom(2 << 20) + bytes(3 << 20) + os.urandom(1 << 20))
    repo = base / "main"
    bootback("init", repo)
    bootback("backup", repo, "--vm", "web01", disk)
    before = tree_hash(repo)
    ports = {"2049/tcp": free_port(), "1058/tcp": free_port(), "6161/tcp": free_port()}
    container = engine.containers.run(
        appliance_image,
        detach=True,
        name=f"bootback-test-{uuid.uuid4().hex[:6]}",
        hostname="appliance1",
        ports={k: ("127.0.0.1", v) for k, v in ports.items()},
        volumes={
            str(repo): {"bind": "/repositories/main", "mode": "ro"},  # backups are read-only, always
            str(base / "state"): {"bind": "/var/lib/bootback", "mode": "rw"},
            str(base / "cache"): {"bind": "/cache", "mode": "rw"},
        },
        environment={"BOOTBACK_ADMIN_PASSWORD": PASSWORD, "BOOTBACK_MIN_FREE": "1G"},
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
        api = requests.Session()
        api.trust_env = False
        api.verify = str(base / "state" / "web" / "tls.crt")
        api.headers["Authorization"] = f"Bearer {token}"
        yield {
            "container": container,
            "api": api,
            "url": f"https://127.0.0.1:{ports['6161/tcp']}/api/v1",
            "nfs": ports["2049/tcp"],
            "mount": ports["1058/tcp"],
            "disk": disk,
            "base": base,
        }
    finally:
        logs = container.logs().decode()
        (ROOT / "test-artifacts").mkdir(exist_ok=True)
        (ROOT / "test-artifacts" / "container.log").write_text(logs)
        container.remove(force=True)
        shutil.rmtree(base / "cache", ignore_errors=True)
    assert tree_hash(repo) == before, "the repository changed"


def nfs_read(appliance, path: str, out: Path) -> bytes:
    url = f"nfs://127.0.0.1{path}?nfsport={appliance['nfs']}&mountport={appliance['mount']}"
    subprocess.run(["nfs-cp", url, str(out)], check=True, capture_output=True, timeout=60)
    return out.read_bytes()


def test_api_and_nfs_from_the_host_and_a_restart_keeps_the_instant_session(appliance, tmp_path: Path) -> None:
    api, url, container = appliance["api"], appliance["url"], appliance["container"]
    status = api.get(f"{url}/status").json()
    assert status["export"] == "/bootback-appliance1" and status["ports"]["nfs"] == 2049
    assert status["ports"]["portmap"] == 111 and status["ports"]["mount"] == 1058
    assert api.get(f"{url}/repositories").json()[0]["vms"] == ["web01"]

    (doc,) = api.post(f"{url}/sessions", json={"vm": "web01", "mode": "instant"}).json()
    extent = next(f for f in doc["files"] if f.endswith("-flat.vmdk"))
    assert nfs_read(appliance, f"{doc['path']}/{extent}", tmp_path / "a") == appliance["disk"].read_bytes()
    nfs_write(appliance["mount"], appliance["nfs"], doc["path"], extent, 3 << 20, b"written before restart")

    container.restart(timeout=30)  # SIGTERM, then start again with the same volumes
    wait_healthy(container)
    logs = container.logs().decode()
    assert "bootback stopped" in logs, logs[-2000:]
    back = api.get(f"{url}/sessions/{doc['id']}").json()
    assert back["mode"] == "instant" and back["changed_bytes"] > 0
    data = nfs_read(appliance, f"{doc['path']}/{extent}", tmp_path / "b")
    assert data[3 << 20 : (3 << 20) + 22] == b"written before restart"
    assert data[: 3 << 20] == appliance["disk"].read_bytes()[: 3 << 20]


def test_file_browsing_inside_the_image_and_the_tools_each_use_needs(appliance) -> None:
    """dissect's parsers browse files on the read-only repository mount; the image carries what verification
    (qemu with its nfs:// driver), the virtual labs and item recovery run (README, "The container")."""
    api, url, container = appliance["api"], appliance["url"], appliance["container"]
    top = api.get(f"{url}/repositories/main/files", params={"point": "web01", "path": "/"})
    assert top.status_code == 200, top.text
    assert top.json()["volumes"] == [
        {
            "id": "disk",
            "offset": 0,
            "size": appliance["disk"].stat().st_size,
            "description": "whole disk",
            "filesystem": None,
        }
    ]
    tools = "qemu-system-x86_64 qemu-img ip bridge nft busybox mkfs.ext4 debugfs mkfs.xfs xfs_db fusermount fusermount3"
    found = container.exec_run(["sh", "-c", f"for t in {tools}; do command -v $t >/dev/null || echo missing $t; done"])
    assert found.output.decode().strip() == "", found.output.decode()
    drivers = container.exec_run(["sh", "-c", "ls /usr/lib/x86_64-linux-gnu/qemu/"]).output.decode()
    assert "block-nfs.so" in drivers, drivers


def test_health_is_open_and_sigterm_exits_cleanly(appliance) -> None:
    api, url, container = appliance["api"], appliance["url"], appliance["container"]
    open_health = requests.get(f"{url}/health", verify=api.verify, timeout=10)
    assert open_health.status_code == 200 and open_health.json()["daemon"] is True
    container.stop(timeout=30)
    container.reload()
    assert container.attrs["State"]["ExitCode"] == 0, container.logs().decode()[-2000:]
    assert (appliance["base"] / "state" / "sessions").is_dir()
    assert any((appliance["base"] / "state" / "sessions").glob("*.json")), "instant session record kept on stop"
