"""The pure parts of item recovery: names given on the command line, version rules, LDIF handling, mail filters
(the servers and views themselves are tested for real in tests/integration/test_item_recovery.py)."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from appliance.errors import ItemRecoveryError
from appliance.items import mail, mariadb, openldap, postgres, targets
from appliance.items.discovery import Item
from appliance.items.service import dump_request, split_spec


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("shop.orders", ("shop", "orders")),
        ("shop.sales.invoices", ("shop", "sales.invoices")),
    ],
)
def test_dump_specs(spec: str, expected: tuple) -> None:
    assert split_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "shop", ".orders", "shop.", "a.b.c.d"])
def test_bad_dump_specs_name_the_value(spec: str) -> None:
    with pytest.raises(ItemRecoveryError, match=r"expected DB.TABLE or DB.SCHEMA.TABLE, got .*--db NAME --dump"):
        split_spec(spec)


def test_a_whole_database_is_named_apart_so_a_dotted_name_is_never_a_table() -> None:
    assert dump_request([], "shop.public.orders") == ("shop.public.orders", [])
    assert dump_request(["shop.public.orders"], None) == ("shop", ["public.orders"])
    assert dump_request(["marker", "public.other"], "shop.public.orders") == (
        "shop.public.orders",
        ["marker", "public.other"],
    )
    with pytest.raises(ItemRecoveryError, match="one database at a time, not hr, shop"):
        dump_request(["shop.orders", "hr.staff"], None)


def _item(kind: str, version: str) -> Item:
    return Item(kind, "disk.raw", "p1", "/var/lib/x", version)


def test_postgres_versions_and_missing_binaries(tmp_path: Path) -> None:
    assert postgres.major_version(_item("postgres", "15")) == "15"
    assert postgres.major_version(_item("postgres", "9.6")) == "9.6"
    with pytest.raises(ItemRecoveryError, match=r"PG_VERSION holds 'garbage\\n'"):
        postgres.major_version(_item("postgres", "garbage\n"))
    (tmp_path / "13" / "bin").mkdir(parents=True)
    (tmp_path / "13" / "bin" / "postgres").write_text("")
    with pytest.raises(ItemRecoveryError, match="needs PostgreSQL 16.*apt-get install postgresql-16; installed: 13"):
        postgres.server_bindir("16", tmp_path)
    assert postgres.server_bindir("13", tmp_path) == tmp_path / "13" / "bin"


def test_mariadb_refuses_newer_and_mysql8_data_directories() -> None:
    mariadb.check_version(_item("mariadb", "10.6.12-MariaDB"), (10, 11))
    mariadb.check_version(_item("mariadb", "unknown"), (10, 11))
    with pytest.raises(ItemRecoveryError, match=r"written by MariaDB 11\.4; the installed server is 10\.11"):
        mariadb.check_version(_item("mariadb", "11.4.2-MariaDB"), (10, 11))
    with pytest.raises(ItemRecoveryError, match="MySQL 8 data directory"):
        mariadb.check_version(_item("mariadb", "mysql-8"), (10, 11))


def test_mariadb_urls_keep_the_password_out_of_argv() -> None:
    to = targets.parse_server("mariadb", "mariadb://app:s%40cret@db2:3307/inv")
    with mariadb.client(to) as (args, db):
        conf = Path(args[0].removeprefix("--defaults-file="))
        assert args[1:] == ["--host=db2", "--port=3307", "--protocol=TCP", "--user=app"] and db == "inv"
        assert conf.read_text() == '[client]\npassword="s@cret"\n' and conf.stat().st_mode & 0o777 == 0o600
        assert "s@cret" not in " ".join(args) and "s@cret" not in str(to) and "s@cret" not in repr(to)
    assert not conf.exists() and not conf.parent.exists()
    sock = targets.parse_server("mariadb", "mariadb://root@localhost/inv?socket=/run/m.sock")
    with mariadb.client(sock) as (args, db):
        assert args == ["--no-defaults", "--socket=/run/m.sock", "--user=root"] and db == "inv"
    with pytest.raises(ItemRecoveryError, match="--to: must be a mariadb:// or mysql:// URL, not postgresql"):
        targets.parse_server("mariadb", "postgresql://x/db")


def test_a_postgresql_target_is_parsed_into_parts_and_shown_without_its_password() -> None:
    sock = targets.parse_server("postgres", "postgresql://u:p%3Aw@:5433/shop?host=/run/postgresql&sslmode=disable")
    assert (sock.host, sock.port, sock.socket, sock.user, sock.database, sock.password) == (
        None,
        5433,
        "/run/postgresql",
        "u",
        "shop",
        "p:w",
    )
    assert str(sock) == "postgresql://u@:5433/shop?host=/run/postgresql" and "p:w" not in repr(sock)
    tcp = targets.parse_server("postgres", "postgresql://u@db2/shop?port=6543", "pw", socket_dirs=())
    assert (tcp.host, tcp.port, str(tcp)) == ("db2", 6543, "postgresql://u@db2:6543/shop")
    with pytest.raises(ItemRecoveryError, match="outside the allowed directories"):
        targets.parse_server("postgres", "postgresql://u@/shop?host=/run/postgresql", socket_dirs=())


LDIF = """dn: uid=ann,ou=people,dc=example,dc=org
objectClass: inetOrgPerson
uid: ann
description: a long value folded
  over two lines
