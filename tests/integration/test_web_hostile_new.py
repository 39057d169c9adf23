"""Item recovery's web routes against a hostile backup: names inside the backed-up servers (a PostgreSQL database
named like a connection string, a MariaDB table named like a mariadb-dump option) must be names, nothing else.
Real PostgreSQL 15 and MariaDB servers, a real backup, a real daemon and its web app."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.daemon_process import bootback
from tests.integration.item_disks import PG_BIN, Cluster, MariaDB, sh
from tests.integration.test_item_recovery import traversable_tmp

pytestmark = pytest.mark.skipif(not (PG_BIN / "postgres").exists(), reason="Debian's postgresql-15 is not installed")

HOSTILE_VERSION = "3"
MANY = 1005  # messages in one Maildir: more than a listing shows
EVIL_TABLE = "--no-data"  # as an option: the whole database, without rows ('--result-file=/x' would write a file)
EVIL_DB = "dbname=hr"  # psql/pg_dump -d read a name with '=' as a connection string: it would open 'hr'


def build_hostile_disk(cache: Path) -> Path:
    out = cache / f"web-hostile-disk-v{HOSTILE_VERSION}"
    if (out / "disk.raw").exists():
        return out
    work = cache / f"web-hostile-disk-v{HOSTILE_VERSION}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    work.chmod(0o755)
    tree = work / "tree"
    cluster = Cluster(work / "pg" / "data", work / "sock")
    cluster.init()
    cluster.start()
    try:
        cluster.psql("postgres", "CREATE DATABASE hr")
        cluster.psql("hr", "CREATE TABLE staff (id int PRIMARY KEY, name text); INSERT INTO staff VALUES (1, 'Ann')")
        cluster.psql("postgres", f'CREATE DATABASE "{EVIL_DB}"')
        cluster.psql(quote(EVIL_DB, safe=""), "CREATE TABLE decoy (id int)")  # in a URL the name is only a name
    finally:
        cluster.stop()
    shutil.copytree(cluster.datadir, tree / "srv/pg", symlinks=True)
    sh("chown", "-R", "postgres:postgres", tree / "srv")
    server = MariaDB(work / "mariadb" / "data", work / "mysock")
    server.init()
    server.start()
    try:
        server.sql(
            f"CREATE DATABASE inv; CREATE TABLE inv.`{EVIL_TABLE}` (id INT); INSERT INTO inv.`{EVIL_TABLE}` VALUES (7);"
            " CREATE TABLE inv.other (id INT); INSERT INTO inv.other VALUES (8)"
        )
        server.stop()
        (tree / "var/lib").mkdir(parents=True, exist_ok=True)
        sh("cp", "-a", server.datadir, tree / "var/lib/mysql")
    finally:
        server.stop()
    for sub in ("new", "cur", "tmp"):
        (tree / "home/many/Maildir" / sub).mkdir(parents=True)
    for i in range(MANY):
        (tree / f"home/many/Maildir/new/{1700000000 + i}.M{i}P1.host").write_text(
            f"From: n{i}@example.org\nSubject: note {i}\nDate: Mon, 2 Mar 2026 10:00:00 +0000\n\nbody {i}\n"
        )
    sh("mkfs.ext4", "-q", "-F", "-d", tree, work / "disk.raw", "160M")
    shutil.rmtree(tree)
    shutil.rmtree(work / "pg")
    shutil.rmtree(work / "mariadb")
    work.rename(out)
    return out


@pytest.fixture(scope="module")
def hostile_api(build_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    import requests

    from tests.daemon_process import web_appliance

    disk = build_hostile_disk(build_cache) / "disk.raw"
    repo = tmp_path_factory.mktemp("hostile") / "repo"
    bootback("init", repo, "--chunk-size", "256K", "--encryption", "none")
    bootback("backup", repo, "--vm", "evil", disk)
    state = traversable_tmp("bb-hostile-web-")  # STATE/items must be reachable by the 'postgres' user
    d, base_url = web_appliance(repo, state, "hostile-password")
    try:
        token = bootback("token", "create", "hostile", "--state", d.state).stdout.strip()
        api = requests.Session()
        api.trust_env = False
        api.verify = str(d.state / "web" / "tls.crt")
        api.headers["Authorization"] = f"Bearer {token}"
        yield api, f"{base_url}/api/v1/repositories/repo/items", base_url
    finally:
        d.stop()
        shutil.rmtree(state, ignore_errors=True)
        Path(f"{state}-daemon.log").unlink(missing_ok=True)


def test_a_postgres_database_named_like_a_connection_string_is_only_a_name(hostile_api: tuple) -> None:
    api, url, _ = hostile_api
    pg = {"point": "evil", "path": "/srv/pg"}
    listed = api.get(f"{url}/postgres/tables", params={**pg, "count": "0"})
    assert listed.status_code == 200, listed.text
    tables = {(t["database"], t["table"]) for t in listed.json()["tables"]}
    assert (EVIL_DB, "decoy") in tables and (EVIL_DB, "staff") not in tables, tables
    got = api.get(f"{url}/postgres/dump", params={**pg, "db": EVIL_DB})
    assert got.status_code == 200, got.text
    assert "CREATE TABLE public.decoy" in got.text and "staff" not in got.text


def test_a_mariadb_table_named_like_a_dump_option_is_only_a_name(hostile_api: tuple) -> None:
    api, url, _ = hostile_api
    my = {"point": "evil", "path": "/var/lib/mysql"}
    got = api.get(f"{url}/mariadb/dump", params={**my, "dump": f"inv.{EVIL_TABLE}"})
    assert got.status_code == 200, got.text
    assert f"CREATE TABLE `{EVIL_TABLE}`" in got.text and f"INSERT INTO `{EVIL_TABLE}` VALUES\n(7)" in got.text
    assert "`other`" not in got.text, "mariadb-dump took a table's name for an option"


def test_a_listing_of_a_huge_mail_store_is_bounded_and_says_so(hostile_api: tuple) -> None:
    """A Maildir of more messages than a listing shows: the API and the page answer the first ones and say how
    many there are (the rest by narrowing the search), not a JSON or a page as large as the store."""
    import re

    import requests

    from web.backup_items import MAX_LISTED

    assert MAX_LISTED < MANY
    api, url, base_url = hostile_api
    where = {"point": "evil", "path": "/home/many/Maildir"}
    got = api.get(f"{url}/mail/messages", params=where).json()
    assert len(got["messages"]) == MAX_LISTED and got["total"] == MANY and got["truncated"] is True
    narrowed = api.get(f"{url}/mail/messages", params={**where, "subject": "note 100"}).json()
    assert narrowed["total"] == len(narrowed["messages"]) == 6 and narrowed["truncated"] is False  # 100, 1000-1004

    browser = requests.Session()
    browser.trust_env = False
    browser.verify = api.verify
    page = browser.get(f"{base_url}/login").text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)[1]
    browser.post(f"{base_url}/login", data={"csrf_token": csrf, "username": "admin", "password": "hostile-password"})
    html = browser.get(f"{base_url}/items", params={"repository": "repo", "kind": "mail", **where}).text
    assert html.count('<tr data-message="') == MAX_LISTED
    assert f"the first {MAX_LISTED} of {MANY}" in html
