"""The admin page and API with an S3 repository: the repository shows its s3:// location (no credentials) and
whether it is encrypted; a running session gets a "prefetch" action (``POST /api/v1/sessions/ID/prefetch``, a
button on the page) that warms its disks from the bucket into the read cache, its progress in the session's
record. The real daemon and Flask app over HTTPS, the session's RGW."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import requests

from tests.daemon_process import DaemonProcess, bootback, free_port
from tests.nfsd_process import PRIVATE_PORTS

PASSWORD = "prefetch-test-password"
CHUNKS = 12


def wait_prefetched(api: requests.Session, url: str) -> dict:
    deadline = time.monotonic() + 60
    while True:
        session = api.get(url, timeout=10).json()
        if session["prefetch"] and not any(w["running"] for w in session["prefetch"]):
            return session
        assert time.monotonic() < deadline, session
        time.sleep(0.2)


def test_prefetch_action_warms_a_running_session_from_the_bucket(rgw, s3_repo: str, tmp_path: Path) -> None:
    os.environ["BOOTBACK_PASSPHRASE"] = "prefetch-passphrase"  # s3_repo's monkeypatch restores the AWS_* ones
    try:
        bootback("init", s3_repo, "--chunk-size", "256K", "--encryption", "aes-256-gcm")
        (tmp_path / "web.raw").write_bytes(os.urandom(CHUNKS * 256 * 1024))
        bootback("backup", s3_repo, "--vm", "web", tmp_path / "web.raw")
        web = free_port()
        daemon = DaemonProcess(
            "unused", tmp_path / "state", *PRIVATE_PORTS, web_port=web, env={"BOOTBACK_ADMIN_PASSWORD": PASSWORD}
        )
        daemon.repo = s3_repo  # the daemon takes the location as it is, not as a path
        daemon.start()
    finally:
        del os.environ["BOOTBACK_PASSPHRASE"]
    base = f"https://127.0.0.1:{web}"
    try:
        api = requests.Session()
        api.trust_env = False
        api.verify = str(daemon.state / "web" / "tls.crt")
        token = bootback("token", "create", "pytest", "--state", daemon.state).stdout.strip()
        api.headers["Authorization"] = f"Bearer {token}"
        (repo,) = api.get(f"{base}/api/v1/repositories", timeout=30).json()
        assert (repo["path"], repo["encryption"], repo["points"]) == (s3_repo, "aes-256-gcm", 1), repo
        assert "bootback-test-secret" not in str(repo)

        sid = api.post(f"{base}/api/v1/sessions", json={"vm": "web", "mode": "sandbox"}, timeout=30).json()[0]["id"]
        session_url = f"{base}/api/v1/sessions/{sid}"
        assert api.get(session_url, timeout=10).json()["prefetch"] is None  # published without --prefetch
        fetched = rgw.counters()["get_b"]
        resp = api.post(f"{session_url}/prefetch", timeout=30)
        assert resp.status_code == 202, resp.text
        session = wait_prefetched(api, session_url)
        assert session["prefetch"] == [
            {"disk": "web.raw", "chunks": CHUNKS, "done": CHUNKS, "failed": 0, "running": False}
        ]
        # runs of a pack come by one ranged GET each: count the bytes, not the requests
        assert rgw.counters()["get_b"] - fetched >= CHUNKS * 256 * 1024, "the chunks did not come from the bucket"
        assert api.post(f"{base}/api/v1/sessions/nosuchsession/prefetch", timeout=30).status_code == 404

        # The page: the button on the session's row asks again; everything is local now, nothing is fetched.
        page = requests.Session()
        page.trust_env, page.verify = False, api.verify
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.get(f"{base}/login", timeout=10).text)[1]
        page.post(f"{base}/login", data={"csrf_token": csrf, "username": "admin", "password": PASSWORD}, timeout=10)
        html = page.get(f"{base}/", timeout=30).text
        assert s3_repo in html and "encrypted (aes-256-gcm)" in html and f"{CHUNKS}/{CHUNKS} chunks" in html
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', html)[1]
        gets = rgw.counters()["get"]
        resp = page.post(
            f"{base}/sessions/{sid}/prefetch", data={"csrf_token": csrf}, timeout=30, allow_redirects=False
        )
        assert resp.status_code in (302, 303), resp.text[-2000:]
        assert wait_prefetched(api, session_url)["prefetch"][0]["done"] == CHUNKS
        assert rgw.counters()["get"] == gets, "chunks already in the read cache were fetched again"
        assert f"Prefetch of {sid} started" in page.get(f"{base}/", timeout=30).text
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0, daemon.log()[-3000:]
