"""Disks holding real applications, made with their own tools, for the item recovery tests.

``build_app_disk`` makes one ext4 file system image (``mkfs.ext4 -d``, no mount needed) with:
- /var/lib/postgresql/15/main: a PostgreSQL 15 cluster (Debian's initdb/postgres) copied while the server was
  running (crash-consistent: the last table exists only in the WAL unless recovery replays it);
- /srv/pg-clean: the same cluster copied after a clean shutdown, before the last table was made;
- /srv/pg14 (its PG_VERSION says 14, whose server is not installed) and /srv/pg-damaged (pg_control overwritten);
- /var/lib/mysql: a MariaDB data directory (Debian's mariadb-install-db/mariadbd) copied while it ran;
- /var/lib/ldap: an OpenLDAP mdb made with slapadd, and its cn=config in /etc/ldap/slapd.d (slaptest), whose
  schema has an attribute of the VM's own (bbBadge) that Debian's schema files do not know;
- /home/alice/Maildir (with an Archive folder, and two messages that are symlinks out of it: to the host's
  /etc/hostname, absolute and by '..') and /var/mail/bob (mbox).
The rows each table holds are recorded in expected.json next to the image, as ``COPY ... TO STDOUT`` text.
Built once and cached under the build cache (keyed by BUILD_VERSION).
"""

from __future__ import annotations

import json
import mailbox
import os
import pwd
import shutil
import subprocess
import time
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

BUILD_VERSION = "5"
PG_BIN = Path("/usr/lib/postgresql/15/bin")

SCHEMA_SQL = """
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text);
INSERT INTO customers SELECT g, 'customer ' || g, 'c' || g || '@example.org' FROM generate_series(1, 200) g;
CREATE TABLE orders (id int PRIMARY KEY, customer int REFERENCES customers, amount numeric(10,2), note text);
INSERT INTO orders SELECT g, 1 + g % 200, (g * 7 % 1000) / 10.0, CASE WHEN g % 5 = 0 THEN 'tab\tand ''quote''' END
  FROM generate_series(1, 1500) g;
CREATE SCHEMA sales;
CREATE TABLE sales.invoices (id serial PRIMARY KEY, issued date, total numeric);
INSERT INTO sales.invoices (issued, total) SELECT date '2026-01-01' + g, g * 3.5 FROM generate_series(1, 40) g;
"""
LATE_SQL = """
CHECKPOINT;
CREATE TABLE late_orders AS SELECT g AS id, 'after the checkpoint ' || g AS what FROM generate_series(1, 321) g;
UPDATE customers SET name = name || ' (updated)' WHERE id <= 10;
"""
TABLES = {"shop": ["customers", "orders", "sales.invoices"], "hr": ["staff"]}


def sh(*args: str | Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True, timeout=300, **kw)


def as_postgres() -> dict:
    entry = pwd.getpwnam("postgres")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


class Cluster:
    """A PostgreSQL 15 server of Debian's, run as 'postgres' on a Unix socket only."""

    def __init__(self, datadir: Path, sockdir: Path) -> None:
        self.datadir, self.sockdir = datadir, sockdir
        self.proc: subprocess.Popen | None = None

    def init(self) -> None:
        for d in (self.datadir.parent, self.sockdir):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, *list(as_postgres().values())[:2])
        sh(
            PG_BIN / "initdb",
            "-D",
            self.datadir,
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            **as_postgres(),
        )

    def start(self, listen: str = "", port: int = 5432) -> None:
        """Start on its socket directory only, or also on TCP at ``listen``:``port``; wait until it answers."""
        log = open(self.sockdir / "server.log", "ab")  # noqa: SIM115 - kept by the server process
        settings = [f"listen_addresses={listen}", f"port={port}", f"unix_socket_directories={self.sockdir}"]
        self.proc = subprocess.Popen(
            [PG_BIN / "postgres", "-D", self.datadir, *(a for s in settings for a in ("-c", s))],
            stdout=log,
            stderr=subprocess.STDOUT,
            **as_postgres(),
        )
        for _ in range(300):
            ready = [PG_BIN / "pg_isready", "-q", "-h", self.sockdir, "-p", str(port)]
            if subprocess.run(ready, check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"postgres did not start: {(self.sockdir / 'server.log').read_text()}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # smart shutdown: a clean checkpoint
            self.proc.wait(timeout=60)
            self.proc = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.sockdir}"

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.sockdir}"

    def psql(self, database: str, sql: str) -> str:
        return sh(
            PG_BIN / "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-d", self.url_for(database), "-c", sql
        ).stdout

    def rows(self, database: str, table: str) -> str:
        """Every row of ``table`` as COPY text, in primary-key order: what must come back exactly."""
        return self.psql(database, f"COPY (SELECT * FROM {table} ORDER BY 1) TO STDOUT")


