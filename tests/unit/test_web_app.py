"""The web app through Flask's test client: authentication, CSRF, validation, headers, the OpenAPI document.

No daemon runs here, so anything that needs one answers 503 — which is itself part of the contract.
Flows against a live daemon are in tests/integration/test_web_api.py and tests/e2e/.
"""

from __future__ import annotations

import re

import pytest
from flask import Flask
from flask.testing import FlaskClient

from appliance.access.credentials import Credentials
from appliance.errors import UsageError
from web import create_app
from web.metrics import render_metrics
from web.throttle import Policy

BASE = "https://localhost"


@pytest.fixture
def app(tmp_path) -> Flask:
    Credentials(tmp_path).set_password("admin", "correct horse")
    return create_app({"STATE_DIR": tmp_path, "TESTING": True})


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def token(tmp_path) -> str:
    return Credentials(tmp_path).create_token("ci")["token"]


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def login(client: FlaskClient, password: str = "correct horse") -> str:
    page = client.get(f"{BASE}/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)[1]
    resp = client.post(f"{BASE}/login", data={"csrf_token": csrf, "username": "admin", "password": password})
    return resp


def test_health_is_open_and_reports_a_missing_daemon(client: FlaskClient) -> None:
    resp = client.get(f"{BASE}/api/v1/health")
    assert resp.status_code == 503
    assert resp.json["daemon"] is False and resp.json["status"] == "unavailable"


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/api/v1/status"),
        ("GET", "/api/v1/sessions"),
        ("POST", "/api/v1/sessions"),
        ("DELETE", "/api/v1/sessions/abc"),
        ("GET", "/api/v1/metrics"),
        ("GET", "/api/v1/openapi.json"),
        ("GET", "/api/v1/repositories"),
        ("POST", "/api/v1/tokens"),
        ("GET", "/api/v1/cache"),
    ],
)
def test_everything_but_health_needs_authentication(client: FlaskClient, method: str, path: str) -> None:
    resp = client.open(f"{BASE}{path}", method=method)
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert "authentication required" in resp.json["error"]["message"]


def test_wrong_or_revoked_tokens_are_refused(client: FlaskClient, tmp_path) -> None:
    assert client.get(f"{BASE}/api/v1/tokens", headers=bearer("bbt_forged")).status_code == 401
    creds = Credentials(tmp_path)
    tok = creds.create_token("short-lived")
    assert client.get(f"{BASE}/api/v1/tokens", headers=bearer(tok["token"])).status_code == 200
    assert creds.revoke_token(tok["id"])
    assert client.get(f"{BASE}/api/v1/tokens", headers=bearer(tok["token"])).status_code == 401
    # tokens are stored as digests only
    assert tok["token"] not in (tmp_path / "web" / "tokens.json").read_text()


def test_pages_redirect_to_login(client: FlaskClient) -> None:
    resp = client.get(f"{BASE}/")
    assert resp.status_code == 302 and "/login" in resp.headers["Location"]


def test_login_rejects_a_wrong_password_and_accepts_the_right_one(client: FlaskClient) -> None:
    assert login(client, "wrong password").status_code == 401
    resp = login(client)
    assert resp.status_code == 302
    page = client.get(f"{BASE}/")
    assert page.status_code == 200
    assert "The bootback daemon does not answer" in page.get_data(as_text=True)


def test_login_form_needs_its_csrf_token(client: FlaskClient) -> None:
    resp = client.post(f"{BASE}/login", data={"username": "admin", "password": "correct horse"})
    assert resp.status_code == 400
    assert client.get(f"{BASE}/").status_code == 302


def test_login_does_not_redirect_off_site(client: FlaskClient) -> None:
    page = client.get(f"{BASE}/login?next=//evil.example/").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)[1]
    resp = client.post(
        f"{BASE}/login?next=//evil.example/",
        data={"csrf_token": csrf, "username": "admin", "password": "correct horse"},
    )
    assert resp.headers["Location"] == "/"


def test_password_guessing_is_slowed(app: Flask, client: FlaskClient) -> None:
    app.config["LOGIN_POLICY"] = Policy(first_delay=60)  # no wait runs out while this slow test guesses
    codes = [login(client, f"guess-{i}").status_code for i in range(6)]
    assert codes[:5] == [401] * 5 and codes[5] == 429


def test_cookie_requests_that_change_state_need_the_csrf_header(client: FlaskClient) -> None:
    login(client)
    resp = client.post(f"{BASE}/api/v1/tokens", json={"name": "x"})
    assert resp.status_code == 403 and "CSRF" in resp.json["error"]["message"]
    page = client.get(f"{BASE}/").get_data(as_text=True)
    csrf = re.search(r'<meta name="csrf-token" content="([^"]+)"', page)[1]
    resp = client.post(f"{BASE}/api/v1/tokens", json={"name": "x"}, headers={"X-CSRF-Token": csrf})
    assert resp.status_code == 201 and resp.json["token"].startswith("bbt_")
    # forms on the page are checked the same way
    assert client.post(f"{BASE}/sessions/abc/stop", data={}).status_code == 400


