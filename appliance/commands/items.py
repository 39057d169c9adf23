"""Application item recovery from the command line: ``bootback items REPO VM@POINT`` lists the applications inside
a restore point; ``bootback items REPO VM@POINT postgres --list`` and friends act on one of them."""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.commands.files import minute, print_list
from appliance.commands.keys import add_key_options, key_source
from appliance.errors import UsageError
from appliance.items import KINDS, mail, service, targets
from appliance.items.postgres import Table
from appliance.repo.backends import add_repository_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "items",
        help="find applications (PostgreSQL, MariaDB, OpenLDAP, mail) in a restore point; list, dump, restore items",
    )
    add_repository_argument(p)
    p.add_argument("point", metavar="VM[@POINT]")
    p.add_argument("kind", nargs="?", choices=[*KINDS, "mail"], help="act on one application of this kind")
    add_key_options(p)
    p.add_argument("--path", help="which one, when there are several: its path as listed")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--work-dir",
        type=Path,
        help="where private views and servers live (default STATE/items); a job keeps its file system above "
        "the daemon's minimum free space ($BOOTBACK_MIN_FREE, default 100G)",
    )
    p.add_argument("--list", action="store_true", help="list databases/tables, or messages")
    p.add_argument(
        "--db",
        help="PostgreSQL/MariaDB: only this database in --list; with --dump, the database whose tables are named "
        "(--dump TABLE) or which is dumped whole (a bare --dump)",
    )
    p.add_argument("--no-count", action="store_true", help="PostgreSQL: list tables without counting their rows")
    p.add_argument(
        "--dump",
        action="append",
        nargs="?",
        const="",
        metavar="DB.[SCHEMA.]TABLE",
        help="PostgreSQL/MariaDB: dump a table (repeat for several tables of one database); with --db NAME, "
        "--dump [SCHEMA.]TABLE, or a bare --dump for the whole database (a database name may hold dots)",
    )
    p.add_argument("-o", "--output", type=Path, help="output file")
    p.add_argument(
        "--to",
        metavar="URL",
        help="restore into this running server instead of a file: postgresql://USER@HOST[:PORT]/DB, "
        "mariadb://USER@HOST/DB (?socket=PATH), ldap://HOST or ldapi://SOCKET; the password with --password-file",
    )
    p.add_argument("--as", dest="as_name", metavar="NAME", help="PostgreSQL: restore the table under this name")
    p.add_argument("--folder", help="mail: only this folder (INBOX, Archive ...; an mbox's folder is its file name)")
    p.add_argument("--from", dest="sender", help="mail: sender contains this text")
    p.add_argument("--subject", help="mail: subject contains this text")
    p.add_argument("--since", help="mail: sent on or after this day (2026-03-01)")
    p.add_argument("--until", help="mail: sent on or before this day")
    p.add_argument("--id", action="append", default=[], help="mail: this message (FOLDER/KEY from --list); repeatable")
    p.add_argument(
        "--export", action="store_true", help="mail, OpenLDAP: write what matches to -o FILE (mbox/eml, LDIF)"
    )
    p.add_argument("--format", choices=("mbox", "eml"), default="mbox", help="mail: export format (eml: one message)")
    p.add_argument("--restore-to", type=Path, metavar="MAILDIR", help="mail: add the matching messages to this Maildir")
    p.add_argument("--into-folder", metavar="NAME", help="mail: restore into this Maildir++ subfolder")
    p.add_argument("--filter", metavar="LDAP_FILTER", help="OpenLDAP: only entries matching, e.g. '(uid=ann)'")
    p.add_argument("--bind-dn", help="OpenLDAP: DN to bind as for --to")
    p.add_argument(
        "--password-file",
        type=Path,
        help="the --to server's password (PostgreSQL, MariaDB user; OpenLDAP --bind-dn): the file's first line",
    )
    p.set_defaults(func=cmd_items)


def cmd_items(args: argparse.Namespace) -> int:
    # No passphrase prompt: the repository is opened again by the FUSE view's own process, which cannot ask.
    target = service.Target.resolve(args.repo, args.point, key_source(args, interactive=False))
    work = args.work_dir or service.default_work_root()
    if args.kind is None:
        return _print_items(service.find_items(target), args.json)
    if args.kind == "postgres":
        return _postgres(args, target, work)
    if args.kind == "mariadb":
        return _mariadb(args, target, work)
    if args.kind == "openldap":
        return _openldap(args, target, work)
    if args.kind in ("mail", "maildir", "mbox"):
        return _mail(args, target, work)
    raise UsageError(f"'{args.kind}' items: only discovery is available yet (see docs/operations.md)")