MARIADB_SQL = """
CREATE DATABASE inventory;
USE inventory;
CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(80) NOT NULL, qty INT, note TEXT) ENGINE=InnoDB;
INSERT INTO items SELECT seq, CONCAT('item ', seq), seq * 3 % 17, IF(seq % 4 = 0, 'tab\\there ''q'' ü', NULL)
  FROM seq_1_to_700;
CREATE TABLE moves (id INT AUTO_INCREMENT PRIMARY KEY, item INT, at DATE) ENGINE=InnoDB;
INSERT INTO moves (item, at) SELECT 1 + seq % 700, '2026-01-01' + INTERVAL seq DAY FROM seq_1_to_90;
"""
MARIADB_TABLES = {"inventory": ["items", "moves"]}


class MariaDB:
    """A MariaDB server of Debian's, as the 'mysql' user, on a Unix socket only (no network)."""

    def __init__(self, datadir: Path, sockdir: Path) -> None:
        self.datadir, self.sockdir = datadir, sockdir
        self.socket = sockdir / "mysqld.sock"
        self.proc: subprocess.Popen | None = None

    def init(self) -> None:
        self.sockdir.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.sockdir, "mysql", "mysql")
        sh("mariadb-install-db", "--no-defaults", f"--datadir={self.datadir}", "--user=mysql", "--skip-test-db")

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "/usr/sbin/mariadbd",
                "--no-defaults",
                f"--datadir={self.datadir}",
                f"--socket={self.socket}",
                "--skip-networking",
                "--user=mysql",
                f"--pid-file={self.sockdir / 'pid'}",
                f"--log-error={self.sockdir / 'error.log'}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(600):
            if (
                subprocess.run(
                    ["mariadb", "--no-defaults", f"--socket={self.socket}", "-e", "SELECT 1"], capture_output=True
                ).returncode
                == 0
            ):
                return
            time.sleep(0.1)
        raise RuntimeError(f"mariadbd did not start: {(self.sockdir / 'error.log').read_text()}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
            self.proc = None

    def url(self, database: str) -> str:
        return f"mariadb://root@localhost/{database}?socket={self.socket}"

    def sql(self, sql: str, database: str = "") -> str:
        args = ["mariadb", "--no-defaults", f"--socket={self.socket}", "-N", "-B", "--raw", "-e", sql]
        return sh(*args, *([database] if database else [])).stdout

    def rows(self, database: str, table: str) -> str:
        return self.sql(f"SELECT * FROM {table} ORDER BY 1", database)


def _make_mariadb(work: Path, tree: Path, expected: dict) -> None:
    server = MariaDB(work / "mariadb" / "data", work / "mysock")
    server.init()
    server.start()
    try:
        server.sql(MARIADB_SQL)
        sh("mariadb-upgrade", "--no-defaults", f"--socket={server.socket}", "--force")  # writes mysql_upgrade_info
        expected["mariadb"] = {db: {t: server.rows(db, t) for t in ts} for db, ts in MARIADB_TABLES.items()}
        (tree / "var/lib").mkdir(parents=True, exist_ok=True)
        sh("cp", "-a", server.datadir, tree / "var/lib/mysql")  # while it runs
    finally:
        server.stop()


LDAP_SCHEMA = """attributetype ( 1.3.6.1.4.1.99999.1.1 NAME 'bbBadge' DESC 'badge number'
  EQUALITY caseIgnoreMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )
objectclass ( 1.3.6.1.4.1.99999.2.1 NAME 'bbPerson' SUP top AUXILIARY MAY bbBadge )
"""
LDAP_SUFFIX = "dc=example,dc=org"
LDAP_LDIF = """dn: dc=example,dc=org
objectClass: dcObject
objectClass: organization
o: Example
dc: example

dn: ou=people,dc=example,dc=org
objectClass: organizationalUnit
ou: people

dn: uid=ann,ou=people,dc=example,dc=org
objectClass: inetOrgPerson
objectClass: bbPerson
uid: ann
cn: Ann Archer
sn: Archer
mail: ann@example.org
bbBadge: B-1001
description:: w4RuZ3N0bGljaCDDvGJlciBkaWUgRsO8bGxl

dn: uid=bo,ou=people,dc=example,dc=org
objectClass: inetOrgPerson
uid: bo
cn: Bo Baker
sn: Baker
mail: bo@example.org

dn: cn=admins,dc=example,dc=org
objectClass: groupOfNames
cn: admins
member: uid=ann,ou=people,dc=example,dc=org
"""


def slapd_conf(dbdir: Path, schema: Path, extra: str = "") -> str:
    includes = "".join(f"include /etc/ldap/schema/{n}.schema\n" for n in ("core", "cosine", "nis", "inetorgperson"))
    return (
        f"{includes}include {schema}\nmodulepath /usr/lib/ldap\nmoduleload back_mdb\n"
        f'database mdb\nsuffix "{LDAP_SUFFIX}"\nrootdn "cn=admin,{LDAP_SUFFIX}"\n{extra}directory "{dbdir}"\n'
    )


class Slapd:
    """A slapd of Debian's on a Unix socket (ldapi) only, with an empty database to restore into."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.socket = base / "ldapi"
        self.password = base / "password"
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        from urllib.parse import quote

        return "ldapi://" + quote(str(self.socket), safe="")

    def start(self) -> None:
        (self.base / "db").mkdir(parents=True)
        (self.base / "bb.schema").write_text(LDAP_SCHEMA)
        self.password.write_text("restore-secret")
        self.password.chmod(0o600)
        conf = slapd_conf(self.base / "db", self.base / "bb.schema", "rootpw restore-secret\n")
        (self.base / "slapd.conf").write_text(conf)
        self.proc = subprocess.Popen(
            ["/usr/sbin/slapd", "-d", "0", "-h", self.uri, "-f", self.base / "slapd.conf"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(300):
            if self.search("(objectClass=*)", base="", scope="base").returncode in (0, 32):
                return
            time.sleep(0.1)
        raise RuntimeError("slapd did not start")

    def search(self, flt: str, base: str = LDAP_SUFFIX, scope: str = "sub") -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                "ldapsearch",
                "-x",
                "-H",
                self.uri,
                "-D",
                f"cn=admin,{LDAP_SUFFIX}",
                "-y",
                self.password,
                "-LLL",
                "-o",
                "ldif-wrap=no",
                "-s",
                scope,
                "-b",
                base,
                flt,
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def _make_ldap(work: Path, tree: Path) -> None:
    (work / "bb.schema").write_text(LDAP_SCHEMA)
    db = tree / "var/lib/ldap"
    db.mkdir(parents=True)
    conf = work / "slapd.conf"
    conf.write_text(slapd_conf(db, work / "bb.schema"))
    (work / "data.ldif").write_text(LDAP_LDIF)
    sh("slapadd", "-f", conf, "-l", work / "data.ldif")
    (tree / "etc/ldap/slapd.d").mkdir(parents=True)
    sh("slaptest", "-f", conf, "-F", tree / "etc/ldap/slapd.d")


def _mail(sender: str, subject: str, day: int, body: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "alice@example.org"
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime(2026, 3, day, 9, 30, tzinfo=UTC))
    msg["Message-ID"] = f"<{day}.{len(subject)}.{sender.split('@')[0]}@example.org>"
    msg.set_content(body)
    return msg


MAILDIR_MESSAGES = [
    ("INBOX", "carol@example.org", "Quarterly report", 2, "numbers attached\n"),
    ("INBOX", "dave@example.org", "Lunch?", 5, "noon?\n"),
    ("INBOX", "carol@example.org", "Re: Quarterly report", 9, "thanks, looks good\n"),
    ("Archive", "erin@example.org", "Old contract", 1, "signed copy\n"),
]
MBOX_MESSAGES = [
    ("frank@example.org", "Server alert", 3, "disk almost full\n"),
    ("grace@example.org", "From the lab", 4, "From here on, lines starting with From are escaped\n"),
]


def _make_mail(tree: Path) -> None:
    (tree / "home/alice").mkdir(parents=True)
    md = mailbox.Maildir(tree / "home/alice/Maildir", create=True)
    for folder, sender, subject, day, body in MAILDIR_MESSAGES:
        box = (
            md
            if folder == "INBOX"
            else (md.get_folder(folder) if folder in md.list_folders() else md.add_folder(folder))
        )
        box.add(mailbox.MaildirMessage(_mail(sender, subject, day, body)))
    # a hostile link: a server or reader following it would read this host's file, not the backup's
    (tree / "home/alice/Maildir/new/1700000000.M1P1.evil").symlink_to("/etc/hostname")
    (tree / "home/alice/Maildir/cur/1700000001.M2P2.evil:2,S").symlink_to("../../../../../../etc/hostname")
    (tree / "var/mail").mkdir(parents=True)
    mb = mailbox.mbox(tree / "var/mail/bob", create=True)
    for sender, subject, day, body in MBOX_MESSAGES:
        mb.add(mailbox.mboxMessage(_mail(sender, subject, day, body)))
    mb.flush()
    mb.close()


def build_app_disk(cache: Path) -> Path:
    """The directory holding disk.raw and expected.json (built once per BUILD_VERSION)."""
    out = cache / f"items-disk-v{BUILD_VERSION}"
    if (out / "expected.json").exists():
        return out
    work = cache / f"items-disk-v{BUILD_VERSION}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    work.chmod(0o755)
    tree = work / "tree"
    cluster = Cluster(work / "pg" / "data", work / "sock")
    cluster.init()
    cluster.start()
    try:
        cluster.psql("postgres", "CREATE DATABASE shop")
        cluster.psql("postgres", "CREATE DATABASE hr")
        cluster.psql("shop", SCHEMA_SQL)
        cluster.psql(
            "hr", "CREATE TABLE staff (id int PRIMARY KEY, name text); INSERT INTO staff VALUES (1, 'Ann'), (2, 'Bo')"
        )
        cluster.stop()
        shutil.copytree(cluster.datadir, tree / "srv/pg-clean", symlinks=True)
        cluster.start()
        expected = {}
        expected["clean"] = {db: {t: cluster.rows(db, t) for t in ts} for db, ts in TABLES.items()}
        cluster.psql("shop", LATE_SQL)
        expected["crash"] = {db: {t: cluster.rows(db, t) for t in ts} for db, ts in TABLES.items()}
        expected["crash"]["shop"]["late_orders"] = cluster.rows("shop", "late_orders")
        # while the server runs: what a snapshot of a running VM's disk holds
        (tree / "var/lib/postgresql/15").mkdir(parents=True)
        sh("cp", "-a", cluster.datadir, tree / "var/lib/postgresql/15/main")
    finally:
        cluster.stop()
    # bad inputs: a cluster of a version whose server is not installed, and one with a damaged control file
    shutil.copytree(tree / "srv/pg-clean", tree / "srv/pg14", symlinks=True)
    (tree / "srv/pg14/PG_VERSION").write_text("14\n")
    shutil.copytree(tree / "srv/pg-clean", tree / "srv/pg-damaged", symlinks=True)
    with open(tree / "srv/pg-damaged/global/pg_control", "r+b") as f:
        f.seek(16)
        f.write(b"\xde\xad\xbe\xef" * 8)
    for d in (tree / "srv", tree / "var/lib/postgresql"):
        sh("chown", "-R", "postgres:postgres", d)
    _make_mariadb(work, tree, expected)
    _make_ldap(work, tree)
    _make_mail(tree)
    sh("mkfs.ext4", "-q", "-F", "-d", tree, work / "disk.raw", "256M")
    (work / "expected.json").write_text(json.dumps(expected))
    shutil.rmtree(tree)
    shutil.rmtree(work / "pg")
    shutil.rmtree(work / "mariadb")
    os.replace(work, out) if not out.exists() else shutil.rmtree(work)
    return out


XFS_VERSION = "3"
XFS_BYTES = 320 << 20  # mkfs.xfs refuses file systems under 300 MB; the image is sparse


def _protofile(root: Path, uid: int, gid: int) -> str:
    """mkfs.xfs's prototype file (xfsprogs' 'mkfs.xfs -p'): the tree under ``root``, owned by uid:gid, so the
    file system is made populated, without mounting it. Names must not hold spaces (PostgreSQL's do not)."""
    lines = ["/dev/null", "0 0", f"d--{root.stat().st_mode & 0o777:03o} {uid} {gid}"]

    def walk(d: Path, depth: int) -> None:
        for p in sorted(d.iterdir()):
            assert " " not in p.name, p
            pad = " " * depth
            mode = f"{p.lstat().st_mode & 0o777:03o}"
            if p.is_symlink():
                lines.append(f"{pad}{p.name} l--{mode} {uid} {gid} {os.readlink(p)}")
            elif p.is_dir():
                lines.append(f"{pad}{p.name} d--{mode} {uid} {gid}")
                walk(p, depth + 1)
                lines.append(f"{pad}$")
            else:
                lines.append(f"{pad}{p.name} ---{mode} {uid} {gid} {p}")

    walk(root, 1)
    return "\n".join([*lines, "$", ""])


def _make_tablespace_cluster(work: Path, datadir: Path, ts_dir: Path) -> None:
    """A copy of /srv/pg-xfs with a tablespace (table shop.archived, 77 rows) kept in ``ts_dir``: its link
    pg_tblspc/OID points to /srv/ts-elsewhere, where the VM had it."""
    shutil.copytree(work / "tree/srv/pg-xfs", datadir, symlinks=True)
    made = work / "ts"
    sock = work / "ts-sock"
    for d in (made, sock):
        d.mkdir(mode=0o700)
    sh("chown", "-R", "postgres:postgres", datadir, made, sock)
    cluster = Cluster(datadir, sock)
    cluster.start()
    try:
        cluster.psql("postgres", f"CREATE TABLESPACE elsewhere LOCATION '{made}'")
        cluster.psql(
            "shop", "CREATE TABLE archived TABLESPACE elsewhere AS SELECT g AS id FROM generate_series(1, 77) g"
        )
    finally:
        cluster.stop()
    (link,) = [p for p in (datadir / "pg_tblspc").iterdir() if p.is_symlink()]
    made.rename(ts_dir)
    link.unlink()
    link.symlink_to("/srv/ts-elsewhere")
    shutil.rmtree(sock)


def build_xfs_disk(cache: Path) -> Path:
    """An XFS image (made populated by ``mkfs.xfs -p``, no mount, no root needed) holding the clean PostgreSQL
    cluster of ``build_app_disk`` twice: /srv/pg-xfs as it was, and /var/lib/postgresql/15/walink whose pg_wal is
    a symlink to /srv/wal-elsewhere on the same file system (as ``initdb --waldir`` makes it), and links to /etc
    and to its own ancestor that the view must leave out; and /srv/pg-ts, whose tablespace is in /srv/ts-elsewhere."""
    out = cache / f"items-xfs-v{XFS_VERSION}-{BUILD_VERSION}"
    if (out / "xfs.raw").exists():
        return out
    ext4 = build_app_disk(cache) / "disk.raw"
    work = Path(f"{out}.tmp")
    shutil.rmtree(work, ignore_errors=True)
    (work / "tree/srv").mkdir(parents=True)
    sh("debugfs", "-R", f"rdump /srv/pg-clean {work / 'tree/srv'}", ext4)  # read out of the image, no mount
    (work / "tree/srv/pg-clean").rename(work / "tree/srv/pg-xfs")
    walink = work / "tree/var/lib/postgresql/15/walink"
    walink.parent.mkdir(parents=True)
    shutil.copytree(work / "tree/srv/pg-xfs", walink, symlinks=True)
    (walink / "pg_wal").rename(work / "tree/srv/wal-elsewhere")
    (walink / "pg_wal").symlink_to("/srv/wal-elsewhere")
    # hostile links: to /etc (not on this file system: on the appliance it would be the host's) and to an
    # ancestor of the data directory (a loop)
    (walink / "pg_tblspc/99999").symlink_to("/etc")
    (walink / "up").symlink_to("../../..")
    _make_tablespace_cluster(work, work / "tree/srv/pg-ts", work / "tree/srv/ts-elsewhere")
    entry = pwd.getpwnam("postgres")
    proto = work / "proto.txt"
    proto.write_text(_protofile(work / "tree", entry.pw_uid, entry.pw_gid))
    with open(work / "xfs.raw", "wb") as f:
        f.truncate(XFS_BYTES)
    # two allocation groups: mkfs puts a prototype's files in one, and a quarter of 320 MB is too small
    sh("mkfs.xfs", "-q", "-f", "-d", "agcount=2", "-p", proto, work / "xfs.raw")
    shutil.rmtree(work / "tree")
    os.replace(work, out) if not out.exists() else shutil.rmtree(work)
    return out
