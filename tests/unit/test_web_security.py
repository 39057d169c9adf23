"""The web layer against a careless or hostile caller (issue 8), through the real Flask app on a real state dir:
open redirects, server-side logout, the login throttle shared by workers, file modes, atomic writes, the
NFS-open banner (with a real daemon), field validation, body limits, CSRF on every state change, and no
internals in 500s.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from pathlib import Path
from urllib.parse import unquote

import pytest
from flask import Flask
from flask.testing import FlaskClient

from appliance.access.credentials import Credentials
from appliance.atomicfile import create_once, write_atomic
from tests.daemon_process import DaemonProcess, bootback
from tests.nfsd_process import PRIVATE_PORTS
from tests.unit.test_web_app import BASE, bearer, login
from web import create_app
from web.exposure import nfs_open_to_everyone
from web.launcher import prepare
from web.throttle import Policy

PASSWORD = "correct horse"


def make_app(state: Path, **config) -> Flask:
    return create_app({"STATE_DIR": state, "TESTING": True, **config})


@pytest.fixture
def state(tmp_path: Path) -> Path:
    Credentials(tmp_path).set_password("admin", PASSWORD)
    return tmp_path


def client_from(app: Flask, addr: str) -> FlaskClient:
    c = app.test_client()
    c.environ_base["REMOTE_ADDR"] = addr
    return c


def csrf_of(client: FlaskClient, path: str = "/") -> str:
    return re.search(r'<meta name="csrf-token" content="([^"]+)"', client.get(f"{BASE}{path}").get_data(True))[1]


def login_next(client: FlaskClient, nxt: str, password: str = PASSWORD):
    page = client.get(f"{BASE}/login", query_string={"next": nxt}).get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)[1]
    return client.post(
        f"{BASE}/login",
        query_string={"next": nxt},
        data={"csrf_token": csrf, "username": "admin", "password": password},
    )


# --- open redirect --------------------------------------------------------------------------------------
HOSTILE_NEXT = [
    "/\t/evil.example",
    "/\n/evil.example",
    "//evil.example",
    "///evil.example",
    "\\\\evil.example",
    "/\\evil.example",
    "\\/evil.example",
    "https://evil.example/",
    "http:evil.example",
    "/%2F%2Fevil.example",
    "/%2f/evil.example",
    "/%5Cevil.example",
    "%2F%2Fevil.example",
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    " //evil.example",
    "evil.example",
    "/\x00/evil.example",
    "/ /evil.example",
    "/" + "a" * 3000,
]


@pytest.mark.parametrize("nxt", HOSTILE_NEXT)
def test_login_never_redirects_off_site(state: Path, nxt: str) -> None:
    resp = login_next(make_app(state).test_client(), nxt)
    assert resp.status_code == 302
    assert resp.headers["Location"] == "/", f"next={nxt!r} led to {resp.headers['Location']!r}"


def test_login_returns_to_the_page_it_came_from(state: Path) -> None:
    client = make_app(state).test_client()
    first = client.get(f"{BASE}/files", query_string={"repository": "main", "point": "web01"})
    assert first.status_code == 302
    nxt = re.search(r"next=([^&]+)", first.headers["Location"])[1]
    resp = login_next(client, unquote(nxt))
    assert resp.headers["Location"] == "/files?repository=main&point=web01"


# --- server-side sessions -------------------------------------------------------------------------------
def _cookie(client: FlaskClient) -> str:
    return client.get_cookie("bootback_session", domain="localhost").value


def _replay(app: Flask, cookie: str) -> FlaskClient:
    c = app.test_client()
    c.set_cookie("bootback_session", cookie, domain="localhost")
    return c


def test_logout_ends_the_session_for_a_kept_cookie(state: Path) -> None:
    app = make_app(state)
    client = app.test_client()
    assert login(client, PASSWORD).status_code == 302
    kept = _cookie(client)
    assert _replay(app, kept).get(f"{BASE}/api/v1/tokens").status_code == 200  # the copy works while logged in
    assert client.post(f"{BASE}/logout", data={"csrf_token": csrf_of(client)}).status_code == 302
    stolen = _replay(app, kept)
    assert stolen.get(f"{BASE}/api/v1/tokens").status_code == 401
    resp = stolen.get(f"{BASE}/")
    assert resp.status_code == 302 and resp.headers["Location"].startswith("/login")
    # and in another worker (another app on the same state) as well
    assert _replay(make_app(state), kept).get(f"{BASE}/api/v1/tokens").status_code == 401
    assert login(stolen, PASSWORD).status_code == 302  # a stale cookie does not get in the way of a new login
    assert stolen.get(f"{BASE}/api/v1/tokens").status_code == 200


def test_a_password_change_ends_every_login(state: Path) -> None:
    app = make_app(state)
    clients = [app.test_client() for _ in range(2)]
    for c in clients:
        assert login(c, PASSWORD).status_code == 302
        assert c.get(f"{BASE}/api/v1/tokens").status_code == 200
    Credentials(state).set_password("admin", "a new password")
    for c in clients:
        assert c.get(f"{BASE}/api/v1/tokens").status_code == 401


def test_a_cookie_without_a_server_side_login_is_refused(state: Path) -> None:
    """A cookie signed with the right key but naming a user and no login (the old format) gets nowhere."""
    app = make_app(state)
    forged = app.session_interface.get_signing_serializer(app).dumps({"user": "admin", "csrf": "x"})
    assert _replay(app, forged).get(f"{BASE}/api/v1/tokens").status_code == 401


# --- login throttling -----------------------------------------------------------------------------------
ATTACKER, ADMIN_ADDR = "203.0.113.9", "198.51.100.7"


def test_throttle_is_shared_by_workers_and_spares_other_addresses(state: Path) -> None:
    slow = Policy(first_delay=60)
    worker1, worker2 = make_app(state, LOGIN_POLICY=slow), make_app(state, LOGIN_POLICY=slow)  # two workers
    a1, a2 = client_from(worker1, ATTACKER), client_from(worker2, ATTACKER)
    codes = [login(a1 if i % 2 else a2, f"guess-{i}").status_code for i in range(5)]
    assert codes == [401] * 5
    for a in (a1, a2):  # the sixth guess, on either worker, waits
        resp = login(a, "guess-6")
        assert resp.status_code == 429 and int(resp.headers["Retry-After"]) >= 1
    # while the attacker keeps hammering, the admin on another address logs in at once, on either worker
    for i in range(20):
        assert login(a1 if i % 2 else a2, f"more-{i}").status_code == 429
    admin = client_from(worker2, ADMIN_ADDR)
    assert login(admin, PASSWORD).status_code == 302
    assert admin.get(f"{BASE}/api/v1/tokens").status_code == 200


def test_a_throttled_address_still_logs_in_with_the_right_password_after_the_wait(state: Path) -> None:
    app = make_app(state, LOGIN_POLICY=Policy(free=2, first_delay=3, max_delay=3))
    c = client_from(app, ATTACKER)
    assert [login(c, f"guess-{i}").status_code for i in range(2)] == [401, 401]
    assert login(c, PASSWORD).status_code == 429  # not even looked at: the address must wait
    time.sleep(3.1)
    assert login(c, PASSWORD).status_code == 302


def test_ipv6_neighbours_in_one_64_share_a_throttle(state: Path) -> None:
    app = make_app(state, LOGIN_POLICY=Policy(free=2, first_delay=60))
    for i in range(2):
        assert login(client_from(app, f"2001:db8:1:2::{i + 1}"), "guess").status_code == 401
    assert login(client_from(app, "2001:db8:1:2::99"), "guess").status_code == 429
    assert login(client_from(app, "2001:db8:1:3::1"), "guess").status_code == 401  # another /64


def test_many_addresses_slow_down_strangers_but_not_known_admin_addresses(state: Path) -> None:
    app = make_app(state, LOGIN_POLICY=Policy(global_free=5, global_spacing=30))
    assert login(client_from(app, ADMIN_ADDR), PASSWORD).status_code == 302  # the admin's usual address
    for i in range(5):  # a guesser spreading over addresses: each stays under its own limit
        assert login(client_from(app, f"192.0.2.{i + 1}"), "guess").status_code == 401
    resp = login(client_from(app, "192.0.2.200"), "guess")
    assert resp.status_code == 429 and int(resp.headers["Retry-After"]) <= 30
    assert login(client_from(app, ADMIN_ADDR), PASSWORD).status_code == 302


# --- files and atomic writes ----------------------------------------------------------------------------
def test_state_web_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)  # gunicorn's default for its workers
    try:
        (tmp_path / "web").mkdir(mode=0o755)  # left by an older version
        prepare(tmp_path)  # admin login, session key, TLS certificate
        app = make_app(tmp_path)
        Credentials(tmp_path).set_password("admin", PASSWORD)
        client = app.test_client()
        assert login(client, PASSWORD).status_code == 302
        client.post(f"{BASE}/api/v1/tokens", json={"name": "x"}, headers={"X-CSRF-Token": csrf_of(client)})
    finally:
        os.umask(old)
    web = tmp_path / "web"
    assert stat.S_IMODE(web.stat().st_mode) == 0o700
    files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in web.iterdir()}
    assert {"users.json", "tokens.json", "session-key", "tls.crt", "tls.key", "auth.db"} <= set(files)
    assert files == dict.fromkeys(files, 0o600)


def test_tokens_created_concurrently_are_all_kept(state: Path) -> None:
    """Workers writing tokens.json at once: with a shared temp name and no lock, tokens got lost."""
    made: list[str] = []
    errors: list[BaseException] = []

    def create(n: int) -> None:
        try:
            for i in range(8):
                made.append(Credentials(state).create_token(f"t{n}-{i}")["token"])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    creds = Credentials(state)
    assert len(creds.tokens()) == 48 and all(creds.check_token(t) for t in made)
    assert not [p.name for p in (state / "web").iterdir() if p.name.endswith(".tmp")]


def test_atomic_helpers(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_atomic(tmp_path / "f", "one", 0o600)
        write_atomic(tmp_path / "f", b"two", 0o640)
    finally:
        os.umask(old)
    assert (tmp_path / "f").read_text() == "two" and stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640
    assert create_once(tmp_path / "k", b"first") is True
    assert create_once(tmp_path / "k", b"second") is False
    assert (tmp_path / "k").read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "k"]


# --- NFS open to everyone -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "status,expected",
    [
        ({"nfs_open_to_everyone": True}, True),
        ({"nfs_open_to_everyone": False, "allowed_networks": ["0.0.0.0/0"]}, False),
        ({"nfs_clients": ["10.0.0.0/8", "::/0"]}, True),
        ({"allowed_networks": ["10.0.0.0/8"]}, False),
        ({}, None),
        ({"allowed_networks": ["not a network"]}, None),
        ({"nfs_open_to_everyone": "yes"}, None),
    ],
)
def test_nfs_exposure_is_read_defensively(status: dict, expected: bool | None) -> None:
    assert nfs_open_to_everyone(status) is expected


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("exposure") / "repo"
    bootback("init", path)
    return path


@pytest.mark.parametrize("clients,open_", [(None, True), ("127.0.0.1/32,::1/128", False)])
def test_the_page_and_status_warn_when_nfs_is_open_to_everyone(repo: Path, tmp_path: Path, clients, open_) -> None:
    extra = ("--clients", clients) if clients else ()
    d = DaemonProcess(
        repo,
        tmp_path / "state",
        *PRIVATE_PORTS,
        *extra,
    )
    d.start()
    try:
        Credentials(d.state).set_password("admin", PASSWORD)
        client = make_app(d.state).test_client()
        assert login(client, PASSWORD).status_code == 302
        for path in ("/", "/files?repository=repo&point=web01"):
            page = client.get(f"{BASE}{path}").get_data(as_text=True)
            assert ('id="nfs-open-warning"' in page) is open_, path
        status = client.get(f"{BASE}/api/v1/status").json
        assert status["nfs_open_to_everyone"] is open_
        assert bool(status["warnings"]) is open_
    finally:
        d.stop()


def test_the_login_page_shows_no_banner(state: Path) -> None:
    page = make_app(state).test_client().get(f"{BASE}/login").get_data(as_text=True)
    assert "nfs-open-warning" not in page


# --- input validation, limits, CSRF, errors -------------------------------------------------------------
@pytest.mark.parametrize(
    "path,body,field",
    [
        ("/api/v1/sessions", {"vm": "web01\n"}, "vm"),
        ("/api/v1/sessions", {"vm": "web01", "repository": "../other"}, "repository"),
        ("/api/v1/sessions", {"vm": "web01", "repository": "r" * 300}, "repository"),
        ("/api/v1/sessions", {"vms": ["a"] * 300}, "vms"),
        ("/api/v1/sessions", {"vm": "web01", "cache": "/x" * 3000}, "cache"),
        ("/api/v1/sessions", {"vm": "web01", "cache": "/tmp/a\x00b"}, "cache"),
        ("/api/v1/verifications", {"vm": "web01", "expect": "x" * 501}, "expect"),
        ("/api/v1/verifications", {"vm": "web01", "timeout": "300"}, "timeout"),
        ("/api/v1/verifications", {"vm": "web01", "memory_mib": True}, "memory_mib"),
        ("/api/v1/verifications", {"vm": "web01", "memory_mib": 1.5}, "memory_mib"),
        ("/api/v1/verifications", {"vm": "web01", "repository": 7}, "repository"),
        ("/api/v1/tokens", {"name": "n" * 65}, "name"),
        ("/api/v1/tokens", {"name": ["x"]}, "name"),
        ("/api/v1/tokens", {"name": ""}, "name"),
        ("/api/v1/sessions/abc/migration", {"output": "/" + "o" * 5000}, "output"),
    ],
)
def test_bad_fields_are_refused_early_naming_the_field(state: Path, path: str, body: dict, field: str) -> None:
    token = Credentials(state).create_token("ci")["token"]
    resp = make_app(state).test_client().post(f"{BASE}{path}", json=body, headers=bearer(token))
    assert resp.status_code == 400, resp.json
    assert resp.json["error"]["message"].startswith(f"{field}:"), resp.json


@pytest.mark.parametrize(
    "body,field",
    [
        ('{"vm": "w", "timeout": NaN}', "timeout"),
        ('{"vm": "w", "timeout": 1e999}', "timeout"),
        ("[" * 100_000 + "]" * 100_000, "body"),
        ('{"vm": "w", "timeout": 1' + "0" * 5000 + "}", "body"),
    ],
)
def test_hostile_json_is_a_400_not_a_crash(state: Path, body: str, field: str) -> None:
    token = Credentials(state).create_token("ci")["token"]
    headers = {**bearer(token), "Content-Type": "application/json"}
    resp = make_app(state).test_client().post(f"{BASE}/api/v1/verifications", data=body, headers=headers)
    assert resp.status_code == 400 and resp.json["error"]["message"].startswith(f"{field}:"), resp.json


@pytest.mark.parametrize(
    "path", ["/api/v1/sessions/" + "s" * 300, "/api/v1/verifications/a%0Ab", "/api/v1/repositories/-x/points"]
)
def test_bad_ids_in_urls_are_refused(state: Path, path: str) -> None:
    token = Credentials(state).create_token("ci")["token"]
    resp = make_app(state).test_client().get(f"{BASE}{path}", headers=bearer(token))
    assert resp.status_code == 400 and re.match(r"^(sid|vid|name): ", resp.json["error"]["message"]), resp.json


def test_page_forms_use_the_same_rules(state: Path) -> None:
    client = make_app(state).test_client()
    login(client, PASSWORD)
    csrf = csrf_of(client)
    resp = client.post(
        f"{BASE}/verifications", data={"csrf_token": csrf, "vm": "web01", "expect": "x" * 501}, follow_redirects=True
    )
    assert "expect: at most 500 characters" in resp.get_data(as_text=True)
    resp = client.post(
        f"{BASE}/sessions",
        data={"csrf_token": csrf, "vm": "web01", "mode": "instant", "repository": "../x"},
        follow_redirects=True,
    )
    assert "repository: &#39;../x&#39; is not a valid name" in resp.get_data(as_text=True)
    resp = client.post(f"{BASE}/sessions/{'s' * 300}/stop", data={"csrf_token": csrf}, follow_redirects=True)
    assert "sid: " in resp.get_data(as_text=True)
    resp = client.get(f"{BASE}/files", query_string={"repository": "a\nb", "point": "web01"})
    assert resp.status_code == 400 and "repository: &#39;a\\nb&#39; is not a valid name" in resp.get_data(True)


def test_big_bodies_are_refused_before_they_are_read(state: Path) -> None:
    token = Credentials(state).create_token("ci")["token"]
    client = make_app(state).test_client()
    resp = client.post(
        f"{BASE}/api/v1/tokens",
        data=b"{" + b" " * (2 << 20) + b"}",
        headers={**bearer(token), "Content-Type": "application/json"},
    )
    assert resp.status_code == 413 and resp.is_json
    resp = client.post(f"{BASE}/login", data={"csrf_token": "x", "password": "p" * (2 << 20)})
    assert resp.status_code == 413


def test_every_state_changing_route_needs_csrf_with_the_cookie(state: Path) -> None:
    app = make_app(state)
    client = app.test_client()
    login(client, PASSWORD)
    checked = 0
    for rule in app.url_map.iter_rules():
        for method in rule.methods - {"GET", "HEAD", "OPTIONS"}:
            if rule.endpoint == "pages.login":
                continue  # checked by test_login_form_needs_its_csrf_token
            url = re.sub(r"<(?:\w+:)?\w+>", "abc", rule.rule)
            resp = client.open(f"{BASE}{url}", method=method, json={} if rule.rule.startswith("/api/") else None)
            assert resp.status_code == (403 if rule.rule.startswith("/api/") else 400), (method, url)
            checked += 1
    assert checked >= 10
    assert client.get(f"{BASE}/api/v1/tokens").status_code == 200  # still logged in: nothing was done


def test_unexpected_errors_are_a_plain_500(state: Path, caplog: pytest.LogCaptureFixture) -> None:
    token = Credentials(state).create_token("ci")["token"]
    client = make_app(state).test_client()
    login(client, PASSWORD)
    (state / "web" / "tokens.json").write_text("{damaged")
    resp = client.get(f"{BASE}/api/v1/tokens", headers=bearer(token))
    assert resp.status_code == 500
    assert resp.json["error"]["message"] == "internal error; the appliance's log has the details"
    assert "tokens.json" in caplog.text  # the details are in the log, not the answer
    page = client.get(f"{BASE}/")
    assert page.status_code == 500 and "tokens.json" not in page.get_data(as_text=True)
