"""Instant recovery end to end with a real hypervisor: back up a bootable VM, publish it, boot it with qemu
from the published extent over nfs://, and check that writes land in the session and nowhere else."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from appliance.demo.bootdisk import build_boot_disk, demo_vmx, read_marker
from appliance.demo.qemu import boot
from nfsd.xdr import Packer
from tests.daemon_process import EXPORT, DaemonProcess, bootback, free_port, tree_hash
from tests.rpcclient import RpcClient

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="building the boot disk needs root")


def sh(*cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=300)
    if ok and p.returncode != 0:
        raise AssertionError(f"{cmd} failed: {p.stderr}")
    return p


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, build_cache: Path):
    base = tmp_path_factory.mktemp("e2e")
    disk = build_boot_disk(build_cache)
    vmdir = base / "demo"
    vmdir.mkdir()
    (vmdir / "demo.vmx").write_text(demo_vmx("demo", "demo.img"))
    os.symlink(disk.path, vmdir / "demo.img")
    repo = base / "repo"
    bootback("init", repo)
    bootback("backup", repo, "--vm", "demo", vmdir)
    daemon = DaemonProcess(
        repo, base / "state", web_port=free_port(), env={"BOOTBACK_ADMIN_PASSWORD": "e2e-page-password"}
    ).start()
    yield base, repo, daemon, disk
    daemon.stop()


def extent_url(doc: dict) -> str:
    return f"{doc['nfs_url']}/{doc['disks'][0]['extent']}"


def fetch_extent(doc: dict, out: Path) -> Path:
    sh("nfs-cp", extent_url(doc), str(out))
    return out


@pytest.mark.slow
def test_boot_from_published_backup_instant_sandbox_migrate(setup, tmp_path: Path, artifacts_dir: Path) -> None:
    base, repo, daemon, disk = setup
    before = tree_hash(repo)
    doc = daemon.publish("demo@latest")
    assert doc["mode"] == "instant" and doc["nfs_url"].endswith(doc["folder"])
    assert sorted(doc["files"]) == ["demo-flat.vmdk", "demo.vmdk", "demo.vmx"]
    vmx = sh("nfs-cat", f"{doc['nfs_url']}/demo.vmx").stdout
    assert 'scsi0:0.fileName = "demo.vmdk"' in vmx and "bootback instant recovery" in vmx

    result = boot(extent_url(doc), timeout=240, console_log=artifacts_dir / "e2e-instant-console.log")
    assert result.booted and result.marker_written, result.console[-2000:]
    assert "boot 1" in result.console

    # the instant session survives a daemon restart with the guest's writes
    daemon.stop()
    daemon.start()
    sessions = json.loads(daemon.cli("sessions", "--json").stdout)
    assert [s["id"] for s in sessions] == [doc["id"]]
    marker = read_marker(fetch_extent(doc, tmp_path / "after-restart.raw"))
    assert marker is not None and marker.startswith("boot 1")

    # a sandbox of the same restore point starts from the backup: no marker; it boots too
    sandbox = daemon.publish("demo", mode="sandbox")
    assert read_marker(fetch_extent(sandbox, tmp_path / "sandbox.raw")) is None
    sb_boot = boot(extent_url(sandbox), timeout=240, console_log=artifacts_dir / "e2e-sandbox-console.log")
    assert sb_boot.marker_written and "boot 1" in sb_boot.console
    sandbox_cache = Path(sandbox["cache_dir"])
    assert sandbox_cache.exists()
    daemon.cli("stop", sandbox["id"])
    assert not sandbox_cache.exists()
    # ... and a new sandbox shows the marker gone
    again = daemon.publish("demo", mode="sandbox")
    assert read_marker(fetch_extent(again, tmp_path / "sandbox2.raw")) is None
    daemon.cli("stop", again["id"])

    # migrate: the output holds the guest's marker; the instant session can then be stopped
    p = daemon.cli("stop", doc["id"], ok=False)
    assert p.returncode == 40 and "never migrated" in p.stderr
    out = base / "migrated"  # migration writes only under its allowed directories (the daemon's base here)
    daemon.cli("migrate", doc["id"], "-o", out)
    assert sorted(f.name for f in out.iterdir()) == ["demo-flat.vmdk", "demo.vmdk", "demo.vmx"]
    marker = read_marker(out / "demo-flat.vmdk")
    assert marker is not None and marker.startswith("boot 1")
    daemon.cli("stop", doc["id"])
    assert tree_hash(repo) == before


def test_qemu_io_patterns_across_published_extent(setup, tmp_path: Path) -> None:
    base, repo, daemon, disk = setup
    before = tree_hash(repo)
    doc = daemon.publish("demo", mode="sandbox")
    url = extent_url(doc)
    size = doc["disks"][0]["size"]
    rnd = random.Random(7)
    pattern = []
    for i in range(16):
        length = rnd.choice([512, 4096, 65536 - 512, 65536 + 4096, 1 << 20, 3 * 512])
        off = rnd.randrange(0, (size - length) // 512) * 512
        pattern.append((off, length, 0x21 + i))
    pattern.sort()
    # drop overlapping writes so each range's expected content is unambiguous
    kept, end = [], -1
    for off, n, v in pattern:
        if off >= end:
            kept.append((off, n, v))
            end = off + n
    sh("qemu-io", "-f", "raw", *[a for o, n, v in kept for a in ("-c", f"write -P {v} {o} {n}")], url)
    out = sh("qemu-io", "-f", "raw", *[a for o, n, v in kept for a in ("-c", f"read -P {v} {o} {n}")], url).stdout
    assert "Pattern verification failed" not in out and out.count("read ") == len(kept)
    # everything else is still the backup, byte for byte
    local = fetch_extent(doc, tmp_path / "ext.raw").read_bytes()
    original = bytearray(disk.path.read_bytes())
    for o, n, v in kept:
        original[o : o + n] = bytes([v]) * n
    assert local == bytes(original)
    daemon.cli("stop", doc["id"])
    assert tree_hash(repo) == before


def test_descriptors_pass_qemu_img_check(setup, tmp_path: Path) -> None:
    base, repo, daemon, disk = setup
    doc = daemon.publish("demo", mode="sandbox")
    desc = tmp_path / "demo.vmdk"
    desc.write_text(sh("nfs-cat", f"{doc['nfs_url']}/demo.vmdk").stdout)
    with open(tmp_path / "demo-flat.vmdk", "wb") as f:
        f.truncate(doc["disks"][0]["size"])
    info = json.loads(sh("qemu-img", "info", "--output=json", str(desc)).stdout)
    assert info["format"] == "vmdk" and info["virtual-size"] == doc["disks"][0]["size"]
    assert info["format-specific"]["data"]["create-type"] == "monolithicFlat"
    assert "No errors were found" in sh("qemu-img", "check", str(desc)).stdout
    daemon.cli("stop", doc["id"])


def test_hypervisor_files_and_removal_of_published_disks(setup, tmp_path: Path) -> None:
    base, repo, daemon, disk = setup
    doc = daemon.publish("demo", mode="sandbox")
    folder = doc["nfs_url"]
    (tmp_path / "vmware.log").write_text("log line\n")
    sh("nfs-cp", str(tmp_path / "vmware.log"), f"{folder}/vmware.log")
    assert Path(doc["cache_dir"], "files", "vmware.log").read_text() == "log line\n"
    listing = sh("nfs-ls", folder).stdout
    assert "vmware.log" in listing and "demo-flat.vmdk" in listing
    # a storage migration deletes the source disks when it finishes: they vanish from this session only
    other = daemon.publish("demo", mode="sandbox")
    c = RpcClient("127.0.0.1", 1058)
    fh = c.mount(f"{EXPORT}/{doc['folder']}")
    c.close()
    c = RpcClient("127.0.0.1", daemon.nfs_port)
    assert c.call(100003, 3, 12, Packer().opaque(fh).string("demo-flat.vmdk").bytes()).u32() == 0  # REMOVE
    c.close()
    assert "demo-flat.vmdk" not in sh("nfs-ls", folder).stdout
    assert "demo-flat.vmdk" in sh("nfs-ls", other["nfs_url"]).stdout
    for d in (doc, other):
        daemon.cli("stop", d["id"])


@pytest.mark.slow
def test_verify_boot_boots_the_backup_in_isolation(setup, artifacts_dir: Path) -> None:
    base, repo, daemon, disk = setup
    before = tree_hash(repo)
    p = daemon.cli(
        "verify-boot",
        "demo",
        "--expect",
        "bootback-demo: booted",
        "--json",
        "--timeout",
        "240",
        "--console-log",
        str(artifacts_dir / "verify-boot-console.log"),
    )
    report = json.loads(p.stdout)
    assert report["verified"] and report["matched"], report
    assert 0 < report["first_console_line_seconds"] < 240
    assert json.loads(daemon.cli("sessions", "--json").stdout) == [], "the sandbox was not thrown away"
    # a boot that never shows what a healthy one prints fails, with its own exit code
    p = daemon.cli("verify-boot", "demo", "--expect", "this is never printed", "--timeout", "120", ok=False)
    assert p.returncode == 70 and "did not verify" in p.stderr
    assert json.loads(daemon.cli("sessions", "--json").stdout) == []
    # a nightly run: --all is every VM's latest point (here the one VM), on an appliance whose advertised name
    # (for hypervisors) does not resolve here: the CLI's verifier mounts from the daemon's own address
    daemon.stop()
    advertised = DaemonProcess(repo, base / "state-advertised", "--advertise", "nas.invalid").start()
    try:
        shown = advertised.publish("demo", mode="sandbox")
        assert "nas.invalid" in shown["nfs_url"]
        advertised.cli("stop", shown["id"])
        p = advertised.cli("verify-boot", "--all", "--expect", "bootback-demo: booted", "--json", "--timeout", "240")
        assert json.loads(p.stdout)["verified"], p.stdout
    finally:
        advertised.stop()
        daemon.start()
    # several at once: each gets a line in the JSON list and its own console log; the exit names the failures
    logs = base / "nightly-logs"
    p = daemon.cli(
        "verify-boot",
        "demo",
        "demo@latest",
        "--expect",
        "never printed",
        "--timeout",
        "10",
        "--json",
        "--console-log",
        str(logs),
        ok=False,
    )
    reports = json.loads(p.stdout)
    assert p.returncode == 70 and "2 of 2 did not verify" in p.stderr, p.stderr
    assert [r["verified"] for r in reports] == [False, False]
    assert sorted(f.name for f in logs.iterdir()) == ["demo.console", "demo_latest.console"]
    assert daemon.cli("verify-boot", ok=False).returncode == 2
    assert json.loads(daemon.cli("sessions", "--json").stdout) == []
    assert tree_hash(repo) == before


@pytest.mark.slow
def test_verifications_run_from_the_https_api(setup) -> None:
    """What the page's "Verify boot" does: a job on the daemon, polled until the guest has booted."""
    import time

    import requests

    base, repo, daemon, disk = setup
    before = tree_hash(repo)
    token = daemon.cli("token", "create", "verify").stdout.strip()
    api = requests.Session()
    api.trust_env = False
    api.verify = str(daemon.state / "web" / "tls.crt")
    api.headers["Authorization"] = f"Bearer {token}"
    url = f"https://127.0.0.1:{daemon.web_port}/api/v1/verifications"

    for body, status, message in [
        ({"vm": "nosuchvm"}, 404, "nosuchvm"),
        ({"vm": "demo", "expect": "(unclosed"}, 400, "expect: not a regular expression"),
        ({"vm": "demo", "timeout": 5}, 400, "timeout: between 10 and 3600"),
        ({"vm": "demo", "timeout": "soon"}, 400, "timeout: expected an integer or a number"),
        ({"vm": "demo", "colour": "red"}, 400, "colour: unknown field"),
    ]:
        resp = api.post(url, json=body)
        assert resp.status_code == status and message in resp.json()["error"]["message"], (body, resp.text)

    job = api.post(url, json={"vm": "demo", "expect": "bootback-demo: booted", "timeout": 240}).json()
    assert job["state"] == "running" and job["vm"] == "demo"
    deadline = time.monotonic() + 300
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(2)
        job = api.get(f"{url}/{job['id']}").json()
    assert job["state"] == "verified", job
    assert job["report"]["matched"] and "bootback-demo: booted" in job["report"]["console_tail"]
    assert job["point"] != "latest", "the job names the restore point it booted"
    assert [j["id"] for j in api.get(url).json()][0] == job["id"]
    assert api.get(f"{url}/nope").status_code == 404
    assert json.loads(daemon.cli("sessions", "--json").stdout) == [], "the sandbox was not thrown away"
    assert (daemon.state / "verifications" / f"{job['id']}.json").exists()
    assert tree_hash(repo) == before
