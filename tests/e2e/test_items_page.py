"""Application item recovery from the admin page, in real headless Chromium against a live appliance: an
operator picks a restore point, sees its applications, lists a PostgreSQL cluster's tables with row counts and
downloads one table's dump (the SQL holds the backed-up rows), finds an OpenLDAP entry and downloads it as LDIF,
downloads one mail as .eml and restores it with the page's restore form into a Maildir under the restore root.
The disk is the item tests' (tests/integration/item_disks.py, built once and cached); the repository is never
changed and nothing is left in STATE/items."""

from __future__ import annotations

import json
import mailbox
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.daemon_process import bootback, tree_hash, web_appliance
from tests.e2e.test_admin_page import CHROMIUM, PASSWORD, browser, log_in, page  # noqa: F401 - fixtures
from tests.integration.item_disks import PG_BIN, build_app_disk

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium"),
    pytest.mark.skipif(not (PG_BIN / "postgres").exists(), reason="needs Debian's postgresql-15"),
]


@pytest.fixture(scope="module")
def appliance(build_cache: Path):
    built = build_app_disk(build_cache)
    # under /var/tmp, 0755: the disposable PostgreSQL runs as 'postgres' and walks down to STATE/items
    base = Path(tempfile.mkdtemp(prefix="bb-items-page-", dir="/var/tmp"))
    base.chmod(0o755)
    repo = base / "repo"
    bootback("init", repo, "--chunk-size", "256K", "--encryption", "none")
    bootback("backup", repo, "--vm", "db01", built / "disk.raw")
    before = tree_hash(repo)
    d, url = web_appliance(repo, base / "state", PASSWORD)
    yield {"url": url, "state": base / "state", "expected": json.loads((built / "expected.json").read_text())}
    d.stop()
    assert tree_hash(repo) == before, "item recovery from the page changed the repository"
    assert not list((base / "state" / "items").iterdir()), "a view, server or download was left in STATE/items"
    shutil.rmtree(base, ignore_errors=True)
    Path(f"{base / 'state'}-daemon.log").unlink(missing_ok=True)


def test_operator_lists_applications_and_downloads_a_table_an_entry_and_a_mail(page, appliance, tmp_path) -> None:  # noqa: F811
    log_in(page, appliance["url"])
    page.locator("tr[data-point^='db01@'] a.items").click()
    page.wait_for_selector("#items")
    rows = {r.get_attribute("data-item"): r.inner_text() for r in page.locator("tr[data-item]").all()}
    assert "15" in rows["postgres:/srv/pg-clean"] and "disk.raw:disk" in rows["postgres:/srv/pg-clean"]
    assert "10.11" in rows["mariadb:/var/lib/mysql"] and "mdb" in rows["openldap:/var/lib/ldap"]
    assert {"maildir:/home/alice/Maildir", "mbox:/var/mail/bob"} <= rows.keys()
    page.shot("items")

    # a PostgreSQL cluster: its tables with exact row counts, and one table's dump
    page.locator("tr[data-item='postgres:/srv/pg-clean'] a.open").click()
    page.wait_for_selector("#tables")
    assert page.locator("tr[data-table='shop.public.orders'] .rows").inner_text() == "1,500"
    assert page.locator("tr[data-table='hr.public.staff'] .rows").inner_text() == "2"
    page.shot("tables")
    password = page.locator("#restore-postgres input[name=password]")  # the 'Restore to server' form
    assert password.get_attribute("type") == "password" and password.get_attribute("autocomplete") == "off"
    with page.expect_download() as info:
        page.locator("tr[data-table='shop.sales.invoices'] a.download").click()
    sql = tmp_path / "invoices.sql"
    info.value.save_as(sql)
    assert info.value.suggested_filename == "shop.sales.invoices.sql"
    dumped = sql.read_text()
    assert "COPY sales.invoices" in dumped and appliance["expected"]["clean"]["shop"]["sales.invoices"] in dumped

    # an OpenLDAP entry found by a filter, as LDIF
    page.go_back()
    page.locator("tr[data-item='openldap:/var/lib/ldap'] a.open").click()
    page.fill("input[name=filter]", "(uid=ann)")
    page.click("form.search button")
    page.wait_for_selector("#entries")
    assert page.locator("tr[data-dn]").all_inner_texts() == [
        "uid=ann,ou=people,dc=example,dc=org\tinetOrgPerson, bbPerson"
    ]
    with page.expect_download() as info:
        page.locator("a.ldif").click()
    ldif = tmp_path / "entries.ldif"
    info.value.save_as(ldif)
    assert "dn: uid=ann,ou=people,dc=example,dc=org" in ldif.read_text() and "bbBadge: B-1001" in ldif.read_text()

    # one mail, searched by subject, as .eml
    page.locator("a", has_text="All applications of this restore point").click()
    page.locator("tr[data-item='maildir:/home/alice/Maildir'] a.open").click()
    page.fill("input[name=subject]", "lunch")
    page.click("form.search button")
    row = page.locator("tr[data-message]")
    assert row.count() == 1 and "dave@example.org" in row.inner_text()
    page.shot("mail")
    with page.expect_download() as info:
        row.locator("a.download").click()
    eml = tmp_path / "message.eml"
    info.value.save_as(eml)
    assert b"Subject: Lunch?" in eml.read_bytes() and b"noon?" in eml.read_bytes()

    # the message found, restored by the form into a Maildir under the restore root (STATE/items-restore)
    page.fill("#restore-mail input[name=restore_to]", "page/Maildir")
    page.click("#restore-mail button")
    page.wait_for_selector("#restored")
    assert page.locator("#restore-result").inner_text().startswith("restored 1 message(s) from /disk/home/alice")
    page.shot("restored")
    restored = mailbox.Maildir(appliance["state"] / "items-restore" / "page" / "Maildir", create=False)
    assert [(m["Subject"], m.get_payload()) for m in restored] == [("Lunch?", "noon?\n")]


def test_a_wrong_choice_on_the_page_is_one_clear_message(page, appliance) -> None:  # noqa: F811
    page.goto(f"{appliance['url']}/items?repository=repo&point=db01")
    assert "/login" in page.url  # the page, like the rest, needs a login
    log_in(page, appliance["url"])
    page.goto(f"{appliance['url']}/items?repository=repo&point=db01&kind=postgres")
    assert "holds 4 applications of kind PostgreSQL data directory" in page.locator(".flash.error").inner_text()
    page.goto(f"{appliance['url']}/items?repository=repo&point=db01&kind=postgres&path=/srv/pg14")
    assert "needs PostgreSQL 14" in page.locator(".flash.error").inner_text()
    page.goto(f"{appliance['url']}/items?repository=repo&point=db01&kind=openldap&filter=uid=ann")
    assert "filter: expected an LDAP filter in parentheses" in page.locator(".flash.error").inner_text()
    page.console_errors.clear()  # those pages' own 400s
    page.shot("errors")
