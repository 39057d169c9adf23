"""Item restores through the API into running servers and the restore root: a PostgreSQL 15 of Debian's on
loopback TCP with a password (scram), a slapd on an ldapi socket in a directory the operator allowed, a Maildir
under BOOTBACK_ITEMS_RESTORE_ROOT. Rows and entries compared exactly; hostile targets refused with one error
naming the field and nothing written; the password never in an answer or in the appliance's log."""

from __future__ import annotations

import json
import mailbox
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_process import DaemonProcess, bootback, free_port, tree_hash
from tests.integration.item_disks import (
    LDAP_LDIF,
    MAILDIR_MESSAGES,
    PG_BIN,
    Cluster,
    MariaDB,
    Slapd,
    build_app_disk,
)
from tests.integration.item_space import small_reserve  # noqa: F401 (autouse: a reserve this machine has)
from tests.integration.test_item_recovery import _user_attributes, traversable_tmp
from tests.nfsd_process import PRIVATE_PORTS

pytestmark = pytest.mark.skipif(not (PG_BIN / "postgres").exists(), reason="needs Debian's postgresql-15")
PASSWORD = "s3cret:pw\\with#odd'chars"  # ':' and '\\' need escaping in a pgpass line
LDAP_SECRET = "restore-secret"  # the target slapd's rootpw (item_disks.Slapd)


class TcpCluster(Cluster):
    """The item tests' PostgreSQL, also on 127.0.0.1:PORT, where logins need a password (scram-sha-256)."""

    def __init__(self, datadir: Path, sockdir: Path, port: int) -> None:
        super().__init__(datadir, sockdir)
        self.port = port

    def start(self) -> None:
        hba = self.datadir / "pg_hba.conf"
        hba.write_text(f"local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n{hba.read_text()}")
        super().start(listen="127.0.0.1", port=self.port)

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.sockdir}&port={self.port}"


@pytest.fixture(scope="module")
def setup(build_cache: Path) -> Iterator[dict]:
    import requests

    built = build_app_disk(build_cache)
    base = traversable_tmp("bb-item-restore-")  # STATE/items must be reachable by the 'postgres' user
    repo = base / "repo"
    bootback("init", repo, "--chunk-size", "256K", "--encryption", "none")
    bootback("backup", repo, "--vm", "db01", built / "disk.raw")
    before = tree_hash(repo)

    pg = TcpCluster(base / "pg" / "data", base / "pgsock", free_port())
    pg.init()
    pg.start()
    pg.psql("postgres", f"CREATE ROLE restorer LOGIN PASSWORD '{PASSWORD.replace(chr(39), chr(39) * 2)}'")
    pg.psql("postgres", "CREATE DATABASE target OWNER restorer")
    allowed = base / "sockets"  # the operator's BOOTBACK_ITEMS_SOCKET_DIRS
    allowed.mkdir()
    slapd = Slapd(allowed / "slapd")
    slapd.start()
    maria = MariaDB(base / "mariadb", allowed / "mysql")
    maria.init()
    maria.start()
    quoted = PASSWORD.replace("\\", "\\\\").replace("'", "\\'")
    maria.sql(f"CREATE DATABASE target; CREATE USER restorer@localhost IDENTIFIED BY '{quoted}'; ")
    maria.sql("GRANT ALL ON target.* TO restorer@localhost")
    secrets = base / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "ldap-admin").write_text(LDAP_SECRET + "\n")
    root = base / "restore-root"
    env = {
        "BOOTBACK_ITEMS_SOCKET_DIRS": str(allowed),
        "BOOTBACK_ITEMS_RESTORE_ROOT": str(root),
        "BOOTBACK_ITEMS_SECRETS": str(secrets),
    }
    port = free_port()
    d = DaemonProcess(repo, base / "state", *PRIVATE_PORTS, web_port=port, env=env).start()
    try:
        token = bootback("token", "create", "items", "--state", d.state).stdout.strip()
        api = requests.Session()
        api.trust_env = False
        api.verify = str(d.state / "web" / "tls.crt")
        api.headers["Authorization"] = f"Bearer {token}"
        yield {
            "api": api,
            "url": f"https://127.0.0.1:{port}/api/v1/repositories/repo/items",
            "pg": pg,
            "slapd": slapd,
            "maria": maria,
            "root": root,
            "base": base,
            "daemon": d,
            "expected": json.loads((built / "expected.json").read_text()),
        }
    finally:
        d.stop()
        maria.stop()
        slapd.stop()
        pg.stop()
    assert tree_hash(repo) == before, "a restore changed the backup"
    left = list((base / "state" / "items").glob("*"))
    assert not left, f"a view or server was left in STATE/items: {left}"
    shutil.rmtree(base, ignore_errors=True)
    Path(f"{base / 'state'}-daemon.log").unlink(missing_ok=True)


