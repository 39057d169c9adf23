"""The web routes added for labs, item recovery and prefetch against a hostile caller, through the real Flask app
on a real state directory (no daemon needed: each hole is reached before the daemon is asked)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from appliance.access.credentials import Credentials
from tests.unit.test_web_app import BASE, login
from web import create_app


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    Credentials(tmp_path).set_password("admin", "correct horse")
    return create_app({"STATE_DIR": tmp_path, "TESTING": True})


@pytest.fixture
def page(app: Flask) -> tuple[FlaskClient, str]:
    """A logged-in browser and its CSRF token."""
    client = app.test_client()
    login(client)
    html = client.get(f"{BASE}/labs").get_data(as_text=True)
    return client, re.search(r'name="csrf_token" value="([^"]+)"', html)[1]


def flashed(client: FlaskClient) -> str:
    html = client.get(f"{BASE}/labs").get_data(as_text=True)
    return " ".join(re.findall(r'class="flash error"[^>]*>([^<]*)<', html))


BOMB = "\n".join(
    ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    + ["name: g", "vms: [{vm: a}]"]
)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("name: &n [*n]\nvms: [{vm: a}]", id="self-referencing alias"),
        pytest.param(BOMB, id="billion laughs"),
        pytest.param("name: " + "[" * 5000 + "]" * 5000 + "\nvms: [{vm: a}]", id="nested 5000 deep"),
    ],
)
def test_labs_page_group_form_refuses_hostile_yaml_with_one_line(page: tuple[FlaskClient, str], text: str) -> None:
    """A pasted group whose YAML aliases expand to 10^9 items, refer to themselves, or nest thousands deep is
    refused naming the field, quickly, not a 500 or a worker eating all memory expanding it into JSON."""
    client, csrf = page
    started = time.monotonic()
    resp = client.post(f"{BASE}/labs/groups", data={"csrf_token": csrf, "group": text})
    assert resp.status_code in (302, 303), resp.status_code
    assert time.monotonic() - started < 5
    assert re.search(r"group: .*(alias|nested)", flashed(client)), flashed(client)


def test_prefetch_refuses_a_body_it_does_not_read(app: Flask) -> None:
    """Like every other API route, prefetch takes no field it ignores: a body with fields, or not JSON, is refused
    naming it (a script sending {"disk": ...} must not believe it chose a disk)."""
    from appliance.access.credentials import Credentials as Creds

    token = Creds(app.config["STATE_DIR"]).create_token("t")["token"]
    client = app.test_client()
    auth = {"Authorization": f"Bearer {token}"}
    url = f"{BASE}/api/v1/sessions/s1/prefetch"
    resp = client.post(url, json={"disk": "a.vmdk"}, headers=auth)
    assert resp.status_code == 400 and resp.get_json()["error"]["message"].startswith("disk: unknown field")
    resp = client.post(url, data="[[", headers={**auth, "Content-Type": "application/json"})
    assert resp.status_code == 400 and "body" in resp.get_json()["error"]["message"]
    assert client.post(url, headers=auth).status_code == 503  # no body: on to the daemon (none runs here)
