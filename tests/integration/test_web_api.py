"""The REST API on a live daemon, over HTTPS with the appliance's own certificate, called like a script would.

Checks what the API does against the real thing: bytes read over NFS with libnfs, migration output on
disk, and the repository's hash before and after.
"""

from __future__ import annotations

import http.client
import os
import re
import ssl
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests

from tests.daemon_process import bootback, tree_hash, web_appliance
from tests.rpcclient import NfsDir, nfs_write

PASSWORD = "api-test-password"


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("webapi")
    disk = base / "web01.raw"
    disk.write_bytes(os.urandom(3 << 20) + bytes(2 << 20) + os.urandom(1 << 20))
    repo = base / "repo"
    bootback("init", repo)
    bootback("backup", repo, "--vm", "web01", disk)
    bootback("backup", repo, "--vm", "db01", disk)
    before = tree_hash(repo)
    d, base_url = web_appliance(repo, base / "state", PASSWORD)
    token = bootback("token", "create", "pytest", "--state", d.state).stdout.strip()
    api = requests.Session()
    api.trust_env = False  # else $REQUESTS_CA_BUNDLE overrides .verify (and proxies apply to loopback)
    api.headers["Authorization"] = f"Bearer {token}"
    api.verify = str(d.state / "web" / "tls.crt")  # the generated self-signed certificate must be valid for us
    yield {"api": api, "url": f"{base_url}/api/v1", "daemon": d, "disk": disk, "repo": repo, "base": base}
    d.stop()
    assert d.proc.returncode == 0, f"the daemon did not exit cleanly on SIGTERM: {d.log()[-3000:]}"
    assert tree_hash(repo) == before, "the repository changed"


def test_health_is_open_and_tls_verifies(appliance) -> None:
    resp = requests.get(f"{appliance['url']}/health", verify=appliance["api"].verify, timeout=10)
    assert resp.status_code == 200 and resp.json()["daemon"] is True
    assert requests.get(f"{appliance['url']}/status", verify=appliance["api"].verify, timeout=10).status_code == 401


def test_repositories_and_points(appliance) -> None:
    api, url = appliance["api"], appliance["url"]
    (repo,) = api.get(f"{url}/repositories").json()
    assert repo["name"] == "repo" and repo["vms"] == ["db01", "web01"] and repo["points"] == 2
    points = api.get(f"{url}/repositories/repo/points", params={"vm": "web01"}).json()
    assert [p["vm"] for p in points] == ["web01"] and points[0]["disks"][0]["size"] == 6 << 20
    assert api.get(f"{url}/repositories/nope/points").status_code == 404
    assert api.get(f"{url}/repositories/repo").json()["chunk_size"] == 1 << 20


def test_publish_read_over_nfs_and_stop(appliance, tmp_path: Path) -> None:
    api, url = appliance["api"], appliance["url"]
    resp = api.post(f"{url}/sessions", json={"vm": "web01", "mode": "sandbox"})
    assert resp.status_code == 201, resp.text
    (doc,) = resp.json()
    status = api.get(f"{url}/status").json()
    ports = status["ports"]
    extent = next(f for f in doc["files"] if f.endswith("-flat.vmdk"))
    nfs = f"{doc['nfs_url']}/{extent}?nfsport={ports['nfs']}&mountport={ports['mount']}"
    out = tmp_path / "extent"
    subprocess.run(["nfs-cp", nfs, str(out)], check=True, capture_output=True, timeout=60)
    assert out.read_bytes() == appliance["disk"].read_bytes()
    held = NfsDir(ports["mount"], ports["nfs"], doc["path"])  # a client still connected while the API is asked
    try:
        fh = held.lookup(extent)
        assert held.read(fh, 0, 4096) == appliance["disk"].read_bytes()[:4096]
        clients = api.get(f"{url}/clients").json()
    finally:
        held.nfs.close()
    me = next((c for c in clients if c["address"] == "127.0.0.1"), None)
    assert me is not None, clients
    assert me["connections"] >= 1 and me["calls"] >= 2 and status["export"] in me["mounts"], me
    assert doc["id"] in api.get(f"{url}/metrics").text
    cache = api.get(f"{url}/cache").json()
    assert cache["free"] > 0 and any(s["id"] == doc["id"] for s in cache["sessions"])
    (export,) = api.get(f"{url}/exports").json()
    assert export["path"] == status["export"] and export["ports"]["nfs"] == ports["nfs"]
    assert api.delete(f"{url}/sessions/{doc['id']}").json()["stopped"] is True
    assert api.get(f"{url}/sessions/{doc['id']}").status_code == 404
    assert api.delete(f"{url}/sessions/{doc['id']}").status_code == 404


def test_mass_publish_and_unknown_names(appliance) -> None:
    api, url = appliance["api"], appliance["url"]
    resp = api.post(f"{url}/sessions", json={"vms": ["web01", "db01"], "mode": "sandbox"})
    assert resp.status_code == 201
    ids = [d["id"] for d in resp.json()]
    assert len(set(ids)) == 2 and {d["vm"] for d in resp.json()} == {"web01", "db01"}
    for sid in ids:
        assert api.delete(f"{url}/sessions/{sid}").status_code == 200
    resp = api.post(f"{url}/sessions", json={"vm": "ghost"})
    assert resp.status_code == 404 and "ghost" in resp.json()["error"]["message"]
    resp = api.post(f"{url}/sessions", json={"vm": "web01", "point": "1999-01-01T00-00-00Z"})
    assert resp.status_code == 404