SENT = {PASSWORD, LDAP_SECRET}  # every password a test sent: none may be in an answer or the log


def post(setup: dict, kind: str, body: dict):  # noqa: ANN201
    if body.get("password"):
        SENT.add(body["password"])
    r = setup["api"].post(f"{setup['url']}/{kind}/restore", json={"point": "db01", **body})
    for secret in SENT:
        assert secret not in r.text, f"the password came back in an answer: {r.text}"
    return r


def pg_target(setup: dict, user: str = "restorer") -> str:
    return f"postgresql://{user}@127.0.0.1:{setup['pg'].port}/target"


def test_a_table_is_restored_under_another_name_into_a_running_postgresql(setup: dict) -> None:
    pg, clean = setup["pg"], setup["expected"]["clean"]["shop"]
    body = {"path": "/srv/pg-clean", "dump": "shop.sales.invoices", "as": "invoices_api", "to": pg_target(setup)}
    r = post(setup, "postgres", {**body, "password": PASSWORD})
    assert r.status_code == 200, r.text
    assert r.json()["result"].startswith("restored shop.sales.invoices_api from db01@")
    assert pg.rows("target", "sales.invoices_api") == clean["sales.invoices"]
    assert pg.psql("target", "SELECT tableowner FROM pg_tables WHERE tablename = 'invoices_api'") == "restorer\n"

    # again: the target has it now; the single transaction refuses it whole (409), the rows stay as they were
    again = post(setup, "postgres", {**body, "password": PASSWORD})
    assert again.status_code == 409 and "nothing was changed" in again.json()["error"]["message"], again.text
    assert "already exists" in again.json()["error"]["message"]
    # a wrong password: 422, one line, before any server is started; nothing written
    wrong = post(setup, "postgres", {**body, "as": "never", "password": "not-the-password"})
    message = wrong.json()["error"]["message"]
    assert wrong.status_code == 422 and "password authentication failed for user" in message, wrong.text
    assert message.startswith("cannot log in to postgresql://restorer@127.0.0.1:") and "\n" not in message
    assert pg.psql("target", "SELECT count(*) FROM pg_tables WHERE tablename = 'never'") == "0\n"
    # a whole database into the target, with the password in the request body as a form would send it
    pg.psql("postgres", "DROP DATABASE IF EXISTS hrcopy")
    pg.psql("postgres", "CREATE DATABASE hrcopy OWNER restorer")
    form = {"point": "db01", "path": "/srv/pg-clean", "db": "hr", "to": pg_target(setup).replace("target", "hrcopy")}
    r = setup["api"].post(f"{setup['url']}/postgres/restore", data={**form, "password": PASSWORD})
    assert r.status_code == 200 and "database hr" in r.json()["result"], r.text
    assert pg.rows("hrcopy", "staff") == setup["expected"]["clean"]["hr"]["staff"]


