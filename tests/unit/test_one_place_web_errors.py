"""Issue 9: the web app answers errors in one place (web.create_app's handlers), the same for every view.

Probe views are added to the real app so each kind of failure is raised from outside any blueprint: the
answer must not depend on which blueprint a view lives in."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from flask import Flask

from appliance.access.credentials import Credentials
from appliance.errors import IntegrityError, UsageError
from tests.unit.test_web_app import BASE, bearer, login
from web import create_app
from web.security import api_auth, login_required
from web.validation import ApiError

PASSWORD = "correct horse"


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    Credentials(tmp_path).set_password("admin", PASSWORD)
    app = create_app({"STATE_DIR": tmp_path, "TESTING": True})
    failures = {
        "api": ApiError(409, "session s1: already stopping"),
        "usage": UsageError("name: 'x y' is not a valid name"),
        "bug": RuntimeError("secret internal detail /var/lib/bootback"),
        "domain": IntegrityError("chunk 1234 damaged in /var/lib/bootback/repo"),  # raised by the web itself
    }

    def raiser(kind: str) -> None:
        raise failures[kind]

    app.add_url_rule("/api/v1/probe/<kind>", "api_probe", api_auth(raiser))
    app.add_url_rule("/probe/<kind>", "page_probe", login_required(raiser))
    return app


def test_expected_errors_answer_json_on_the_api(app: Flask, tmp_path: Path) -> None:
    client = app.test_client()
    token = Credentials(tmp_path).create_token("ci")["token"]
    resp = client.get(f"{BASE}/api/v1/probe/api", headers=bearer(token))
    assert resp.status_code == 409 and resp.json == {
        "error": {"status": 409, "message": "session s1: already stopping"}
    }
    resp = client.get(f"{BASE}/api/v1/probe/usage", headers=bearer(token))
    assert resp.status_code == 400 and resp.json["error"]["message"] == "name: 'x y' is not a valid name"


def test_expected_errors_are_flashed_back_on_the_page(app: Flask) -> None:
    client = app.test_client()
    login(client, PASSWORD)
    for kind, text in (("api", "session s1: already stopping"), ("usage", "name: &#39;x y&#39; is not a valid name")):
        resp = client.get(f"{BASE}/probe/{kind}")
        assert resp.status_code == 303 and resp.headers["Location"] == "/", kind
        page = client.get(f"{BASE}/").get_data(as_text=True)
        assert re.search(r'class="[^"]*error[^"]*"[^>]*>[^<]*' + re.escape(text), page), (kind, page[-2000:])


@pytest.mark.parametrize("kind", ["bug", "domain"])
def test_bugs_and_the_webs_own_failures_are_a_logged_plain_500(
    app: Flask, tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = app.test_client()
    token = Credentials(tmp_path).create_token("ci")["token"]
    with caplog.at_level(logging.ERROR, "bootback.web"):
        resp = client.get(f"{BASE}/api/v1/probe/{kind}", headers=bearer(token))
    assert resp.status_code == 500
    assert resp.json["error"]["message"] == "internal error; the appliance's log has the details"
    assert "/var/lib/bootback" in caplog.text
    login(client, PASSWORD)
    page = client.get(f"{BASE}/probe/{kind}")
    assert page.status_code == 500 and "/var/lib/bootback" not in page.get_data(as_text=True)