def _print_items(items: list, as_json: bool) -> int:
    if not items and not as_json:
        print("no applications found")
    print_list(items, as_json, lambda i: f"{i.kind:9} {i.disk}:{i.volume:6} {i.version:10} {i.path}")
    return 0


def _postgres(args: argparse.Namespace, target: service.Target, work: Path) -> int:
    item = service.select(target, "postgres", args.path)
    if args.dump:
        specs, database = _dump_request(args)
        to = _server(args, "postgres")
        print(service.pg_dump(target, item, work, specs, args.output, to, args.as_name, database))
        return 0
    if not args.list:
        raise UsageError("postgres: give --list or --dump")
    _print_tables(service.pg_list(target, item, work, args.db, counts=not args.no_count), args.json)
    return 0


def _server(args: argparse.Namespace, kind: str) -> targets.ServerTarget | None:
    """--to, checked as the API checks it (but a Unix socket may be anywhere: the CLI's caller is root here)."""
    if args.to is None:
        return None
    password = targets.read_password_file(args.password_file) if args.password_file else None
    return targets.parse_server(kind, args.to, password, socket_dirs=None)


def _dump_request(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """``--dump DB.TABLE...``: tables; with ``--db NAME`` (whatever its name, dots included), ``--dump TABLE...``
    are tables of NAME and a bare ``--dump`` is the whole of it."""
    tables = [s for s in args.dump if s]
    if "" in args.dump and (tables or not args.db):
        raise UsageError("a bare --dump dumps the whole database named by --db NAME, and goes alone")
    return tables, args.db


def _mail(args: argparse.Namespace, target: service.Target, work: Path) -> int:
    kinds = service.MAIL_KINDS if args.kind == "mail" else (args.kind,)
    item = service.select(target, args.kind, args.path, kinds=kinds)
    flt = mail.Filter(
        folder=args.folder,
        sender=args.sender,
        subject=args.subject,
        since=mail.parse_day(args.since, "--since"),
        until=mail.parse_day(args.until, "--until"),
        ids=tuple(args.id),
    )
    if args.export:
        if args.output is None:
            raise UsageError("--export needs -o FILE")
        print(service.mail_export(target, item, work, flt, args.output, args.format))
        return 0
    if args.restore_to is not None:
        print(service.mail_restore(target, item, work, flt, args.restore_to, args.into_folder))
        return 0
    msgs = service.mail_list(target, item, work, flt)
    print_list(msgs, args.json, lambda m: f"{m.id:48} {minute(m.date):16} {m.sender[:30]:30} {m.subject}")
    return 0


def _mariadb(args: argparse.Namespace, target: service.Target, work: Path) -> int:
    item = service.select(target, "mariadb", args.path)
    if args.dump:
        specs, database = _dump_request(args)
        print(service.mariadb_dump(target, item, work, specs, args.output, _server(args, "mariadb"), database))
        return 0
    if not args.list:
        raise UsageError("mariadb: give --list or --dump")
    _print_tables(service.mariadb_list(target, item, work, args.db), args.json)
    return 0


def _print_tables(tables: list, as_json: bool) -> None:
    def line(t: Table) -> str:
        name = f"{t.schema}.{t.name}"
        rows = "-" if t.rows is None else f"{t.rows:,}"
        return f"{t.database:16} {name:32} {rows:>12} rows"

    print_list(tables, as_json, line)


def _openldap(args: argparse.Namespace, target: service.Target, work: Path) -> int:
    item = service.select(target, "openldap", args.path)
    if args.export:
        if args.output is None:
            raise UsageError("--export needs -o FILE")
        print(service.ldap_export(target, item, work, args.filter, args.output))
        return 0
    if args.to:
        if not args.bind_dn or not args.password_file:
            raise UsageError("--to needs --bind-dn and --password-file")
        print(service.ldap_restore(target, item, work, args.filter, _server(args, "openldap"), args.bind_dn))
        return 0
    print_list(service.ldap_entries(target, item, work, args.filter), args.json, lambda e: e.dn)
    return 0