def test_mariadb_tables_are_restored_through_an_allowed_socket_with_a_password(setup: dict) -> None:
    maria, expected = setup["maria"], setup["expected"]["mariadb"]["inventory"]
    body = {
        "dump": ["inventory.items", "inventory.moves"],
        "to": f"mariadb://restorer@localhost/target?socket={maria.socket}",
    }
    r = post(setup, "mariadb", {**body, "password": PASSWORD})
    assert r.status_code == 200 and r.json()["result"].startswith("restored inventory.items, inventory.moves"), r.text
    for table, rows in expected.items():
        assert maria.rows("target", table) == rows, table
    again = post(setup, "mariadb", {**body, "password": PASSWORD})
    assert again.status_code == 409 and "already has table(s) items, moves: nothing was restored" in again.text
    wrong = post(setup, "mariadb", {**body, "dump": "inventory.nope", "password": "wrong-maria"})
    assert wrong.status_code == 422 and "Access denied for user 'restorer'@'localhost'" in wrong.text, wrong.text


def test_ldap_entries_are_restored_through_an_allowed_socket_with_a_password_file(setup: dict) -> None:
    slapd = setup["slapd"]
    flt = "(|(objectClass=organization)(objectClass=organizationalUnit)(uid=bo))"
    body = {"filter": flt, "to": slapd.uri, "bind_dn": "cn=admin,dc=example,dc=org", "password_ref": "ldap-admin"}
    r = post(setup, "openldap", body)
    assert r.status_code == 200 and r.json()["result"].startswith("restored 3 entries"), r.text
    source = _user_attributes(LDAP_LDIF)
    restored = _user_attributes(slapd.search("(objectClass=*)").stdout)
    assert restored == {dn: a for dn, a in source.items() if "uid=ann" not in dn and "cn=admins" not in dn}
    again = post(setup, "openldap", {**body, "filter": "(|(uid=ann)(uid=bo))"})
    assert again.status_code == 409 and "already has 'uid=bo,ou=people,dc=example,dc=org'" in again.text
    assert slapd.search("(uid=ann)").stdout == "", "an entry was added although the restore was refused"
    wrong = post(setup, "openldap", {**body, "password_ref": None, "password": "wrong"})
    assert wrong.status_code == 422 and "Invalid credentials" in wrong.json()["error"]["message"], wrong.text


def test_a_maildir_restore_lands_under_the_restore_root_only(setup: dict) -> None:
    root = setup["root"]
    r = post(setup, "mail", {"path": "/home/alice/Maildir", "from": "carol", "restore_to": "alice/Maildir"})
    assert r.status_code == 200 and r.json()["result"].startswith("restored 2 message(s)"), r.text
    got = sorted((m["From"], m["Subject"], m.get_payload()) for m in mailbox.Maildir(root / "alice/Maildir"))
    assert got == sorted((f, s, b) for _, f, s, _, b in MAILDIR_MESSAGES if f.startswith("carol"))
    assert sorted(p.name for p in root.iterdir()) == ["alice"]


