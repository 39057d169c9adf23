"""The admin page in real headless Chromium (Debian's), driven by Playwright, against a live appliance.

An operator logs in, starts a sandbox and an instant recovery from restore points, watches a migration
finish, stops sessions and creates an API token. Screenshots of each step are kept in test-artifacts/.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.daemon_process import bootback, tree_hash, web_appliance

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
PASSWORD = "page-test-password"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")]


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("page")
    disk = base / "web01.raw"
    disk.write_bytes(os.urandom(4 << 20))
    repo = base / "repo"
    bootback("init", repo)
    bootback("backup", repo, "--vm", "web01", disk)
    files_disk = _disk_with_files(base)
    bootback("backup", repo, "--vm", "files01", files_disk)
    bootback("backup", repo, "--vm", "two01", files_disk, disk)  # a VM with two disks
    before = tree_hash(repo)
    d, url = web_appliance(repo, base / "state", PASSWORD)
    yield {"url": url, "base": base, "daemon": d}
    d.stop()
    assert tree_hash(repo) == before


NOTES = "quarterly numbers\n" * 1000


def _disk_with_files(base: Path) -> Path:
    """An MBR disk with one ext4 partition holding docs/notes.txt, made by the real tools."""
    tree = base / "tree"
    (tree / "docs").mkdir(parents=True)
    (tree / "docs" / "notes.txt").write_text(NOTES)
    part, disk = base / "part.img", base / "files01.raw"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(part), "16M"], check=True)
    with open(disk, "wb") as f:
        f.truncate(20 << 20)
    subprocess.run(["sfdisk", "-q", str(disk)], input=b"start=2048, type=83\n", check=True)
    subprocess.run(["dd", f"if={part}", f"of={disk}", "bs=512", "seek=2048", "conv=notrunc", "status=none"], check=True)
    return disk


@pytest.fixture(scope="module")
def browser():
    # Playwright gives each launch a fresh profile; the flags keep Chromium off the (closed) network.
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield b
        b.close()


@pytest.fixture
def page(browser, appliance, artifacts_dir: Path, request: pytest.FixtureRequest):
    shots = artifacts_dir / "admin-page"
    shots.mkdir(exist_ok=True)
    ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.console_errors = errors
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.shot = lambda name: pg.screenshot(path=str(shots / f"{request.node.name}-{name}.png"), full_page=True)
    yield pg
    ctx.close()
    assert not errors, f"browser console errors: {errors}"


def log_in(page, url: str) -> None:
    page.goto(f"{url}/")
    assert "/login" in page.url
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("#sessions")


def test_login_refuses_a_wrong_password(page, appliance) -> None:
    page.goto(f"{appliance['url']}/login")
    page.fill("input[name=password]", "not the password")
    page.click("button[type=submit]")
    assert page.locator(".flash.error").inner_text() == "Wrong user name or password."
    assert page.console_errors == ["Failed to load resource: the server responded with a status of 401 (UNAUTHORIZED)"]
    page.console_errors.clear()
    page.shot("wrong-password")
    page.goto(f"{appliance['url']}/")
    assert "/login" in page.url


def test_operator_publishes_migrates_and_stops(page, appliance) -> None:
    url = appliance["url"]
    log_in(page, url)
    page.shot("1-dashboard")
    assert page.locator("#sessions .empty").is_visible()
    point_row = page.locator("tr[data-point^='web01@']").first
    assert point_row.is_visible()

    # a sandbox from the restore point: listed with its folder and a cache bar
    point_row.locator("button[value=sandbox]").click()
    page.wait_for_selector(".flash.ok")
    assert "Sandbox session" in page.locator(".flash.ok").inner_text()
    sandbox = page.locator("tr[data-session]").filter(has_text="sandbox")
    assert sandbox.count() == 1
    assert re.search(r"/bootback/web01-sandbox-\w+", sandbox.inner_text())
    assert sandbox.locator(".cache meter").is_visible()
    page.shot("2-sandbox-started")

    # an instant recovery, migrated out with live progress
    page.locator("tr[data-point^='web01@']").first.locator("button[value=instant]").click()
    page.wait_for_selector(".flash.ok")
    instant = page.locator("tr[data-session]").filter(has_text="instant")
    target = appliance["base"] / "migrated"
    instant.locator("input[name=output]").fill(str(target))
    instant.locator("button", has_text="Migrate").click()
    page.wait_for_selector(".flash.ok")
    instant = page.locator("tr[data-session]").filter(has_text="instant")
    instant.locator(".migration-text", has_text="done").wait_for(timeout=30_000)
    assert instant.locator("progress").get_attribute("value") in ("100", "100.0")
    assert any(p.stat().st_size == 4 << 20 for p in target.iterdir())
    page.shot("3-migrated")

    # stop both; the page lists none again
    for kind in ("sandbox", "instant"):
        row = page.locator("tr[data-session]").filter(has_text=kind)
        row.locator("button", has_text="Stop").click()
        page.wait_for_selector(".flash.ok")
        assert "stopped" in page.locator(".flash.ok").inner_text()
    assert page.locator("tr[data-session]").count() == 0
    page.shot("4-stopped")
    assert appliance["daemon"].cli("sessions", "--json").stdout.strip() == "[]"


def test_operator_creates_an_api_token_shown_once(page, appliance) -> None:
    log_in(page, appliance["url"])
    page.fill("#tokens input[name=name]", "monitoring")
    page.click("#tokens button[type=submit]:has-text('Create token')")
    token = re.search(r"bbt_[\w-]+", page.locator(".flash.token").inner_text())[0]
    page.shot("token")
    page.reload()
    assert token not in page.content()
    assert page.locator("#tokens td", has_text="monitoring").count() == 1


def test_publish_error_is_shown_clearly(page, appliance) -> None:
    log_in(page, appliance["url"])
    # a restore point vanishes between page load and click: the form names a point that does not exist
    page.locator("tr[data-point^='web01@'] input[name=point]").first.evaluate("e => e.value = 'gone-point'")
    page.locator("tr[data-point^='web01@'] button[value=sandbox]").first.click()
    msg = page.locator(".flash.error").inner_text()
    assert msg.startswith("Could not publish web01") and "gone-point" in msg
    page.shot("publish-error")


def test_operator_browses_a_backup_and_downloads_a_file(page, appliance, tmp_path: Path) -> None:
    log_in(page, appliance["url"])
    page.locator("tr[data-point^='files01@'] a.browse").click()
    page.wait_for_selector("#files")
    assert "ext" in page.locator("tr[data-entry=p1]").inner_text()  # the partition and its filesystem
    page.locator("tr[data-entry=p1] a").first.click()
    page.locator("tr[data-entry=docs] a").first.click()
    row = page.locator("tr[data-entry='notes.txt']")
    assert row.locator("td").nth(1).inner_text() == "file"
    page.shot("files")
    with page.expect_download() as info:
        row.locator("a.download").click()
    saved = tmp_path / "notes.txt"
    info.value.save_as(saved)
    assert info.value.suggested_filename == "notes.txt" and saved.read_text() == NOTES

    # a path that is not there: a clear message on the page, not a stack trace
    assert "docs" in page.url
    page.goto(re.sub(r"path=[^&]*", "path=/p1/nope", page.url))
    assert "no such file or directory: /p1/nope" in page.locator(".flash.error").inner_text()
    page.console_errors.clear()  # the 404 of that page itself
    page.shot("files-error")


def test_operator_verifies_a_backup_and_sees_the_result_arrive(page, appliance) -> None:
    """web01's disk is random bytes: it cannot boot, and the page must say so once the job ends (the page
    polls and reloads itself; the operator does nothing)."""
    log_in(page, appliance["url"])
    row = page.locator("tr[data-point^='web01@']").first
    row.locator("input[name=expect]").fill("login:")
    row.locator("button", has_text="Verify boot").click()
    page.wait_for_selector(".flash.ok")
    assert "Verification of web01@" in page.locator(".flash.ok").inner_text()
    job = page.locator("tr[data-verification]").first
    assert job.get_attribute("data-state") in ("running", "failed")
    page.locator("tr[data-verification][data-state=failed]").first.wait_for(timeout=120_000)
    result = page.locator("tr[data-verification]").first
    assert "NOT verified" in result.inner_text()
    result.locator("summary").click()
    assert "login:" in result.locator("summary").inner_text()
    page.shot("verification")
    assert appliance["daemon"].cli("sessions", "--json").stdout.strip() == "[]", "the sandbox was not thrown away"


def test_browsing_a_vm_with_two_disks_asks_for_the_disk_first(page, appliance) -> None:
    log_in(page, appliance["url"])
    page.locator("tr[data-point^='two01@'] a.browse").click()
    page.wait_for_selector("ul.disks")
    assert page.locator("ul.disks a").all_inner_texts() == ["files01.raw", "web01.raw"]
    page.locator("ul.disks a", has_text="files01.raw").click()
    page.locator("tr[data-entry=p1] a").first.click()
    assert page.locator("tr[data-entry=docs]").is_visible()
    page.go_back()
    page.go_back()
    page.locator("ul.disks a", has_text="web01.raw").click()
    # random bytes: the whole disk is shown as one volume without a filesystem, and opening it says why
    assert "no readable filesystem" in page.locator("tr[data-entry=disk]").inner_text()
    page.locator("tr[data-entry=disk] a").first.click()
    assert "holds no filesystem bootback can read" in page.locator(".flash.error").inner_text()
    page.console_errors.clear()  # that page's own 400
    page.shot("two-disks")


def test_open_nfs_banner_and_a_logout_that_ends_the_login(page, browser, appliance) -> None:
    """The appliance serves every address by default: every admin page says so. Logging out ends the login
    on the server: a copy of the cookie taken before (another browser, a stolen cookie) no longer works."""
    url = appliance["url"]
    log_in(page, url)
    assert "NFS is open to every address" in page.locator("#nfs-open-warning").inner_text()
    page.locator("tr[data-point^='files01@'] a.browse").click()
    page.wait_for_selector("#files")
    assert page.locator("#nfs-open-warning").is_visible()
    page.shot("banner")
    kept = page.context.cookies()
    assert any(c["name"] == "bootback_session" for c in kept)
    page.click("header .logout button")
    page.wait_for_url("**/login")
    assert page.locator("#nfs-open-warning").count() == 0  # not shown to whoever is not logged in
    other = browser.new_context(ignore_https_errors=True)
    try:
        other.add_cookies(kept)
        replay = other.new_page()
        replay.goto(f"{url}/")
        assert "/login" in replay.url
        assert replay.request.get(f"{url}/api/v1/sessions").status == 401
    finally:
        other.close()
