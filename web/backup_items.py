"""Application item recovery for the API (and the admin page, which reads its query the same way): the
applications inside a restore point; PostgreSQL and MariaDB databases and tables, dumped as SQL; OpenLDAP
entries, searched and exported as LDIF; mail messages, searched and exported as .eml or mbox. Every query field
is checked here, once, with one error naming it. The web app runs ``appliance.items.service`` itself (as the CLI
does), with its work directory under the state directory; the daemon is asked only where the repository is.
Restoring into running servers stays with the CLI: it reaches out to other servers with their credentials."""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from urllib.parse import quote

from flask import Blueprint, Response, current_app, jsonify, request

from appliance.items import mail, service
from appliance.items.discovery import Item
from web import daemon
from web.security import api_auth
from web.validation import NAME, ApiError, check_path_params

bp = Blueprint("items_api", __name__, url_prefix="/api/v1/repositories/<name>/items")
bp.url_value_preprocessor(check_path_params)
SPEC = re.compile(r"[^\x00-\x1f/]{1,200}")  # a database name, or DB.[SCHEMA.]TABLE: no control characters
TEXT = re.compile(r"[^\x00-\x1f\x7f]{1,200}")  # a search text: any printable characters
LDAP_FILTER = re.compile(r"\([^\x00-\x1f\x7f]{1,998}\)")
DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
MAIL_ID = re.compile(r"[^\x00-\x1f\x7f]{1,300}")
MAX_SPECS = 64
MAX_LISTED = 1000  # entries or messages in one answer: a store of 100,000 is narrowed by the search fields
PIECE = 1 << 20
DB_KINDS = ("postgres", "mariadb")


# The query, field by field --------------------------------------------------------------------------------
def target(repo_name: str) -> service.Target:
    point = request.args.get("point", "")
    if not NAME.fullmatch(point):
        raise ApiError(400, f"point: expected VM or VM@POINT, got {point[:100]!r}")
    with daemon.domain_errors():
        return service.Target.resolve(daemon.repository(repo_name)["path"], point)


def item_path() -> str | None:
    path = request.args.get("path") or None
    if path is not None and (not path.startswith("/") or len(path) > 4096 or "\x00" in path):
        raise ApiError(400, f"path: expected an absolute path such as /var/lib/postgresql/15/main, got {path[:100]!r}")
    return path


def database() -> str | None:
    db = request.args.get("db") or None
    if db is not None and not SPEC.fullmatch(db):
        raise ApiError(400, f"db: {db[:100]!r} is not a database name")
    return db


def counts() -> bool:
    value = request.args.get("count", "1")
    if value not in ("0", "1"):
        raise ApiError(400, f"count: expected 1 (count rows) or 0 (catalogs only), got {value[:20]!r}")
    return value == "1"


def dump_request() -> tuple[list[str], str | None]:
    """``dump=DB.[SCHEMA.]TABLE`` (repeated: tables of one database); or ``db=NAME`` (whatever its name, dots
    included) alone for the whole database, or with ``dump=[SCHEMA.]TABLE`` for tables of it."""
    specs, db = request.args.getlist("dump"), database()
    if len(specs) > MAX_SPECS or (db is None and not specs):
        raise ApiError(
            400, f"dump: expected 1 to {MAX_SPECS} of DB.TABLE or DB.SCHEMA.TABLE, or db=NAME, got {len(specs)}"
        )
    for spec in specs:
        if not SPEC.fullmatch(spec) or (db is None and "." not in spec):
            raise ApiError(
                400, f"dump: expected DB.TABLE or DB.SCHEMA.TABLE (a whole database: db=NAME), got {spec[:100]!r}"
            )
    return specs, db


def ldap_filter() -> str | None:
    flt = request.args.get("filter") or None
    if flt is not None and not LDAP_FILTER.fullmatch(flt):
        raise ApiError(400, f"filter: expected an LDAP filter in parentheses such as (uid=ann), got {flt[:100]!r}")
    return flt


def _text(field: str) -> str | None:
    value = request.args.get(field) or None
    if value is not None and not TEXT.fullmatch(value):
        raise ApiError(400, f"{field}: expected 1 to 200 printable characters, got {value[:100]!r}")
    return value


def _day(field: str) -> date | None:
    value = request.args.get(field) or None
    if value is None:
        return None
    try:
        if not DAY.fullmatch(value):
            raise ValueError(value)
        return date.fromisoformat(value)
    except ValueError:
        raise ApiError(400, f"{field}: expected a day such as 2026-03-01, got {value[:40]!r}") from None


def mail_filter() -> mail.Filter:
    ids = request.args.getlist("id")
    if len(ids) > MAX_SPECS:
        raise ApiError(400, f"id: at most {MAX_SPECS} messages, got {len(ids)}")
    for i in ids:
        if not MAIL_ID.fullmatch(i):
            raise ApiError(400, f"id: expected FOLDER/KEY as listed, got {i[:100]!r}")
    return mail.Filter(
        folder=_text("folder"),
        sender=_text("from"),
        subject=_text("subject"),
        since=_day("since"),
        until=_day("until"),
        ids=tuple(ids),
    )


def mail_format() -> str:
    fmt = request.args.get("format", "mbox")
    if fmt not in ("mbox", "eml"):
        raise ApiError(400, f"format: expected mbox or eml, got {fmt[:20]!r}")
    return fmt


def listed(found: list) -> dict[str, int | bool]:
    """How many matched, and whether the answer shows only the first ``MAX_LISTED`` of them."""
    return {"total": len(found), "truncated": len(found) > MAX_LISTED}