@pytest.mark.parametrize(
    "body,field",
    [
        ({"vm": 5}, "vm"),
        ({"vm": "web01", "mode": "live"}, "mode"),
        ({"vm": "web01", "color": "red"}, "color"),
        ({}, "vm"),
        ({"vms": ["ok", 3]}, "vms[1]"),
        ({"vm": "../etc"}, "vm"),
        ({"vm": "web01", "cache": "relative/dir"}, "cache"),
        ({"vm": "web01", "point": True}, "point"),
        (["web01"], "body"),
    ],
)
def test_invalid_publish_requests_name_the_field(client: FlaskClient, token: str, body, field: str) -> None:
    resp = client.post(f"{BASE}/api/v1/sessions", json=body, headers=bearer(token))
    assert resp.status_code == 400
    assert resp.json["error"]["message"].startswith(f"{field}:")


def test_malformed_json_and_wrong_content_type(client: FlaskClient, token: str) -> None:
    resp = client.post(
        f"{BASE}/api/v1/sessions", data="{not json", headers={**bearer(token), "Content-Type": "application/json"}
    )
    assert resp.status_code == 400 and "JSON" in resp.json["error"]["message"]
    resp = client.post(
        f"{BASE}/api/v1/sessions",
        data="vm=x",
        headers={**bearer(token), "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert resp.status_code == 415
    resp = client.post(f"{BASE}/api/v1/sessions/abc/migration", json={"output": "x"}, headers=bearer(token))
    assert resp.status_code == 400 and resp.json["error"]["message"].startswith("output:")
    resp = client.delete(f"{BASE}/api/v1/sessions/abc?force=maybe", headers=bearer(token))
    assert resp.status_code == 400 and resp.json["error"]["message"].startswith("force:")


def test_a_valid_request_without_a_daemon_is_503(client: FlaskClient, token: str) -> None:
    resp = client.post(f"{BASE}/api/v1/sessions", json={"vm": "web01"}, headers=bearer(token))
    assert resp.status_code == 503 and "daemon" in resp.json["error"]["message"]


def test_unknown_api_paths_and_methods_answer_json(client: FlaskClient, token: str) -> None:
    resp = client.get(f"{BASE}/api/v1/nothing-here", headers=bearer(token))
    assert resp.status_code == 404 and resp.json["error"]["status"] == 404
    resp = client.put(f"{BASE}/api/v1/sessions", headers=bearer(token))
    assert resp.status_code == 405 and resp.is_json
    assert client.delete(f"{BASE}/api/v1/tokens/nope", headers=bearer(token)).status_code == 404


def test_security_headers(client: FlaskClient) -> None:
    for path in ("/login", "/api/v1/health"):
        h = client.get(f"{BASE}{path}").headers
        assert "default-src 'self'" in h["Content-Security-Policy"]
        assert h["X-Content-Type-Options"] == "nosniff" and h["X-Frame-Options"] == "DENY"
        assert h["Cache-Control"] == "no-store"
    login(client)
    cookie = client.get_cookie("bootback_session", domain="localhost")
    assert cookie.secure and cookie.http_only and cookie.same_site == "Strict"


def test_openapi_lists_exactly_the_api_routes(app: Flask, client: FlaskClient, token: str) -> None:
    doc = client.get(f"{BASE}/api/v1/openapi.json", headers=bearer(token)).json
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    routed = {
        (re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method)
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/api/v1")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert documented == routed


def test_credentials_refuse_short_passwords_and_generate_one_once(tmp_path) -> None:
    creds = Credentials(tmp_path / "fresh")
    generated = creds.ensure_admin()
    assert generated and creds.check_password("admin", generated)
    assert creds.ensure_admin() is None  # printed once only
    assert oct((tmp_path / "fresh" / "web" / "users.json").stat().st_mode & 0o777) == "0o600"
    assert generated not in (tmp_path / "fresh" / "web" / "users.json").read_text()
    with pytest.raises(UsageError, match="password: must have 8 to"):
        creds.set_password("admin", "short")


def test_metrics_are_prometheus_text() -> None:
    status = {
        "cache": {"path": "/c", "free": 5 * 2**40, "total": 8 * 2**40, "min_free": 100 * 2**30},
        "clients": [{"address": "10.0.0.7", "connections": 8, "calls": 1234}],
    }
    sessions = [{"id": "ab12", "vm": 'we"b', "mode": "instant", "cache_used_bytes": 65536, "changed_bytes": 4096}]
    text = render_metrics(status, sessions, [{"name": "main", "points": 3}])
    assert 'bootback_sessions{mode="instant"} 1' in text
    assert 'bootback_session_cache_bytes{session="ab12",vm="we\\"b",mode="instant"} 65536' in text
    assert 'bootback_cache_free_bytes{path="/c"} 5497558138880' in text
    assert 'bootback_nfs_calls_total{client="10.0.0.7"} 1234' in text
    for line in text.splitlines():
        assert line.startswith("#") or re.match(r"^[a-z_]+(\{.*\})? -?[0-9.e+]+$", line), line