entryUUID: 0a1b
creatorsName: cn=admin,dc=example,
 dc=org
cn: Ann

dn:: Y249w4RsZ2Esb3U9cGVvcGxlLGRjPWV4YW1wbGUsZGM9b3Jn
objectClass: person
cn:: w4RsZ2E=
sn: A
"""


def test_ldif_records_and_operational_attributes() -> None:
    entries = openldap.parse_ldif(LDIF)
    assert [e.dn for e in entries] == ["uid=ann,ou=people,dc=example,dc=org", "cn=Älga,ou=people,dc=example,dc=org"]
    assert entries[0].to_json() == {"dn": entries[0].dn, "objectClass": ["inetOrgPerson"]}
    kept = openldap.without_operational(entries[0])
    assert "entryUUID" not in kept and "creatorsName" not in kept and " dc=org" not in kept
    assert "description: a long value folded\n  over two lines" in kept and kept.endswith("cn: Ann")


def _msg(folder: str, sender: str, subject: str, when: datetime | None) -> mail.Message:
    return mail.Message(f"{folder}/k", folder, sender, subject, when, 10)


def test_mail_filters() -> None:
    sent = datetime(2026, 3, 3, 1, 30, tzinfo=timezone(timedelta(hours=2)))  # 2026-03-02 in UTC, the days' zone
    m = _msg("INBOX", "Carol <carol@example.org>", "Quarterly report", sent)
    assert mail.Filter(sender="CAROL", subject="report", since=date(2026, 3, 2), until=date(2026, 3, 2)).matches(m)
    assert not mail.Filter(since=date(2026, 3, 3)).matches(m)
    assert not mail.Filter(folder="Archive").matches(m)
    assert not mail.Filter(ids=("INBOX/other",)).matches(m)
    assert not mail.Filter(since=date(2026, 1, 1)).matches(_msg("INBOX", "x", "y", None))  # undated: no date match
    with pytest.raises(ItemRecoveryError, match="--since expects a date like 2026-03-01, got 'yesterday'"):
        mail.parse_day("yesterday", "--since")


def test_a_mail_store_names_unknown_folders_and_ids(tmp_path: Path) -> None:
    import mailbox as mb

    box = mb.Maildir(tmp_path / "Maildir", create=True)
    box.add_folder("Archive")
    box.add(b"From: a@example.org\nSubject: hi\n\nbody\n")
    store = mail.Store(tmp_path / "Maildir", "maildir")
    assert [m.subject for m in store.select(mail.Filter())] == ["hi"]
    with pytest.raises(ItemRecoveryError, match=r"no folder 'Spam' \(folders: INBOX, Archive\)"):
        store.select(mail.Filter(folder="Spam"))
    with pytest.raises(ItemRecoveryError, match="no message 'INBOX/nope' in this mail store"):
        store.select(mail.Filter(ids=("INBOX/nope",)))


def test_a_failed_mariadb_query_without_stderr_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client can die without a word (killed, out of memory): the error names the server and the exit."""
    silent = tmp_path / "mariadb"
    silent.write_text("#!/bin/sh\nexit 3\n")
    silent.chmod(0o755)
    monkeypatch.setattr(mariadb, "CLIENT", str(silent))
    server = mariadb.DisposableServer(tmp_path, tmp_path / "run", (0, 0), "backup vm1@p1 disk 0")
    with pytest.raises(ItemRecoveryError, match=r"query on backup vm1@p1 disk 0 failed \(exit 3\)"):
        server.query("SELECT 1")
