"""The labs page in real headless Chromium against a live appliance running real labs.

An operator pastes an application group (the lab test guests: db, then app whose page must say it reached
db), verifies it and watches the lab's page fill in by itself: db booting, its checks' result lines, then app,
boot times and screenshots, the verdict. Then a sandbox lab with a TTL is started from the list and stopped.
Screenshots of each step are kept in test-artifacts/lab-page/.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from appliance.lab.guests import DB_ADDRESS
from tests.daemon_process import tree_hash
from tests.integration.lab_web import lab_repository, lab_web_appliance, needs_labs

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
PASSWORD = "lab-page-password"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium"),
    *needs_labs(),
]
SHOP = f"""name: shop
vms:
  - vm: db
    address: {DB_ADDRESS}
    memory_mib: 96
    checks:
      - {{type: console, expect: "bootback-lab: db listening", timeout: 120}}
      - {{type: tcp, port: 5432, timeout: 20}}
      - {{type: screenshot, timeout: 10}}
  - vm: app
    address: 10.0.0.20
    memory_mib: 96
    checks:
      - {{type: console, expect: "app serving http", timeout: 120}}
      - {{type: http, path: /cgi-bin/status, text: "db: reachable", timeout: 60}}
      - {{type: screenshot, timeout: 10}}
"""
IDLE = "name: idle\nvms:\n  - vm: broken\n"  # no checks: up as soon as its qemu runs (nothing to boot)


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory, build_cache: Path):
    base = tmp_path_factory.mktemp("labpage")
    repo = lab_repository(base, build_cache)
    before = tree_hash(repo)
    d, url = lab_web_appliance(repo, base / "state", PASSWORD)
    yield {"url": url, "daemon": d}
    d.stop()
    assert tree_hash(repo) == before


@pytest.fixture
def page(appliance, artifacts_dir: Path):
    shots = artifacts_dir / "lab-page"
    shots.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
        )
        ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1300, "height": 1000})
        pg = ctx.new_page()
        errors: list[str] = []
        pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        pg.shot = lambda name: pg.screenshot(path=str(shots / f"{name}.png"), full_page=True)
        pg.goto(f"{appliance['url']}/")
        pg.fill("input[name=password]", PASSWORD)
        pg.click("button[type=submit]")
        pg.wait_for_selector("header nav")
        yield pg
        browser.close()
    assert not errors, f"browser console errors: {errors}"


def test_operator_verifies_a_group_and_watches_its_live_progress(page, appliance) -> None:
    page.click("header nav a:has-text('Labs')")
    page.wait_for_selector("#lab-groups")
    assert page.locator("#labs .empty").is_visible()

    # a group with a mistake: the page names the field, nothing is saved
    page.fill("#group-text", SHOP.replace("port: 5432", "port: 99999"))
    page.click("#define-group button[type=submit]")
    assert (
        "vm db.checks[1].port: a whole number from 1 to 65535, got 99999" in page.locator(".flash.error").inner_text()
    )
    page.fill("#group-text", SHOP)
    page.click("#define-group button[type=submit]")
    assert "Group shop saved: db → app." in page.locator(".flash.ok").inner_text()
    row = page.locator("tr[data-group=shop]")
    assert DB_ADDRESS in row.inner_text() and "console, tcp, screenshot" in row.inner_text()
    page.shot("1-group-defined")

    started = time.monotonic()
    row.locator("button[value=verification]").click()
    page.wait_for_selector("#lab[data-lab]")
    lab_id = page.locator("#lab").get_attribute("data-lab")
    assert page.locator("#lab").get_attribute("data-live") == "yes"

    # live: db's first check's result line shows up while the lab still runs and app has not started
    db, app = page.locator("article[data-vm=db]"), page.locator("article[data-vm=app]")
    db.locator("li.check").first.wait_for(timeout=150_000)
    assert page.locator("#lab").get_attribute("data-state") == "verifying"
    assert db.locator("li.check").first.inner_text().startswith("console 'bootback-lab: db listening': passed")
    assert app.get_attribute("data-state") in ("waiting", "booting")
    assert "up after" in db.locator(".boot-time").inner_text()
    page.shot("2-db-up-app-waiting")
    page.wait_for_selector("article[data-vm=app] li.check", timeout=150_000)
    page.shot("3-app-checks-arrive")

    page.wait_for_selector("#lab[data-live=no]", timeout=150_000)
    elapsed = time.monotonic() - started
    assert page.locator("#lab").get_attribute("data-state") == "passed", page.locator("#lab").inner_text()
    for vm, types in ((db, ["console", "tcp", "screenshot"]), (app, ["console", "http", "screenshot"])):
        assert vm.get_attribute("data-state") == "passed"
        checks = vm.locator("li.check")
        assert [checks.nth(i).get_attribute("data-type") for i in range(checks.count())] == types
        assert all(checks.nth(i).get_attribute("data-ok") == "yes" for i in range(checks.count()))
        img = vm.locator("img.screenshot")
        img.wait_for()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
        assert img.evaluate("img => img.naturalWidth") >= 640  # the guest's VGA screen, decoded by the browser
    assert "db: reachable" in app.locator("li.check[data-type=http]").inner_text()
    with page.expect_download() as info:
        db.locator("a.console").click()
    assert b"bootback-lab: db listening" in Path(info.value.path()).read_bytes()
    page.shot("4-passed")
    print(f"lab page: verification of shop seen through in {elapsed:.0f} s")

    # the list: the lab with its VMs, addresses and verdict
    page.click("a:has-text('all labs')")
    listed = page.locator(f"tr[data-lab='{lab_id}']")
    assert listed.get_attribute("data-state") == "passed"
    assert f"db {DB_ADDRESS}: passed" in listed.inner_text() and "app 10.0.0.20: passed" in listed.inner_text()


def test_operator_starts_a_sandbox_lab_with_a_ttl_and_stops_it(page, appliance) -> None:
    page.goto(f"{appliance['url']}/labs")
    page.fill("#group-text", IDLE)
    page.click("#define-group button[type=submit]")
    form = page.locator("tr[data-group=idle] form.lab-start")
    form.locator("input[name=ttl]").fill("forever")
    form.locator("button[value=sandbox]").click()
    assert "Could not start idle: ttl: a duration such as" in page.locator(".flash.error").inner_text()
    form = page.locator("tr[data-group=idle] form.lab-start")
    form.locator("input[name=ttl]").fill("2h")
    form.locator("button[value=sandbox]").click()
    page.wait_for_selector("#lab[data-state=running]", timeout=60_000)
    lab_id = page.locator("#lab").get_attribute("data-lab")
    expires = page.locator(".lab-expires").inner_text()
    page.goto(f"{appliance['url']}/labs")
    row = page.locator(f"tr[data-lab='{lab_id}']")
    assert row.get_attribute("data-state") == "running" and expires in row.inner_text()
    assert "broken 10.0.0.10: passed" in row.inner_text()
    page.shot("5-sandbox-running")
    row.locator("button:has-text('Stop')").click()
    assert f"Lab {lab_id} stopped." in page.locator(".flash.ok").inner_text()
    assert page.locator(f"tr[data-lab='{lab_id}']").get_attribute("data-state") == "stopped"
    page.shot("6-sandbox-stopped")
    assert appliance["daemon"].cli("sessions", "--json").stdout.strip() == "[]"