def work_root() -> Path:
    return Path(current_app.config["STATE_DIR"]) / "items"


def select(tgt: service.Target, kind: str) -> Item:
    kinds = service.MAIL_KINDS if kind == "mail" else None
    with daemon.domain_errors():
        return service.select(tgt, kind, item_path(), kinds=kinds)


# Routes ---------------------------------------------------------------------------------------------------
@bp.get("")
@api_auth
def items(name: str) -> Response:
    tgt = target(name)
    with daemon.domain_errors():
        found = service.find_items(tgt, item_path())
    return jsonify({"point": tgt.point, "items": [i.to_json() for i in found]})


@bp.get("/postgres/databases", defaults={"kind": "postgres"})
@bp.get("/mariadb/databases", defaults={"kind": "mariadb"})
@api_auth
def databases(name: str, kind: str) -> Response:
    tgt = target(name)
    item = select(tgt, kind)
    with daemon.domain_errors():
        if kind == "postgres":
            names = service.pg_databases(tgt, item, work_root())
        else:
            names = service.mariadb_databases(tgt, item, work_root())
    return jsonify({"point": tgt.point, "path": item.path, "databases": names})


@bp.get("/postgres/tables", defaults={"kind": "postgres"})
@bp.get("/mariadb/tables", defaults={"kind": "mariadb"})
@api_auth
def tables(name: str, kind: str) -> Response:
    tgt = target(name)
    db, count = database(), counts()
    item = select(tgt, kind)
    with daemon.domain_errors():
        if kind == "postgres":
            found = service.pg_list(tgt, item, work_root(), db, count)
        else:
            found = service.mariadb_list(tgt, item, work_root(), db, count)
    return jsonify({"point": tgt.point, "path": item.path, "tables": [t.to_json() for t in found]})


@bp.get("/postgres/dump", defaults={"kind": "postgres"})
@bp.get("/mariadb/dump", defaults={"kind": "mariadb"})
@api_auth
def dump(name: str, kind: str) -> Response:
    """``db=NAME`` (a whole database; with ``dump=[SCHEMA.]TABLE``, tables of it), or ``dump=DB.[SCHEMA.]TABLE``
    (repeated for several tables of one database): plain SQL, made whole before the first byte is sent."""
    tgt = target(name)
    specs, db = dump_request()
    item = select(tgt, kind)
    run = service.pg_dump if kind == "postgres" else service.mariadb_dump
    if db is not None:
        filename = f"{db}.{specs[0]}.sql" if len(specs) == 1 else f"{db}-tables.sql" if specs else f"{db}.sql"
    else:
        filename = f"{specs[0]}.sql" if len(specs) == 1 else f"{specs[0].partition('.')[0]}-tables.sql"
    return download(lambda out: run(tgt, item, work_root(), specs, out=out, database=db), filename, "application/sql")


@bp.get("/openldap/entries")
@api_auth
def ldap_entries(name: str) -> Response:
    tgt = target(name)
    flt = ldap_filter()
    item = select(tgt, "openldap")
    with daemon.domain_errors():
        entries = service.ldap_entries(tgt, item, work_root(), flt)
    shown = [e.to_json() for e in entries[:MAX_LISTED]]
    return jsonify({"point": tgt.point, "path": item.path, "entries": shown, **listed(entries)})


@bp.get("/openldap/export")
@api_auth
def ldap_export(name: str) -> Response:
    tgt = target(name)
    flt = ldap_filter()
    item = select(tgt, "openldap")
    return download(lambda out: service.ldap_export(tgt, item, work_root(), flt, out), "entries.ldif", "text/plain")


@bp.get("/mail/messages")
@api_auth
def mail_messages(name: str) -> Response:
    tgt = target(name)
    flt = mail_filter()
    item = select(tgt, "mail")
    with daemon.domain_errors():
        msgs = service.mail_list(tgt, item, work_root(), flt)
    shown = [m.to_json() for m in msgs[:MAX_LISTED]]
    return jsonify({"point": tgt.point, "path": item.path, "messages": shown, **listed(msgs)})


@bp.get("/mail/export")
@api_auth
def mail_export(name: str) -> Response:
    tgt = target(name)
    flt, fmt = mail_filter(), mail_format()
    item = select(tgt, "mail")
    filename = "message.eml" if fmt == "eml" else "messages.mbox"
    mimetype = "message/rfc822" if fmt == "eml" else "application/mbox"
    return download(lambda out: service.mail_export(tgt, item, work_root(), flt, out, fmt), filename, mimetype)


# Downloads ------------------------------------------------------------------------------------------------
def download(make: Callable[[Path], object], filename: str, mimetype: str) -> Response:
    """``make(out)`` writes the whole file into a private scratch directory under STATE/items (every check
    that can fail runs before the first byte is sent); the response streams it and then deletes it."""
    work_root().mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="download-", dir=work_root()))
    try:
        out = scratch / "out"
        with daemon.domain_errors():
            make(out)
        size = out.stat().st_size
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    headers = {
        "Content-Disposition": f"attachment; filename*=UTF-8''{quote(filename)}",
        "Content-Length": str(size),
    }
    return Response(_stream_then_delete(out, scratch), mimetype=mimetype, headers=headers)


def _stream_then_delete(path: Path, scratch: Path) -> Iterator[bytes]:
    try:
        with open(path, "rb") as fh:
            while piece := fh.read(PIECE):
                yield piece
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
