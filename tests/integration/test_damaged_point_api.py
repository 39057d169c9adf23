"""One damaged restore point file on a live appliance: the API, the page and publishing of every other VM go on;
the damaged point is flagged with its reason, never shown with facts, never published, and 'latest' of its VM is
refused instead of quietly meaning an older point. The real daemon and web app, reads over NFS with libnfs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from appliance.sessions.control import ControlClient
from tests.daemon_process import DaemonProcess, bootback, tree_hash, web_appliance
from tests.nfsd_process import PRIVATE_PORTS

PASSWORD = "damaged-point-password"


def backup(repo: Path, vm: str, disk: Path) -> str:
    out = bootback("backup", repo, "--vm", vm, disk, "--json").stdout
    return re.search(r'"id": "([^"]+)"', out)[1]


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("damagedpoint")
    web_disk, db_disk = base / "web01.raw", base / "db01.raw"
    web_disk.write_bytes(os.urandom(2 << 20) + bytes(1 << 20) + os.urandom(24 * 512))
    db_disk.write_bytes(os.urandom(1 << 20))
    repo = base / "repo"
    bootback("init", repo)
    ids = {"web01": backup(repo, "web01", web_disk), "db01-old": backup(repo, "db01", db_disk)}
    ids["db01-new"] = backup(repo, "db01", db_disk)
    d, base_url = web_appliance(repo, base / "state", PASSWORD)
    token = bootback("token", "create", "pytest", "--state", d.state).stdout.strip()
    api = requests.Session()
    api.trust_env = False
    api.headers["Authorization"] = f"Bearer {token}"
    api.verify = str(d.state / "web" / "tls.crt")
    url = f"{base_url}/api/v1"
    assert [p["id"] for p in api.get(f"{url}/repositories/repo/points", params={"vm": "db01"}).json()] == [
        ids["db01-old"],
        ids["db01-new"],
    ]
    # now, under the running daemon, one bit of the newest db01 point's summary flips
    victim = repo / "points" / "db01" / f"{ids['db01-new']}.point"
    blob = bytearray(victim.read_bytes())
    blob[56 + int.from_bytes(blob[16:24], "big") - 3] ^= 0x04  # the summary's stored bytes (56: its header)
    victim.write_bytes(bytes(blob))
    before = tree_hash(repo)
    yield {
        "api": api,
        "url": url,
        "base_url": base_url,
        "daemon": d,
        "ids": ids,
        "web_disk": web_disk,
        "db_disk": db_disk,
    }
    d.stop()
    assert d.proc.returncode == 0, d.log()[-3000:]
    assert tree_hash(repo) == before, "the repository changed"


def test_listings_go_on_and_flag_the_damaged_point(appliance) -> None:
    api, url, ids = appliance["api"], appliance["url"], appliance["ids"]
    new = f"db01@{ids['db01-new']}"
    (repo,) = api.get(f"{url}/repositories").json()
    assert repo["vms"] == ["db01", "web01"] and repo["points"] == 2
    (bad,) = repo["damaged_points"]
    assert bad["vm"] == "db01" and bad["id"] == ids["db01-new"] and bad["damaged"] is True
    assert f"restore point {new} (summary)" in bad["error"]
    assert api.get(f"{url}/repositories/repo").json()["damaged_points"] == [bad]
    points = api.get(f"{url}/repositories/repo/points").json()
    assert [(p["vm"], p["id"], p["damaged"]) for p in points] == [
        ("web01", ids["web01"], False),
        ("db01", ids["db01-old"], False),
        ("db01", ids["db01-new"], True),
    ]
    assert points[2] == bad and points[0]["disks"][0]["size"] == appliance["web_disk"].stat().st_size
    assert "bootback_repository_restore_points" in api.get(f"{url}/metrics").text
    assert appliance["daemon"].log().count(f"damaged restore point file: restore point {new} (summary)") == 1


def _read_over_nfs(api: requests.Session, url: str, doc: dict, out: Path) -> bytes:
    ports = api.get(f"{url}/status").json()["ports"]
    extent = next(f for f in doc["files"] if f.endswith("-flat.vmdk"))
    nfs = f"{doc['nfs_url']}/{extent}?nfsport={ports['nfs']}&mountport={ports['mount']}"
    subprocess.run(["nfs-cp", nfs, str(out)], check=True, capture_output=True, timeout=60)
    return out.read_bytes()


def test_the_other_vm_publishes_and_the_damaged_point_is_refused_by_name(appliance, tmp_path: Path) -> None:
    api, url, ids = appliance["api"], appliance["url"], appliance["ids"]
    resp = api.post(f"{url}/sessions", json={"vm": "web01", "mode": "sandbox"})
    assert resp.status_code == 201, resp.text
    (doc,) = resp.json()
    assert _read_over_nfs(api, url, doc, tmp_path / "web01") == appliance["web_disk"].read_bytes()
    assert api.delete(f"{url}/sessions/{doc['id']}").status_code == 200

    new = f"db01@{ids['db01-new']}"
    for body in ({"vm": "db01"}, {"vm": "db01", "point": "latest"}, {"vm": new}, {"vms": ["web01", "db01"]}):
        resp = api.post(f"{url}/sessions", json={**body, "mode": "sandbox"})
        message = resp.json()["error"]["message"]
        assert resp.status_code == 500 and f"restore point {new} (summary)" in message, (body, resp.text)
    resp = api.post(f"{url}/sessions", json={"vm": "db01", "mode": "sandbox"})
    assert f"name an older point explicitly, e.g. db01@{ids['db01-old']}" in resp.json()["error"]["message"]
    for sess in api.get(f"{url}/sessions").json():  # a mass publish may have started web01 before db01 failed
        api.delete(f"{url}/sessions/{sess['id']}")

    resp = api.post(f"{url}/verifications", json={"vm": "db01"})
    assert resp.status_code == 500 and f"{new} (summary)" in resp.json()["error"]["message"], resp.text
    resp = api.get(f"{url}/repositories/repo/files", params={"point": "db01", "path": "/"})
    assert resp.status_code == 500 and f"{new} (summary)" in resp.json()["error"]["message"], resp.text

    resp = api.post(f"{url}/sessions", json={"vm": f"db01@{ids['db01-old']}", "mode": "sandbox"})
    assert resp.status_code == 201, resp.text  # the older point, named, still runs
    (doc,) = resp.json()
    assert _read_over_nfs(api, url, doc, tmp_path / "db01") == appliance["db_disk"].read_bytes()
    assert api.delete(f"{url}/sessions/{doc['id']}").status_code == 200


def test_the_page_shows_the_damaged_point_without_actions(appliance) -> None:
    base, ids = appliance["base_url"], appliance["ids"]
    page = requests.Session()
    page.trust_env = False
    page.verify = appliance["api"].verify
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.get(f"{base}/login").text)[1]
    resp = page.post(f"{base}/login", data={"csrf_token": csrf, "username": "admin", "password": PASSWORD})
    assert resp.status_code == 200, resp.text
    html = resp.text
    rows = dict(re.findall(r'<tr data-point="([^"]+)"(.*?)</tr>', html, re.S))
    new, old, web = f"db01@{ids['db01-new']}", f"db01@{ids['db01-old']}", f"web01@{ids['web01']}"
    assert set(rows) == {new, old, web}
    assert 'data-damaged="true"' in rows[new] and "DAMAGED" in rows[new] and "(summary)" in rows[new]
    for action in ("Instant recovery", "Sandbox", "Verify boot", "Browse files", "<form"):
        assert action not in rows[new] and action in rows[old] and action in rows[web], action
    assert "1 restore point file(s) DAMAGED" in html
    resp = page.get(f"{base}/files", params={"repository": "repo", "point": new, "path": "/"})
    assert resp.status_code == 500 and "(summary)" in resp.text


def test_a_repository_that_cannot_be_listed_does_not_hide_the_others(tmp_path: Path) -> None:
    """Served from a repository directory: one repository's points/ is gone (a file in its place); the
    'repositories' op reports it with the error and still lists and publishes the other."""
    repos = tmp_path / "repositories"
    repos.mkdir()
    disk = tmp_path / "web01.raw"
    disk.write_bytes(os.urandom(1 << 20))
    for name in ("good", "broken"):
        bootback("init", repos / name)
        bootback("backup", repos / name, "--vm", "web01", disk)
    shutil.rmtree(repos / "broken" / "points")
    (repos / "broken" / "points").write_text("not a directory")
    d = DaemonProcess(
        repos,
        tmp_path / "state",
        *PRIVATE_PORTS,
        repo_flag="--repo-dir",
    ).start()
    try:
        listed = {r["name"]: r for r in ControlClient(d.state).call("repositories")}
        assert listed["good"]["vms"] == ["web01"] and listed["good"]["points"] == 1
        assert "error" not in listed["good"] and listed["good"]["damaged_points"] == []
        assert listed["broken"]["points"] == 0 and "cannot list" in listed["broken"]["error"]
        assert str(repos / "broken" / "points") in listed["broken"]["error"]
        doc = d.publish("web01", mode="sandbox", extra=("--repo", "good"))
        assert doc["vm"] == "web01"
    finally:
        d.stop()
