"""Application item recovery with real servers: a disk holding real PostgreSQL 15 clusters (one copied while the
server ran, one after a clean stop), a Maildir and an mbox, backed up with ``bootback backup``; then listed,
dumped and restored into a fresh PostgreSQL of Debian's, compared row for row, and the repository unchanged."""

from __future__ import annotations

import email
import json
import mailbox
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.errors import ItemRecoveryError
from tests.daemon_process import bootback, tree_hash
from tests.integration.item_disks import (
    LDAP_LDIF,
    MAILDIR_MESSAGES,
    MBOX_MESSAGES,
    PG_BIN,
    Cluster,
    MariaDB,
    Slapd,
    build_app_disk,
    sh,
)
from tests.integration.item_space import small_reserve  # noqa: F401 (autouse: a reserve this machine has)

pytestmark = pytest.mark.skipif(not (PG_BIN / "postgres").exists(), reason="Debian's postgresql-15 is not installed")


def traversable_tmp(prefix: str) -> Path:
    """Under /var/tmp with mode 0755: the 'postgres' user walks down to its data (pytest's tmp is 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def apps(build_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    built = build_app_disk(build_cache)
    base = tmp_path_factory.mktemp("items")
    repo = base / "repo"
    bootback("init", repo, "--chunk-size", "256K", "--encryption", "none")
    bootback("backup", repo, "--vm", "db01", built / "disk.raw")
    plain = base / "plain"
    (plain / "etc").mkdir(parents=True)
    (plain / "etc/hostname").write_text("web01\n")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", plain, base / "web.raw", "8M"], check=True, capture_output=True)
    bootback("backup", repo, "--vm", "web01", base / "web.raw")
    dots = traversable_tmp("bb-dots-")
    try:
        bootback("backup", repo, "--vm", "dots01", dotted_database_disk(dots))
    finally:
        shutil.rmtree(dots, ignore_errors=True)  # 150 MB a run, once left in /var/tmp by every run
    return {"repo": repo, "expected": json.loads((built / "expected.json").read_text()), "hash": tree_hash(repo)}


DOTTED = "shop.public.orders"


def dotted_database_disk(base: Path) -> Path:
    """A disk, made in BASE, whose PostgreSQL 15 cluster (/srv/pg) holds a database named 'shop.public.orders'
    (table marker) beside a database 'shop' with a table public.orders: the dotted name must never be read as that
    table."""
    cluster = Cluster(base / "pg" / "data", base / "sock")
    cluster.init()
    cluster.start()
    try:
        cluster.psql("postgres", f'CREATE DATABASE "{DOTTED}"')
        cluster.psql("postgres", "CREATE DATABASE shop")
        cluster.psql(
            DOTTED, "CREATE TABLE marker (id int PRIMARY KEY, what text); INSERT INTO marker VALUES (1, 'whole')"
        )
        cluster.psql(
            "shop", "CREATE TABLE orders (id int PRIMARY KEY, what text); INSERT INTO orders VALUES (7, 'table')"
        )
    finally:
        cluster.stop()
    shutil.copytree(cluster.datadir, base / "tree/srv/pg", symlinks=True)
    sh("mkfs.ext4", "-q", "-F", "-d", base / "tree", base / "dots.raw", "128M")
    return base / "dots.raw"


@pytest.fixture(scope="session")
def work() -> Iterator[Path]:
    from appliance.items.cowview import sweep

    path = traversable_tmp("bb-items-")
    yield path
    sweep(path)  # what a failed test's killed command left (server, mounts) goes before the directory
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def target_pg() -> Iterator[Cluster]:
    """A fresh, running PostgreSQL 15 to restore into (Unix socket only)."""
    base = traversable_tmp("bb-target-")
    cluster = Cluster(base / "pg" / "data", base / "sock")
    cluster.init()
    cluster.start()
    yield cluster
    cluster.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def target_mariadb() -> Iterator[MariaDB]:
    """A fresh, running MariaDB to restore into (Unix socket only)."""
    base = traversable_tmp("bb-mtarget-")
    server = MariaDB(base / "data", base / "sock")
    server.init()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def target_slapd() -> Iterator[Slapd]:
    """A fresh, running slapd with an empty dc=example,dc=org to restore into (ldapi socket only)."""
    base = traversable_tmp("bb-ltarget-")
    server = Slapd(base)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


def items(apps: dict, work: Path, *args: str | Path, ok: bool = True):  # noqa: ANN201
    return bootback("items", apps["repo"], "db01", *args, "--work-dir", work, ok=ok)


def fresh_db(cluster: Cluster, name: str) -> str:
    cluster.psql("postgres", f"DROP DATABASE IF EXISTS {name}")
    cluster.psql("postgres", f"CREATE DATABASE {name}")
    return cluster.url_for(name)


def test_discovery_lists_every_application(apps: dict, work: Path) -> None:
    found = json.loads(items(apps, work, "--json").stdout)
    assert [(i["kind"], i["volume"], i["path"], i["version"]) for i in found] == [
        ("maildir", "disk", "/home/alice/Maildir", "-"),
        ("postgres", "disk", "/srv/pg-clean", "15"),
        ("postgres", "disk", "/srv/pg-damaged", "15"),
        ("postgres", "disk", "/srv/pg14", "14"),
        ("openldap", "disk", "/var/lib/ldap", "mdb"),
        ("mariadb", "disk", "/var/lib/mysql", "10.11.19-MariaDB"),
        ("postgres", "disk", "/var/lib/postgresql/15/main", "15"),
        ("mbox", "disk", "/var/mail/bob", "-"),
    ]
    text = items(apps, work).stdout
    assert "postgres  disk.raw:disk   15         /var/lib/postgresql/15/main" in text
    none = bootback("items", apps["repo"], "web01", "--work-dir", work)
    assert none.stdout.strip() == "no applications found"


def _counts(expected: dict) -> dict:
    return {
        (db, t if "." in t else f"public.{t}"): rows.count("\n")
        for db, ts in expected.items()
        for t, rows in ts.items()
    }


def test_postgres_lists_tables_with_row_counts_after_crash_recovery(apps: dict, work: Path) -> None:
    listed = json.loads(
        items(apps, work, "postgres", "--path", "/var/lib/postgresql/15/main", "--list", "--json").stdout
    )
    got = {(t["database"], f"{t['schema']}.{t['table']}"): t["rows"] for t in listed}
    # the crash copy's last table and updates exist only because recovery replayed the WAL
    assert got == _counts(apps["expected"]["crash"]) and ("shop", "public.late_orders") in got
    # catalogs only: the clean copy's tables (no late_orders), no row counted
    text = items(apps, work, "postgres", "--path", "/srv/pg-clean", "--list", "--db", "shop", "--no-count").stdout
    assert text.splitlines() == [
        f"shop             {name:32} {'-':>12} rows"
        for (db, name), _ in sorted(_counts(apps["expected"]["clean"]).items())
        if db == "shop"
    ]


def test_tables_restored_into_a_fresh_server_have_exactly_the_rows(apps: dict, work: Path, target_pg: Cluster) -> None:
    crash = apps["expected"]["crash"]["shop"]
    url = fresh_db(target_pg, "restored")
    path = "/var/lib/postgresql/15/main"
    tables = ("customers", "late_orders", "sales.invoices")
    p = items(
        apps, work, "postgres", "--path", path, *[a for t in tables for a in ("--dump", f"shop.{t}")], "--to", url
    )
    assert "restored shop.public.customers, shop.public.late_orders, shop.sales.invoices from db01@" in p.stdout
    for table in tables:
        assert target_pg.rows("restored", table) == crash[table], table
    # under another name, beside the original (its primary key and sequence renamed with it)
    items(apps, work, "postgres", "--path", path, "--dump", "shop.sales.invoices", "--as", "invoices_old", "--to", url)
    assert target_pg.rows("restored", "sales.invoices_old") == crash["sales.invoices"]
    assert target_pg.psql("restored", "SELECT count(*) FROM pg_class WHERE relname LIKE 'invoices_old%'") == "3\n"
    # a new table, then one the target has: the restore fails as a whole, the new table is not left behind
    again = items(
        apps,
        work,
        "postgres",
        "--path",
        path,
        "--dump",
        "shop.orders",
        "--dump",
        "shop.sales.invoices",
        "--to",
        url,
        ok=False,
    )
    assert again.returncode == 62 and "nothing was changed" in again.stderr and "already exists" in again.stderr
    assert target_pg.psql("restored", "SELECT to_regclass('public.orders') IS NULL") == "t\n"
    assert target_pg.rows("restored", "customers") == crash["customers"]


def test_a_database_dump_to_a_file_restores_exactly(apps: dict, work: Path, target_pg: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "shop.sql"
    p = items(apps, work, "postgres", "--path", "/srv/pg-clean", "--db", "shop", "--dump", "-o", out)
    assert "dumped database shop from db01@" in p.stdout and out.read_text().startswith(
        "--\n-- PostgreSQL database dump"
    )
    fresh_db(target_pg, "fromfile")
    sh(PG_BIN / "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", target_pg.url_for("fromfile"), "-f", out)
    for table, rows in apps["expected"]["clean"]["shop"].items():
        assert target_pg.rows("fromfile", table) == rows, table
    assert not list(tmp_path.glob(".*partial*")), "a temporary file was left beside the output"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--path", "/srv/pg14", "--db", "shop", "--dump", "-o"), "needs PostgreSQL 14, whose server is not installed"),
        (
            ("--path", "/srv/pg-damaged", "--db", "shop", "--dump", "--to"),
            "PostgreSQL could not start on the copy of /disk/srv/pg-damaged: FATAL: incorrect checksum in control file",
        ),
        (
            ("--path", "/srv/pg-clean", "--dump", "shop.late_orders", "--to"),
            "no table 'late_orders' in database 'shop'",
        ),
        (
            ("--list",),
            "holds 4 applications of kind PostgreSQL data directory: choose one with --path (/disk/srv/pg-clean, ",
        ),
        (("--path", "/nowhere", "--list"), "no PostgreSQL data directory at /nowhere in db01@"),
    ],
)
def test_bad_input_is_one_clear_line_and_nothing_is_written(
    apps: dict, work: Path, target_pg: Cluster, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    url = fresh_db(target_pg, "untouched")
    out = tmp_path / "out.sql"
    extra = {"-o": (out,), "--to": (url,)}.get(args[-1], ())
    p = items(apps, work, "postgres", *args, *extra, ok=False)
    assert p.returncode == 62 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not out.exists()
    assert (
        target_pg.psql("untouched", "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace")
        == "0\n"
    )


def test_mariadb_tables_listed_and_restored_exactly(apps: dict, work: Path, target_mariadb: MariaDB) -> None:
    expected = apps["expected"]["mariadb"]["inventory"]
    listed = json.loads(items(apps, work, "mariadb", "--list", "--json").stdout)
    assert {(t["database"], t["table"]): t["rows"] for t in listed} == {
        ("inventory", t): rows.count("\n") for t, rows in expected.items()
    }
    target_mariadb.sql("DROP DATABASE IF EXISTS restored; CREATE DATABASE restored")
    url = target_mariadb.url("restored")
    p = items(apps, work, "mariadb", "--dump", "inventory.items", "--dump", "inventory.moves", "--to", url)
    assert "restored inventory.items, inventory.moves from db01@" in p.stdout
    for table, rows in expected.items():
        assert target_mariadb.rows("restored", table) == rows, table
    # again: the target has those tables now, and a MariaDB dump cannot be rolled back: refused up front
    target_mariadb.sql("DELETE FROM moves", "restored")
    again = items(apps, work, "mariadb", "--dump", "inventory.moves", "--to", url, ok=False)
    assert again.returncode == 62 and "already has table(s) moves: nothing was restored" in again.stderr
    assert target_mariadb.rows("restored", "moves") == ""
    bad = items(apps, work, "mariadb", "--dump", "inventory.nope", "--to", url, ok=False)
    assert bad.returncode == 62 and "no table 'nope' in database 'inventory'" in bad.stderr


def _user_attributes(ldif: str) -> dict[str, set[str]]:
    """dn -> its 'attr: value' lines without operational attributes, for comparing entries exactly."""
    out = {}
    for record in ldif.strip().split("\n\n"):
        lines = record.splitlines()
        attrs = {
            ln
            for ln in lines[1:]
            if ln.split(":")[0].lower()
            not in {
                "structuralobjectclass",
                "entryuuid",
                "entrycsn",
                "creatorsname",
                "createtimestamp",
                "modifiersname",
                "modifytimestamp",
            }
        }
        out[lines[0]] = attrs
    return out


def test_ldap_entries_searched_exported_and_restored_exactly(
    apps: dict, work: Path, target_slapd: Slapd, tmp_path: Path
) -> None:
    source = _user_attributes(LDAP_LDIF)
    listed = json.loads(items(apps, work, "openldap", "--json").stdout)
    assert [e["dn"] for e in listed] == [dn[4:] for dn in source]
    # the VM's own schema (bbBadge, case-insensitive match) is what the filter is evaluated with
    hit = json.loads(items(apps, work, "openldap", "--filter", "(bbBadge=b-1001)", "--json").stdout)
    assert hit == [{"dn": "uid=ann,ou=people,dc=example,dc=org", "objectClass": ["inetOrgPerson", "bbPerson"]}]
    out = tmp_path / "people.ldif"
    items(apps, work, "openldap", "--filter", "(objectClass=inetOrgPerson)", "--export", "-o", out)
    exported = _user_attributes(out.read_text())
    assert exported == {dn: a for dn, a in source.items() if "uid=" in dn}

    flt = "(|(objectClass=organization)(objectClass=organizationalUnit)(uid=bo))"
    args = (
        "--to",
        target_slapd.uri,
        "--bind-dn",
        "cn=admin,dc=example,dc=org",
        "--password-file",
        target_slapd.password,
    )
    p = items(apps, work, "openldap", "--filter", flt, *args)
    assert "restored 3 entries" in p.stdout
    restored = _user_attributes(target_slapd.search("(objectClass=*)").stdout)
    assert restored == {dn: a for dn, a in source.items() if "uid=ann" not in dn and "cn=admins" not in dn}
    # ann is new (and first), bo exists now: refused as a whole, ann not added either
    again = items(apps, work, "openldap", "--filter", "(|(uid=bo)(uid=ann))", *args, ok=False)
    assert again.returncode == 62 and "the target already has 'uid=bo,ou=people,dc=example,dc=org'" in again.stderr
    assert target_slapd.search("(uid=ann)").stdout == "", "an entry was added although the restore was refused"


def mail_json(apps: dict, work: Path, kind: str, *args: str) -> list[dict]:
    return json.loads(items(apps, work, kind, *args, "--list", "--json").stdout)


def test_mail_is_listed_and_searched_by_folder_sender_subject_and_date(apps: dict, work: Path) -> None:
    listed = mail_json(apps, work, "maildir")
    assert [(m["folder"], m["from"], m["subject"], m["date"][:10]) for m in listed] == [
        (folder, sender, subject, f"2026-03-{day:02}")
        for folder, sender, subject, day, _ in sorted(MAILDIR_MESSAGES, key=lambda m: (m[0] != "INBOX", m[0], m[3]))
    ]
    found = mail_json(apps, work, "maildir", "--from", "CAROL", "--subject", "report", "--since", "2026-03-05")
    assert [m["subject"] for m in found] == ["Re: Quarterly report"]
    bob = mail_json(apps, work, "mail", "--path", "/var/mail/bob", "--until", "2026-03-03")
    assert [(m["id"], m["folder"], m["subject"]) for m in bob] == [("bob/0", "bob", "Server alert")]


def test_mail_exports_as_mbox_and_eml_and_restores_into_a_maildir(apps: dict, work: Path, tmp_path: Path) -> None:
    out = tmp_path / "carol.mbox"
    items(apps, work, "maildir", "--from", "carol", "--export", "-o", out)
    exported = mailbox.mbox(out)
    bodies = {m["Subject"]: m.get_payload() for m in exported}
    assert bodies == {s: b for _, f, s, _, b in MAILDIR_MESSAGES if f.startswith("carol")}

    lab = tmp_path / "lab.eml"
    items(apps, work, "mail", "--path", "/var/mail/bob", "--id", "bob/1", "--export", "--format", "eml", "-o", lab)
    msg = email.message_from_bytes(lab.read_bytes())
    # its bytes as the mbox holds them: the writer escaped the body's 'From ' line (mboxo), nothing else changed
    assert msg["Subject"] == "From the lab" and msg.get_payload() == ">" + MBOX_MESSAGES[1][3]

    dest = tmp_path / "Maildir"
    p = items(apps, work, "maildir", "--folder", "Archive", "--restore-to", dest, "--into-folder", "Recovered")
    assert "restored 1 message(s)" in p.stdout
    restored = mailbox.Maildir(dest).get_folder("Recovered")
    assert [(m["From"], m["Subject"], m.get_payload()) for m in restored] == [
        (sender, subject, body) for folder, sender, subject, _, body in MAILDIR_MESSAGES if folder == "Archive"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("maildir", "--id", "INBOX/nope", "--export"), "no message 'INBOX/nope' in this mail store"),
        (("maildir", "--from", "carol", "--export", "--format", "eml"), "an .eml file holds one message; 2 match"),
        (("maildir", "--restore-to", "NOTMAILDIR"), "exists and is not a Maildir"),
        (("mail", "--since", "March", "--export"), "--since expects a date like 2026-03-01, got 'March'"),
    ],
)
def test_bad_mail_requests_write_nothing(
    apps: dict, work: Path, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    out = tmp_path / "out.mbox"
    notmaildir = tmp_path / "NOTMAILDIR"
    notmaildir.mkdir()
    args = tuple(str(notmaildir) if a == "NOTMAILDIR" else a for a in args)
    extra = ("-o", out) if "--export" in args else ()
    path = ("--path", "/home/alice/Maildir") if args[0] == "mail" else ()
    p = items(apps, work, *args, *path, *extra, ok=False)
    assert p.returncode == 62 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not out.exists() and list(notmaildir.iterdir()) == []


def test_the_api_lists_applications_and_tables_and_downloads_a_dump(apps: dict, target_pg: Cluster) -> None:
    import requests

    from tests.daemon_process import web_appliance

    state = traversable_tmp("bb-items-web-")  # STATE/items must be reachable by the 'postgres' user
    d, base_url = web_appliance(apps["repo"], state, "items-api-password")
    try:
        token = bootback("token", "create", "items", "--state", d.state).stdout.strip()
        api = requests.Session()
        api.trust_env = False
        api.verify = str(d.state / "web" / "tls.crt")
        url = f"{base_url}/api/v1/repositories/repo/items"
        assert api.get(url, params={"point": "db01"}).status_code == 401
        api.headers["Authorization"] = f"Bearer {token}"

        found = api.get(url, params={"point": "db01"}).json()
        assert found["point"].startswith("db01@")
        assert {"kind": "postgres", "disk": "disk.raw", "volume": "disk", "path": "/srv/pg-clean", "version": "15"} in (
            found["items"]
        )
        pg = {"point": "db01", "path": "/srv/pg-clean"}
        tables = api.get(f"{url}/postgres/tables", params={**pg, "db": "hr"}).json()["tables"]
        assert tables == [{"database": "hr", "schema": "public", "table": "staff", "rows": 2}]
        got = api.get(f"{url}/postgres/dump", params={**pg, "dump": "shop.sales.invoices"})
        assert got.status_code == 200 and "shop.sales.invoices.sql" in got.headers["Content-Disposition"]
        fresh_db(target_pg, "fromapi")
        sh(
            PG_BIN / "psql",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            target_pg.url_for("fromapi"),
            "-f",
            "-",
            input=got.text,
        )
        assert target_pg.rows("fromapi", "sales.invoices") == apps["expected"]["clean"]["shop"]["sales.invoices"]

        for params, status, message in [
            (
                {**pg, "dump": "nope.orders"},
                400,
                "no database 'nope' in /disk/srv/pg-clean (databases: hr, postgres, shop)",
            ),
            ({"point": "db01", "path": "/srv/pg14", "db": "shop"}, 400, "needs PostgreSQL 14"),
            ({"point": "db01", "db": "shop"}, 400, "choose one with --path"),
            ({"point": "../x", "db": "shop"}, 400, "point:"),
        ]:
            r = api.get(f"{url}/postgres/dump", params=params)
            assert r.status_code == status and message in r.json()["error"]["message"], (params, r.text)
        dotted = api.get(f"{url}/postgres/dump", params={"point": "dots01", "db": DOTTED})
        assert dotted.status_code == 200 and f"{DOTTED}.sql" in dotted.headers["Content-Disposition"]
        assert "1\twhole" in dotted.text and "7\ttable" not in dotted.text
        one = api.get(f"{url}/postgres/dump", params={"point": "dots01", "db": DOTTED, "dump": "public.marker"})
        assert one.status_code == 200 and f"{DOTTED}.public.marker.sql" in one.headers["Content-Disposition"]
        assert "1\twhole" in one.text and "7\ttable" not in one.text
        _api_parity(api, url, apps)
        assert not list((state / "items").iterdir()), "a download or view was left in STATE/items"
    finally:
        d.stop()
        shutil.rmtree(state, ignore_errors=True)
        Path(f"{state}-daemon.log").unlink(missing_ok=True)


def _api_parity(api, url: str, apps: dict) -> None:  # noqa: ANN001
    """The CLI's listings and downloads through the API: databases, MariaDB tables and dumps, LDAP search and
    LDIF export, mail search and .eml/mbox export; each bad field is one error naming it."""
    pg = {"point": "db01", "path": "/srv/pg-clean"}
    assert api.get(f"{url}/postgres/databases", params=pg).json()["databases"] == ["hr", "postgres", "shop"]
    uncounted = api.get(f"{url}/postgres/tables", params={**pg, "db": "hr", "count": "0"}).json()["tables"]
    assert uncounted == [{"database": "hr", "schema": "public", "table": "staff", "rows": None}]
    two = api.get(f"{url}/postgres/dump", params={**pg, "dump": ["shop.customers", "shop.sales.invoices"]})
    assert two.status_code == 200 and "COPY public.customers" in two.text and "COPY sales.invoices" in two.text
    assert apps["expected"]["clean"]["shop"]["sales.invoices"] in two.text

    assert api.get(f"{url}/mariadb/databases", params={"point": "db01"}).json()["databases"] == ["inventory"]
    mtables = api.get(f"{url}/mariadb/tables", params={"point": "db01", "db": "inventory"}).json()["tables"]
    assert {(t["table"], t["rows"]) for t in mtables} == {
        (t, rows.count("\n")) for t, rows in apps["expected"]["mariadb"]["inventory"].items()
    }
    mdump = api.get(f"{url}/mariadb/dump", params={"point": "db01", "dump": "inventory.moves"})
    assert mdump.status_code == 200 and "INSERT INTO `moves`" in mdump.text and "`items`" not in mdump.text

    ldap = api.get(f"{url}/openldap/entries", params={"point": "db01", "filter": "(objectClass=inetOrgPerson)"})
    assert [e["dn"] for e in ldap.json()["entries"]] == [
        "uid=ann,ou=people,dc=example,dc=org",
        "uid=bo,ou=people,dc=example,dc=org",
    ]
    ldif = api.get(f"{url}/openldap/export", params={"point": "db01", "filter": "(uid=bo)"})
    assert ldif.status_code == 200 and ldif.text.startswith("dn: uid=bo,ou=people,dc=example,dc=org\n")

    box = {"point": "db01", "path": "/home/alice/Maildir"}
    found = api.get(f"{url}/mail/messages", params={**box, "from": "carol", "since": "2026-03-03"}).json()
    assert [m["subject"] for m in found["messages"]] == ["Re: Quarterly report"]
    eml = api.get(f"{url}/mail/export", params={**box, "id": found["messages"][0]["id"], "format": "eml"})
    assert eml.status_code == 200 and eml.content.startswith(b"From: carol@example.org")
    mbox = api.get(f"{url}/mail/export", params={"point": "db01", "path": "/var/mail/bob"})
    assert mbox.status_code == 200 and mbox.text.count("\nSubject: ") == 2

    for route, params, message in [
        ("postgres/tables", {**pg, "count": "yes"}, "count: expected 1 (count rows) or 0"),
        ("postgres/dump", pg, "dump: expected 1 to 64 of DB"),
        ("mariadb/dump", {"point": "db01", "dump": "shop\nx"}, "dump: expected DB.TABLE or DB.SCHEMA.TABLE"),
        ("postgres/dump", {**pg, "dump": "shop"}, "dump: expected DB.TABLE or DB.SCHEMA.TABLE (a whole database: db"),
        ("postgres/dump", {**pg, "db": "shop", "dump": "shop.orders"}, "no table 'shop.orders' in database 'shop'"),
        ("openldap/entries", {"point": "db01", "filter": "uid=ann"}, "filter: expected an LDAP filter"),
        ("mail/messages", {**box, "since": "March"}, "since: expected a day such as 2026-03-01, got 'March'"),
        ("mail/messages", {**box, "subject": "a\x01"}, "subject: expected 1 to 200 printable characters"),
        ("mail/export", {**box, "format": "zip"}, "format: expected mbox or eml, got 'zip'"),
        ("mail/export", {**box, "format": "eml"}, "an .eml file holds one message; 4 match"),
        ("mail/messages", {"point": "db01", "path": "relative"}, "path: expected an absolute path"),
    ]:
        r = api.get(f"{url}/{route}", params=params)
        assert r.status_code == 400 and message in r.json()["error"]["message"], (route, params, r.text)


@pytest.mark.parametrize("mode", ["fuse", "copy"])
def test_the_copy_on_write_view_is_private_writable_and_leaves_nothing(apps: dict, work: Path, mode: str) -> None:
    """Both ways of making a view (FUSE + overlayfs, and the copy used where mounting is not allowed)."""
    from appliance.items.cowview import CowView
    from appliance.items.service import Target

    target = Target.resolve(apps["repo"], "db01")
    root = "/disk/home/alice/Maildir"
    with CowView(target.repo, target.point, "disk.raw", root, work, (os.geteuid(), os.getegid()), mode=mode) as data:
        names = sorted(p.name for p in (data / "new").iterdir())
        assert len(names) == 3 and not any("evil" in n for n in names), names  # links out of the view are not there
        assert list((data / "cur").iterdir()) == []
        first = data / "new" / names[0]
        assert b"Subject: Quarterly report" in first.read_bytes()
        first.write_bytes(b"changed on the copy")
        assert first.read_bytes() == b"changed on the copy"
    assert os.listdir(work) == []
    with pytest.raises(ItemRecoveryError, match=r"holds [\d,]+ bytes, more than the copy limit of 100"):
        CowView(target.repo, target.point, "disk.raw", root, work, (0, 0), mode="copy", copy_limit=100).__enter__()
    assert os.listdir(work) == []


def test_a_killed_command_leaves_a_workspace_the_next_one_sweeps(apps: dict, work: Path) -> None:
    import signal
    import sys
    import time

    cmd = [sys.executable, "-m", "appliance", "items", str(apps["repo"]), "db01", "postgres", "--path", "/srv/pg-clean"]
    cli = subprocess.Popen(
        [*cmd, "--list", "--work-dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not list(work.glob("*/run/server.pid")) or not os.path.ismount(next(work.glob("*/data"), work)):
        assert cli.poll() is None and time.monotonic() < deadline, "the server never started"
        time.sleep(0.05)
    server = int(next(work.glob("*/run/server.pid")).read_text())
    cli.send_signal(signal.SIGKILL)  # no cleanup: its server, overlay and FUSE view stay behind
    cli.wait()
    left = [p.name for p in work.iterdir()]
    assert len(left) == 1 and os.path.exists(f"/proc/{server}")
    items(apps, work, "maildir", "--list")  # any next command that makes a view sweeps first
    assert os.listdir(work) == []
    for _ in range(100):
        if not os.path.exists(f"/proc/{server}") or b"zombie" in Path(f"/proc/{server}/status").read_bytes():
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the dead command's server {server} still runs")


def test_no_postgres_in_a_point_without_one_and_the_backup_never_changes(apps: dict, work: Path) -> None:
    p = bootback("items", apps["repo"], "web01", "postgres", "--list", "--work-dir", work, ok=False)
    assert p.returncode == 62 and "no PostgreSQL data directory in web01@" in p.stderr, p.stderr
    assert tree_hash(apps["repo"]) == apps["hash"], "item recovery changed the repository"
    verify = bootback("verify", apps["repo"])
    assert verify.returncode == 0, verify.stderr
    assert os.listdir(work) == [], "a private view or server was left behind"


# Free space ------------------------------------------------------------------------------------------------
def items_on_small_fs(apps: dict, size_mib: int, reserve: str, *args: str | Path) -> tuple[int, str, str, str]:
    """``bootback items`` whose --work-dir is a fresh tmpfs of ``size_mib`` MiB, mounted in a mount namespace of
    its own (nothing of it outside the command); its exit status, stdout, stderr, and what it left on the tmpfs."""
    mnt = traversable_tmp("bb-small-")
    script = (
        'mount -t tmpfs -o "size=${0}m,mode=0755" bb-small "$1" || exit 99; w=$1; shift; "$@"; rc=$?; '
        'echo "LEFT:$(ls -A "$w" | tr "\\n" " ")"; exit $rc'
    )
    cmd = ["unshare", "--mount", "sh", "-c", script, str(size_mib), str(mnt)]
    cmd += [
        sys.executable,
        "-m",
        "appliance",
        "items",
        str(apps["repo"]),
        "db01",
        *map(str, args),
        "--work-dir",
        str(mnt),
    ]
    try:
        p = subprocess.run(
            cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "BOOTBACK_MIN_FREE": reserve}
        )
    finally:
        os.rmdir(mnt)
    out, _, left = p.stdout.rpartition("LEFT:")
    return p.returncode, out, p.stderr, left.strip()


def test_an_item_job_is_stopped_before_the_work_directory_falls_below_its_reserve(apps: dict, tmp_path: Path) -> None:
    """Crash recovery copies a 16 MiB WAL segment up into the overlay: on a 48 MiB file system with a 40 MiB
    reserve, the server is stopped, the workspace removed, one line said, nothing written to the output."""
    out = tmp_path / "shop.sql"
    args = ("postgres", "--path", "/var/lib/postgresql/15/main", "--db", "shop", "--dump", "-o", out)
    rc, _, err, left = items_on_small_fs(apps, 48, "40M", *args)
    assert rc == 62, err
    assert len(err.strip().splitlines()) == 1, err
    assert "item recovery stopped: " in err and "below the reserve of 41,943,040 bytes" in err, err
    assert left == "", f"left on the work directory: {left}"
    assert list(tmp_path.iterdir()) == [], "something was written beside the output"
    assert tree_hash(apps["repo"]) == apps["hash"]


def test_an_item_job_is_refused_when_free_space_is_already_below_the_reserve(apps: dict) -> None:
    rc, _, err, left = items_on_small_fs(apps, 16, "64M", "postgres", "--path", "/srv/pg-clean", "--list")
    assert rc == 62 and "has 16,777,216 bytes free, below the reserve of 67,108,864 bytes" in err, err
    assert left == ""


def test_an_item_job_with_room_above_its_reserve_works(apps: dict, tmp_path: Path) -> None:
    out = tmp_path / "customers.sql"
    args = ("postgres", "--path", "/var/lib/postgresql/15/main", "--dump", "shop.customers", "-o", out)
    rc, said, err, left = items_on_small_fs(apps, 160, "64M", *args)
    assert rc == 0, err
    assert "dumped shop.public.customers" in said and "COPY public.customers" in out.read_text()
    assert left == ""


# Database names with dots ---------------------------------------------------------------------------------
def test_a_database_whose_name_holds_dots_is_dumped_whole_never_read_as_a_table(
    apps: dict, work: Path, tmp_path: Path
) -> None:
    def pg(*args: str | Path, ok: bool = True):  # noqa: ANN202
        return bootback("items", apps["repo"], "dots01", "postgres", *args, "--work-dir", work, ok=ok)

    whole, table = tmp_path / "whole.sql", tmp_path / "table.sql"
    assert f"dumped database {DOTTED} from dots01@" in pg("--db", DOTTED, "--dump", "-o", whole).stdout
    assert "1\twhole" in whole.read_text() and "7\ttable" not in whole.read_text()
    assert "dumped shop.public.orders from" in pg("--dump", DOTTED, "-o", table).stdout
    assert "7\ttable" in table.read_text() and "1\twhole" not in table.read_text()
    marker = tmp_path / "marker.sql"
    assert f"dumped {DOTTED}.public.marker from" in pg("--db", DOTTED, "--dump", "marker", "-o", marker).stdout
    assert "1\twhole" in marker.read_text() and "CREATE TABLE public.marker" in marker.read_text()
    bare = pg("--dump", "shop", "-o", tmp_path / "x.sql", ok=False)
    assert bare.returncode == 62 and "expected DB.TABLE or DB.SCHEMA.TABLE, got 'shop'" in bare.stderr, bare.stderr
    assert not (tmp_path / "x.sql").exists()