def test_instant_session_migrates_with_progress_then_stops(appliance) -> None:
    api, url = appliance["api"], appliance["url"]
    (doc,) = api.post(f"{url}/sessions", json={"vm": "web01", "mode": "instant"}).json()
    sid = doc["id"]
    extent = next(f for f in doc["files"] if f.endswith("-flat.vmdk"))
    ports = api.get(f"{url}/status").json()["ports"]
    nfs_write(ports["mount"], ports["nfs"], doc["path"], extent, 4 << 20, b"guest data" * 100)
    assert api.get(f"{url}/sessions/{sid}").json()["changed_bytes"] > 0
    resp = api.delete(f"{url}/sessions/{sid}")
    assert resp.status_code == 409 and "migrat" in resp.json()["error"]["message"]
    assert api.get(f"{url}/sessions/{sid}/migration").status_code == 404
    out = appliance["base"] / "migrated-web01"
    resp = api.post(f"{url}/sessions/{sid}/migration", json={"output": str(out)})
    assert resp.status_code == 202, resp.text
    deadline = time.monotonic() + 60
    while (m := api.get(f"{url}/sessions/{sid}/migration").json())["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert m["error"] is None and m["percent"] == 100.0 and m["copied_bytes"] >= 6 << 20
    expected = bytearray(appliance["disk"].read_bytes())
    expected[4 << 20 : (4 << 20) + 1000] = b"guest data" * 100
    migrated = [p for p in out.iterdir() if p.name.endswith("-flat.vmdk") or p.suffix == ".raw"]
    assert migrated and migrated[0].read_bytes() == bytes(expected)
    assert migrated[0].stat().st_mode & 0o077 == 0  # the disk a guest wrote is nobody else's to read
    # The same target again: refused while the first copy stands, replaced only when asked.
    resp = api.post(f"{url}/sessions/{sid}/migration", json={"output": str(out)})
    assert resp.status_code == 400 and "exists" in resp.json()["error"]["message"], resp.text
    resp = api.post(f"{url}/sessions/{sid}/migration", json={"output": str(out), "overwrite": "yes"})
    assert resp.status_code == 400 and resp.json()["error"]["message"].startswith("overwrite:")
    resp = api.post(f"{url}/sessions/{sid}/migration", json={"output": str(out), "overwrite": True})
    assert resp.status_code == 202, resp.text
    while api.get(f"{url}/sessions/{sid}/migration").json()["running"]:
        assert time.monotonic() < deadline + 60
        time.sleep(0.2)
    # Outside the directories the operator allowed: refused, nothing created.
    outside = appliance["base"].parent / f"outside-{sid}"
    resp = api.post(f"{url}/sessions/{sid}/migration", json={"output": str(outside / "web01")})
    assert resp.status_code == 400 and not outside.exists(), resp.text
    assert api.delete(f"{url}/sessions/{sid}").status_code == 200


def test_forced_stop_of_an_unmigrated_instant_session(appliance) -> None:
    api, url = appliance["api"], appliance["url"]
    (doc,) = api.post(f"{url}/sessions", json={"vm": "db01"}).json()
    assert api.delete(f"{url}/sessions/{doc['id']}", params={"force": "true"}).status_code == 200
    assert all(s["id"] != doc["id"] for s in api.get(f"{url}/sessions").json())


def test_tokens_via_the_api(appliance) -> None:
    api, url = appliance["api"], appliance["url"]
    tok = api.post(f"{url}/tokens", json={"name": "monitoring"}).json()
    other = requests.Session()
    other.trust_env = False
    other.verify = api.verify
    other.headers["Authorization"] = f"Bearer {tok['token']}"
    assert other.get(f"{url}/metrics").status_code == 200
    assert api.delete(f"{url}/tokens/{tok['id']}").status_code == 200
    assert other.get(f"{url}/metrics").status_code == 401


def _login_attempt(url: str, cafile: str, password: str, source: str = "127.0.0.1") -> int:
    """One login on its own TCP connection from ``source`` (a loopback address): the form, then the POST."""
    ctx = ssl.create_default_context(cafile=cafile)
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, source_address=(source, 0), timeout=30)
    try:
        conn.request("GET", "/login")
        resp = conn.getresponse()
        page, cookie = resp.read().decode(), resp.getheader("Set-Cookie").split(";")[0]
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)[1]
        form = urlencode({"csrf_token": csrf, "username": "admin", "password": password})
        conn.request(
            "POST", "/login", body=form, headers={"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"}
        )
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_login_throttle_is_shared_by_the_gunicorn_workers(appliance) -> None:
    """gunicorn runs 2 workers: concurrent guesses on separate connections land on both, and still only the
    policy's 5 free guesses get their password checked; the admin on another address logs in meanwhile."""
    url, cafile, d = appliance["url"].removesuffix("/api/v1"), appliance["api"].verify, appliance["daemon"]
    offset = len(d.log())
    with ThreadPoolExecutor(12) as pool:
        codes = sorted(pool.map(lambda i: _login_attempt(url, cafile, f"guess-{i}"), range(12)))
    assert codes == [401] * 5 + [429] * 7, codes
    pids = set(re.findall(r'web 127\.0\.0\.1 "POST /login HTTP/1\.1" \d+ \S+ pid=<?(\d+)', d.log()[offset:]))
    assert len(pids) == 2, f"the guesses did not reach both workers: {pids}"
    assert _login_attempt(url, cafile, PASSWORD, source="127.0.0.2") == 302