def test_hostile_targets_are_one_error_naming_the_field_and_write_nothing(setup: dict) -> None:
    root, base, pg = setup["root"], setup["base"], setup["pg"]
    outside = base / "outside"
    outside.mkdir()
    (root / "link").parent.mkdir(parents=True, exist_ok=True)
    (root / "link").symlink_to(outside)
    port = pg.port
    before = sorted(p.name for p in root.iterdir())
    db = {"path": "/srv/pg-clean", "dump": "hr.staff", "password": PASSWORD}
    box = {"path": "/home/alice/Maildir"}
    cases = [
        ("postgres", {**db, "to": "file:///etc/passwd"}, "to: must be a postgresql:// or postgres:// URL"),
        ("postgres", {**db, "to": f"{pg_target(setup)}?passfile=/etc/shadow"}, "to: parameter 'passfile' is not"),
        ("postgres", {**db, "to": f"{pg_target(setup)}?options=-c%20x=1"}, "to: parameter 'options' is not"),
        ("postgres", {**db, "to": pg_target(setup, "-U")}, "to user: '-U' must be 1 to 255 printable"),
        ("postgres", {**db, "to": f"postgresql://restorer@127.0.0.1:{port}/-target"}, "to database: '-target'"),
        ("postgres", {**db, "to": f"postgresql://r@/target?host={pg.sockdir}"}, "outside the allowed directories"),
        ("postgres", {**db, "to": "postgresql://restorer@/target"}, "to: name the server's host"),
        ("postgres", {**db, "to": "postgresql://restorer:plain@127.0.0.1/t"}, "to: put the password in its own"),
        ("postgres", {**db, "to": f"postgresql://restorer:{PASSWORD}@127.0.0.1/t"}, "to: not a valid URL"),
        ("postgres", {**db, "to": "postgresql://restorer@-oProxy/t"}, "to: '-oproxy' is not a host name"),
        ("mariadb", {**db, "to": "mariadb://root@localhost/--init-command=x"}, "to database: '--init-command=x'"),
        ("mariadb", {**db, "to": "mariadb://root@x/db?socket=/run/mysqld/mysqld.sock"}, "outside the allowed"),
        ("postgres", {"path": "/srv/pg-clean", "dump": "hr.staff"}, "to: required"),
        ("postgres", {**db, "to": "postgresql://a@h/\ud800"}, "'to': not valid Unicode text"),
        ("postgres", {**db, "to": pg_target(setup), "password_ref": "x"}, "password: give password or password_ref"),
        ("openldap", {"to": "ldap://h", "bind_dn": "cn=a", "password_ref": "../ldap-admin"}, "password_ref: expected"),
        ("openldap", {"to": "ldap://h/dc=x", "bind_dn": "cn=a", "password": "hostile-pw"}, "an LDAP target is only"),
        ("openldap", {"to": "ldap://h", "bind_dn": "-cn=a", "password": "hostile-pw"}, "bind_dn: '-cn=a'"),
        ("mail", {**box, "restore_to": "../escape"}, "restore_to: expected a Maildir path relative to"),
        ("mail", {**box, "restore_to": "/tmp/escape"}, "restore_to: expected a Maildir path relative to"),
        ("mail", {**box, "restore_to": "a/../../escape"}, "restore_to: expected a Maildir path relative to"),
        ("mail", {**box, "restore_to": "link/Maildir"}, "restore_to: 'link/Maildir' leads through something"),
        ("mail", {**box, "restore_to": "x/Maildir", "into_folder": "../../up"}, "into folder: '../../up' is not"),
        ("postgres", {**db, "to": pg_target(setup), "point": "../x"}, "point: expected VM or VM@POINT"),
    ]
    for kind, body, message in cases:
        r = post(setup, kind, body)
        assert r.status_code == 400, (body, r.text)
        assert message in r.json()["error"]["message"] and "\n" not in r.json()["error"]["message"], (body, r.text)
    leak = setup["api"].post(f"{setup['url']}/postgres/restore", params={"password": PASSWORD}, json={})
    assert leak.status_code == 400 and "never in the URL" in leak.json()["error"]["message"]
    assert list(outside.iterdir()) == [] and not (base / "escape").exists() and not Path("/tmp/escape").exists()
    assert not (root / "x").exists() or not any((root / "x").rglob("*")), "a refused restore wrote under the root"
    assert sorted(p.name for p in root.iterdir()) == before
    assert pg.psql("target", "SELECT count(*) FROM pg_tables WHERE tablename = 'staff'") == "0\n"
    # the password reached neither the appliance's log (access log, errors) nor the process table
    log = setup["daemon"].log()
    assert "POST /api/v1/repositories/repo/items/postgres/restore" in log  # the access log is in it
    assert not [p for p in SENT if len(p) > 3 and p in log], "a password is in the appliance's log"
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert PASSWORD.encode() not in cmdline.read_bytes(), cmdline
        except (FileNotFoundError, ProcessLookupError):
            pass
    assert not [p for p in Path("/dev/shm").glob("bootback-secret-*")], "a password file was left behind"
    assert os.environ.get("BOOTBACK_MIN_FREE")  # the item tests' small reserve applies to the web app too
