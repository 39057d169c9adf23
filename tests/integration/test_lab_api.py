"""The labs' REST API (web/labs.py) on a live daemon over HTTPS, called like a script would: groups defined,
listed and removed; a verification and a sandbox lab started, followed and stopped; a VM's screenshot and
console downloaded; every bad field answered with one line naming it; nothing outside the lab's directory read.

The labs run 'broken', a VM whose disk the BIOS cannot boot: qemu runs (so there is a console and a
screenshot) and its console check fails at a short timeout, so the whole module costs seconds, not boots."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.daemon_process import bootback, tree_hash
from tests.integration.lab_web import api_session, lab_repository, lab_web_appliance, needs_labs

pytestmark = [pytest.mark.slow, *needs_labs()]
PASSWORD = "lab-api-password"
LIVE = ("verifying", "starting", "running")
BROKEN = {
    "name": "broken",
    "vms": [{"vm": "broken", "checks": [{"type": "console", "expect": "login:", "timeout": 6}]}],
}


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory, build_cache: Path):
    base = tmp_path_factory.mktemp("labapi")
    repo = lab_repository(base, build_cache, roles=())
    before = tree_hash(repo)
    d, url = lab_web_appliance(repo, base / "state", PASSWORD)
    token = bootback("token", "create", "pytest", "--state", d.state).stdout.strip()
    yield {"api": api_session(d, token), "url": f"{url}/api/v1", "daemon": d, "base": url}
    d.stop()
    assert tree_hash(repo) == before, "the repository changed"


def error(resp) -> str:
    return resp.json()["error"]["message"]


def wait_done(api, url: str, lab_id: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while (record := api.get(f"{url}/labs/{lab_id}").json())["state"] in LIVE:
        assert time.monotonic() < deadline, record
        time.sleep(0.5)
    return record


def test_groups_are_defined_listed_and_removed_with_each_bad_field_named(appliance) -> None:
    api, url = appliance["api"], appliance["url"]
    resp = api.post(f"{url}/lab-groups", json=BROKEN)
    assert resp.status_code == 201, resp.text
    assert resp.json()["vms"][0]["address"] == "10.0.0.10"
    assert [g["name"] for g in api.get(f"{url}/lab-groups").json()] == ["broken"]
    assert api.get(f"{url}/lab-groups/broken").json()["vms"][0]["vm"] == "broken"

    bad = {
        "missing vms": ({"name": "x"}, "group: missing field 'vms'"),
        "unknown field": ({**BROKEN, "colour": "red"}, "group: unknown field 'colour'"),
        "bad name": ({**BROKEN, "name": "../etc"}, "group name: letters, digits"),
        "bad check": (
            {"name": "x", "vms": [{"vm": "a", "checks": [{"type": "telnet"}]}]},
            "vm a.checks[0]: a check with 'type' one of",
        ),
        "bad port": (
            {"name": "x", "vms": [{"vm": "a", "checks": [{"type": "tcp", "port": 70000}]}]},
            "vm a.checks[0].port: a whole number from 1 to 65535, got 70000",
        ),
        "bad address": ({"name": "x", "vms": [{"vm": "a", "address": "10.9.9.9"}]}, "vm a.address:"),
    }
    for case, (doc, message) in bad.items():
        resp = api.post(f"{url}/lab-groups", json=doc)
        assert resp.status_code == 400 and error(resp).startswith(message), (case, resp.text)
    resp = api.post(f"{url}/lab-groups", json=["not", "an", "object"])
    assert resp.status_code == 400 and error(resp) == "body: expected a JSON object, got a list"
    resp = api.post(f"{url}/lab-groups", data="name: x", headers={"Content-Type": "text/yaml"})
    assert resp.status_code == 415
    resp = api.post(f"{url}/lab-groups")
    assert resp.status_code == 400 and error(resp).startswith("body: a group document"), resp.text
    deep = "[" * 100_000 + "]" * 100_000
    for path in ("lab-groups", "labs"):
        resp = api.post(f"{url}/{path}", data=deep, headers={"Content-Type": "application/json"})
        assert resp.status_code == 400 and error(resp) == "body: JSON nested too deeply", (path, resp.text)

    # names in URLs: nothing but a name, so no path leads out of STATE/lab-groups
    for name in ("..", ".hidden", "a b"):
        resp = api.delete(f"{url}/lab-groups/{name}")
        assert resp.status_code in (400, 404) and resp.headers["Content-Type"] == "application/json", name
    resp = api.delete(f"{url}/lab-groups/.hidden")
    assert resp.status_code == 400 and error(resp) == "name: '.hidden' is not a valid name or id"
    resp = api.get(f"{url}/lab-groups/ghost")
    assert resp.status_code == 404 and "ghost" in error(resp)

    # the lab start's own fields
    starts = {
        "no group": ({}, 400, "group: required"),
        "group not a name": ({"group": "../broken"}, 400, "group: '../broken' is not a valid group name"),
        "group a number": ({"group": 7}, 400, "group: expected a string or an object, got a number"),
        "kind": ({"group": "broken", "kind": "forever"}, 400, "kind: must be one of verification, sandbox"),
        "ttl text": ({"group": "broken", "kind": "sandbox", "ttl": "forever"}, 400, "ttl: a duration such as"),
        "ttl too long": ({"group": "broken", "kind": "sandbox", "ttl": "30d"}, 400, "ttl: from 1m to 7d"),
        "ttl on a verification": ({"group": "broken", "ttl": "1h"}, 400, "ttl: only a sandbox lab has one"),
        "unknown field": ({"group": "broken", "vm": "x"}, 400, "vm: unknown field"),
        "undefined group": ({"group": "ghost"}, 404, "no lab group 'ghost'"),
        "inline group checked": ({"group": {"name": "x", "vms": []}}, 400, "group vms: a list of 1 to"),
    }
    for case, (body, status, message) in starts.items():
        resp = api.post(f"{url}/labs", json=body)
        assert resp.status_code == status and error(resp).startswith(message), (case, resp.text)
    assert api.get(f"{url}/labs").json() == [], "a refused start left a lab behind"

    assert api.delete(f"{url}/lab-groups/broken").json() == {"name": "broken", "removed": True}
    assert api.get(f"{url}/lab-groups").json() == []
    assert api.delete(f"{url}/lab-groups/broken").status_code == 404


def test_auth_and_csrf_as_the_rest_of_the_api(appliance) -> None:
    url = appliance["url"]
    anonymous = api_session(appliance["daemon"])
    assert anonymous.get(f"{url}/labs").status_code == 401
    assert anonymous.post(f"{url}/labs", json={"group": "broken"}).status_code == 401
    # a logged-in browser without the CSRF token cannot start or stop labs
    page = api_session(appliance["daemon"])
    form = page.get(f"{appliance['base']}/login").text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form)[1]
    resp = page.post(f"{appliance['base']}/login", data={"csrf_token": csrf, "username": "admin", "password": PASSWORD})
    assert resp.status_code == 200 and resp.url.endswith("/"), resp.url
    assert page.get(f"{url}/labs").status_code == 200
    resp = page.post(f"{url}/labs", json={"group": BROKEN})
    assert resp.status_code == 403 and "CSRF" in error(resp)
    assert page.get(f"{url}/labs").json() == []
    # the labs page itself, with the nav link from every page
    assert 'href="/labs"' in page.get(f"{appliance['base']}/").text
    assert 'id="lab-groups"' in page.get(f"{appliance['base']}/labs").text


def test_verification_record_screenshot_and_console(appliance) -> None:
    api, url, d = appliance["api"], appliance["url"], appliance["daemon"]
    resp = api.post(f"{url}/labs", json={"group": BROKEN})
    assert resp.status_code == 202, resp.text
    started = resp.json()
    assert started["state"] == "verifying" and started["kind"] == "verification" and started["expires"] is None
    lab_id = started["id"]
    assert [r["id"] for r in api.get(f"{url}/labs").json()] == [lab_id]
    record = wait_done(api, url, lab_id)
    assert record["state"] == "failed", record
    (vm,) = record["report"]["vms"]
    assert vm["state"] == "failed" and vm["checks"][0]["line"].startswith("console 'login:': FAILED"), vm
    assert record["report"]["failed"] == [f"broken: {vm['checks'][0]['line']}"]

    png = api.get(f"{url}/labs/{lab_id}/vms/broken/screenshot")
    assert png.status_code == 200 and png.headers["Content-Type"] == "image/png"
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n" and png.content == Path(vm["screenshot"]).read_bytes()
    log = api.get(f"{url}/labs/{lab_id}/vms/broken/console")
    assert log.status_code == 200 and log.headers["Content-Type"].startswith("text/plain")
    assert f'filename="lab-{lab_id}-broken-console.log"' in log.headers["Content-Disposition"]
    assert log.content == Path(vm["console_log"]).read_bytes()  # empty: no boot (the page test reads a real one)

    assert api.get(f"{url}/labs/{lab_id}/vms/ghost/screenshot").status_code == 404
    resp = api.get(f"{url}/labs/0123456789ab")
    assert resp.status_code == 404 and error(resp) == "no lab '0123456789ab'"
    resp = api.get(f"{url}/labs/.{lab_id}/vms/broken/console")
    assert resp.status_code == 400 and error(resp).startswith("lab_id: ")

    # a file of the lab's directory replaced by a symlink (to a host secret) is not followed
    shot = Path(vm["screenshot"])
    assert shot.parent == d.state / "labs" / lab_id
    shot.unlink()
    shot.symlink_to("/etc/shadow")
    resp = api.get(f"{url}/labs/{lab_id}/vms/broken/screenshot")
    assert resp.status_code == 404 and "cannot be read" in error(resp), resp.text
    # a stopped lab that already ended keeps its verdict
    assert api.delete(f"{url}/labs/{lab_id}").json()["state"] == "failed"


def test_sandbox_lab_runs_until_stopped_with_its_expiry(appliance) -> None:
    api, url, d = appliance["api"], appliance["url"], appliance["daemon"]
    group = {"name": "idle", "vms": [{"vm": "broken"}]}  # no checks: up as soon as its qemu runs
    resp = api.post(f"{url}/labs", json={"group": group, "kind": "sandbox", "ttl": "10m"})
    assert resp.status_code == 202, resp.text
    lab_id = resp.json()["id"]
    deadline = time.monotonic() + 60
    while (record := api.get(f"{url}/labs/{lab_id}").json())["state"] == "starting":
        assert time.monotonic() < deadline, record
        time.sleep(0.5)
    assert record["state"] == "running" and record["kind"] == "sandbox", record
    started, expires = (record[k][:19] for k in ("started", "expires"))
    assert time.mktime(time.strptime(expires, "%Y-%m-%dT%H:%M:%S")) - time.mktime(
        time.strptime(started, "%Y-%m-%dT%H:%M:%S")
    ) in range(599, 602)
    pid = record["report"]["vms"][0]["pid"]
    assert Path(f"/proc/{pid}").exists()
    listed = {r["id"]: r for r in api.get(f"{url}/labs").json()}
    assert listed[lab_id]["state"] == "running" and listed[lab_id]["report"]["vms"][0]["address"] == "10.0.0.10"
    stopped = api.delete(f"{url}/labs/{lab_id}")
    assert stopped.status_code == 200 and stopped.json()["state"] == "stopped"
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), "the guest's qemu still runs"
    assert d.cli("sessions", "--json").stdout.strip() == "[]", "the lab's sandbox was not thrown away"
