"""Application item recovery from the command line: ``bootback items REPO VM@POINT`` lists the applications inside
a restore point; ``bootback items REPO VM@POINT postgres --list`` and friends act on one of them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from appliance.errors import UsageError
from appliance.items import KINDS, service


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "items",
        help="find applications (PostgreSQL, MariaDB, OpenLDAP, mail) in a restore point; list, dump, restore items",
    )
    p.add_argument("repo", type=Path)
    p.add_argument("point", metavar="VM[@POINT]")
    p.add_argument("kind", nargs="?", choices=[*KINDS, "mail"], help="act on one application of this kind")
    p.add_argument("--path", help="which one, when there are several: its path as listed")
    p.add_argument("--json", action="store_true")
    p.add_argument("--work-dir", type=Path, help="where private views and servers live (default STATE/items)")
    p.add_argument("--list", action="store_true", help="list databases/tables, or messages")
    p.add_argument("--db", help="PostgreSQL: only this database in --list")
    p.add_argument(
        "--dump",
        action="append",
        metavar="DB[.SCHEMA.TABLE]",
        help="PostgreSQL: dump a database, or a table (repeat for several tables of one database)",
    )
    p.add_argument("-o", "--output", type=Path, help="output file")
    p.add_argument("--to", metavar="URL", help="PostgreSQL: restore into this running server instead of a file")
    p.add_argument("--as", dest="as_name", metavar="NAME", help="PostgreSQL: restore the table under this name")
    p.set_defaults(func=cmd_items)


def cmd_items(args: argparse.Namespace) -> int:
    target = service.Target.resolve(args.repo, args.point)
    work = args.work_dir or service.default_work_root()
    if args.kind is None:
        return _print_items(service.find_items(target), args.json)
    if args.kind == "postgres":
        return _postgres(args, target, work)
    raise UsageError(f"'{args.kind}' items: only discovery is available yet (see docs/operations.md)")


def _print_items(items: list, as_json: bool) -> int:
    if as_json:
        print(json.dumps([i.to_json() for i in items], indent=2))
        return 0
    if not items:
        print("no applications found")
    for i in items:
        print(f"{i.kind:9} {i.disk}:{i.volume:6} {i.version:10} {i.path}")
    return 0


def _postgres(args: argparse.Namespace, target: service.Target, work: Path) -> int:
    item = service.select(target, "postgres", args.path)
    if args.dump:
        print(service.pg_dump(target, item, work, args.dump, args.output, args.to, args.as_name))
        return 0
    if not args.list:
        raise UsageError("postgres: give --list or --dump")
    tables = service.pg_list(target, item, work, args.db)
    if args.json:
        print(json.dumps([t.to_json() for t in tables], indent=2))
        return 0
    for t in tables:
        name = f"{t.schema}.{t.name}"
        print(f"{t.database:16} {name:32} {t.rows:>12,} rows")
    return 0
