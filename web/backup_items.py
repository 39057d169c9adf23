"""Application item recovery for the API (and the admin page, which reads its query the same way): the
applications inside a restore point; PostgreSQL and MariaDB databases and tables, dumped as SQL; OpenLDAP
entries, searched and exported as LDIF; mail messages, searched and exported as .eml or mbox. Every query field
is checked here, once, with one error naming it. The web app runs ``appliance.items.service`` itself (as the CLI
does), with its work directory under the state directory; the daemon is asked only where the repository is.

Restores (POST, the same fields as the GETs plus the target) put items into a running PostgreSQL, MariaDB or
slapd, or a Maildir under the operator's restore root. The target is checked by ``appliance.items.targets``, as
the CLI's ``--to`` is; its password comes only in the body (``password``), or as the name of an operator's file
(``password_ref``), never in the URL, whose query the access log keeps, and it never appears in an answer."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from urllib.parse import quote

from flask import Blueprint, Response, current_app, g, jsonify, request
from werkzeug.datastructures import MultiDict

from appliance.errors import BootbackError, ItemRecoveryError
from appliance.items import mail, service, targets
from appliance.items.discovery import Item
from web import daemon
from web.security import api_auth
from web.validation import NAME, ApiError, check_path_params, json_object

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
def fields() -> MultiDict:
    """The request's fields: a GET's query; a POST's body, a JSON object (a list for a repeated field) or a form.
    A password is refused in any query: URLs are logged."""
    if "password" in request.args or "password_ref" in request.args:
        raise ApiError(400, "password: send it in the request body, never in the URL (URLs are logged)")
    if request.method == "GET":
        return request.args
    if "item_fields" not in g:
        g.item_fields = _body_fields()
    return g.item_fields


def _body_fields() -> MultiDict:
    if not request.is_json:
        return MultiDict((k, v) for k, v in request.form.items(multi=True) if v != "" and k != "csrf_token")
    pairs: list[tuple[str, str]] = []
    for key, value in json_object().items():
        values = value if isinstance(value, list) else [value]
        if value is None:
            continue
        if len(values) > MAX_SPECS or not all(isinstance(v, str) for v in values):
            raise ApiError(400, f"{key[:40]!r}: expected a string or a list of at most {MAX_SPECS} strings")
        if not all(_utf8(v) for v in values):  # JSON may carry lone surrogates, which no tool could be given
            raise ApiError(400, f"{key[:40]!r}: not valid Unicode text")
        pairs += [(key, v) for v in values if v != ""]
    return MultiDict(pairs)


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def target(repo_name: str) -> service.Target:
    point = fields().get("point", "")
    if not NAME.fullmatch(point):
        raise ApiError(400, f"point: expected VM or VM@POINT, got {point[:100]!r}")
    with daemon.domain_errors():
        return service.Target.resolve(daemon.repository(repo_name)["path"], point)


def item_path() -> str | None:
    path = fields().get("path") or None
    if path is not None and (not path.startswith("/") or len(path) > 4096 or "\x00" in path):
        raise ApiError(400, f"path: expected an absolute path such as /var/lib/postgresql/15/main, got {path[:100]!r}")
    return path


def database() -> str | None:
    db = fields().get("db") or None
    if db is not None and not SPEC.fullmatch(db):
        raise ApiError(400, f"db: {db[:100]!r} is not a database name")
    return db


def counts() -> bool:
    value = fields().get("count", "1")
    if value not in ("0", "1"):
        raise ApiError(400, f"count: expected 1 (count rows) or 0 (catalogs only), got {value[:20]!r}")
    return value == "1"


def dump_request() -> tuple[list[str], str | None]:
    """``dump=DB.[SCHEMA.]TABLE`` (repeated: tables of one database); or ``db=NAME`` (whatever its name, dots
    included) alone for the whole database, or with ``dump=[SCHEMA.]TABLE`` for tables of it."""
    specs, db = fields().getlist("dump"), database()
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
    flt = fields().get("filter") or None
    if flt is not None and not LDAP_FILTER.fullmatch(flt):
        raise ApiError(400, f"filter: expected an LDAP filter in parentheses such as (uid=ann), got {flt[:100]!r}")
    return flt


def _text(field: str) -> str | None:
    value = fields().get(field) or None
    if value is not None and not TEXT.fullmatch(value):
        raise ApiError(400, f"{field}: expected 1 to 200 printable characters, got {value[:100]!r}")
    return value


def _day(field: str) -> date | None:
    value = fields().get(field) or None
    if value is None:
        return None
    try:
        if not DAY.fullmatch(value):
            raise ValueError(value)
        return date.fromisoformat(value)
    except ValueError:
        raise ApiError(400, f"{field}: expected a day such as 2026-03-01, got {value[:40]!r}") from None


def mail_filter() -> mail.Filter:
    ids = fields().getlist("id")
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
    fmt = fields().get("format", "mbox")
    if fmt not in ("mbox", "eml"):
        raise ApiError(400, f"format: expected mbox or eml, got {fmt[:20]!r}")
    return fmt


def listed(tgt: service.Target, item: Item, key: str, found: list) -> Response:
    """The first ``MAX_LISTED`` of ``found`` under ``key``, how many matched, and whether that is all of them."""
    shown = [x.to_json() for x in found[:MAX_LISTED]]
    return jsonify(
        {"point": tgt.point, "path": item.path, key: shown, "total": len(found), "truncated": len(found) > MAX_LISTED}
    )


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
    return listed(tgt, item, "entries", entries)


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
    return listed(tgt, item, "messages", msgs)


@bp.get("/mail/export")
@api_auth
def mail_export(name: str) -> Response:
    tgt = target(name)
    flt, fmt = mail_filter(), mail_format()
    item = select(tgt, "mail")
    filename = "message.eml" if fmt == "eml" else "messages.mbox"
    mimetype = "message/rfc822" if fmt == "eml" else "application/mbox"
    return download(lambda out: service.mail_export(tgt, item, work_root(), flt, out, fmt), filename, mimetype)


# Restores (POST) ------------------------------------------------------------------------------------------
RESTORE_KINDS = ("postgres", "mariadb", "openldap", "mail")
STATUS = ((targets.TargetConflictError, 409), (targets.TargetLoginError, 422))


def restore_root() -> Path:
    """Where Maildir restores go: ITEMS_RESTORE_ROOT, $BOOTBACK_ITEMS_RESTORE_ROOT, or STATE/items-restore."""
    configured = current_app.config.get("ITEMS_RESTORE_ROOT") or os.environ.get(targets.RESTORE_ROOT_ENV)
    return Path(configured or Path(current_app.config["STATE_DIR"]) / "items-restore")


def socket_dirs() -> tuple[Path, ...]:
    configured = current_app.config.get("ITEMS_SOCKET_DIRS")
    return tuple(Path(p) for p in configured) if configured is not None else targets.socket_dirs_from_env()


def secrets_dir() -> Path:
    configured = current_app.config.get("ITEMS_SECRETS") or os.environ.get(targets.SECRETS_ENV)
    return Path(configured or Path(current_app.config["STATE_DIR"]) / "items-secrets")


def _required(name: str) -> str:
    value = fields().get(name)
    if not value:
        raise ApiError(400, f"{name}: required")
    return value


def server_target(kind: str) -> targets.ServerTarget:
    """``to`` and its password (``password``, or ``password_ref`` naming a file in the secrets directory)."""
    url, password, ref = _required("to"), fields().get("password"), fields().get("password_ref")
    if password is not None and ref is not None:
        raise ApiError(400, "password: give password or password_ref, not both")
    with _restore_errors():
        if ref is not None:
            password = targets.read_password_ref(ref, secrets_dir())
        return targets.parse_server(kind, url, password, socket_dirs(), "to", password_in_url=False)


@contextmanager
def _restore_errors() -> Iterator[None]:
    """400 for a bad request, 409 when the target already has what would be restored, 422 when it cannot be
    reached or refuses the login: in every case nothing was written to it."""
    try:
        yield
    except ItemRecoveryError as exc:
        status = next((code for cls, code in STATUS if isinstance(exc, cls)), 400)
        raise ApiError(status, str(exc)) from None
    except BootbackError as exc:
        raise daemon.translate(exc) from None


def run_restore(repo_name: str, kind: str) -> dict[str, str]:
    """One restore as the request's fields say (the API's and the page's): what was done."""
    if kind not in RESTORE_KINDS:
        raise ApiError(400, f"kind: expected one of {', '.join(RESTORE_KINDS)}, got {kind[:40]!r}")
    tgt = target(repo_name)
    work = work_root()
    if kind in DB_KINDS:
        specs, db = dump_request()
        as_name = _text("as")
        if as_name is not None and kind != "postgres":
            raise ApiError(400, "as: only a PostgreSQL table is restored under another name")
        to = server_target(kind)
        item = select(tgt, kind)
        with _restore_errors():
            if kind == "postgres":
                done = service.pg_dump(tgt, item, work, specs, to=to, as_name=as_name, database=db)
            else:
                done = service.mariadb_dump(tgt, item, work, specs, to=to, database=db)
    elif kind == "openldap":
        flt, bind_dn = ldap_filter(), _required("bind_dn")
        with _restore_errors():
            targets.check_name("bind_dn", bind_dn)
        to = server_target(kind)
        if to.password is None:
            raise ApiError(400, "password: an LDAP restore needs the bind password (password or password_ref)")
        item = select(tgt, kind)
        with _restore_errors():
            done = service.ldap_restore(tgt, item, work, flt, to, bind_dn)
    else:
        flt, folder = mail_filter(), _text("into_folder")
        with _restore_errors():
            mail.check_folder(folder)
            dest = targets.maildir_under(restore_root(), _required("restore_to"))
        item = select(tgt, kind)
        with _restore_errors():
            done = service.mail_restore(tgt, item, work, flt, dest, folder, parents=True)
    return {"point": tgt.point, "path": item.path, "result": done}


@bp.post("/postgres/restore", defaults={"kind": "postgres"})
@bp.post("/mariadb/restore", defaults={"kind": "mariadb"})
@bp.post("/openldap/restore", defaults={"kind": "openldap"})
@bp.post("/mail/restore", defaults={"kind": "mail"})
@api_auth
def restore(name: str, kind: str) -> Response:
    """Items into a running server (``to``) or a Maildir under the restore root (``restore_to``)."""
    return jsonify(run_restore(name, kind))


def openapi_paths(repo: dict) -> dict:
    """The restore routes for web/openapi.py: a JSON body with the GETs' fields and the target."""
    text = {"type": "string", "maxLength": 200}
    many = {"oneOf": [text, {"type": "array", "items": text, "maxItems": MAX_SPECS}]}
    common = {"point": text, "path": {"type": "string", "pattern": "^/"}}
    server = {
        "to": {"type": "string", "description": "postgresql://USER@HOST[:PORT]/DB, mariadb://..., ldap(s|i)://..."},
        "password": {"type": "string", "writeOnly": True, "description": "never in the URL; never answered"},
        "password_ref": {"type": "string", "description": "a file name in the operator's secrets directory"},
    }
    bodies = {
        "postgres": {**common, "db": text, "dump": many, "as": text, **server},
        "mariadb": {**common, "db": text, "dump": many, **server},
        "openldap": {**common, "filter": {"type": "string", "maxLength": 1000}, "bind_dn": text, **server},
        "mail": {
            **common,
            **{k: text for k in ("folder", "from", "subject", "into_folder")},
            **{k: {"type": "string", "format": "date"} for k in ("since", "until")},
            "id": many,
            "restore_to": {"type": "string", "description": "a Maildir path relative to the restore root"},
        },
    }
    required = {"postgres": ["point", "to"], "mariadb": ["point", "to"], "openldap": ["point", "to", "bind_dn"]}
    answer = {"description": "What was restored", "content": {"application/json": {"schema": {"type": "object"}}}}
    error = {"description": "Nothing was written to the target", "content": {"application/json": {}}}
    paths = {}
    for kind, props in bodies.items():
        schema = {"type": "object", "properties": props, "required": required.get(kind, ["point", "restore_to"])}
        paths[f"/api/v1/repositories/{{name}}/items/{kind}/restore"] = {
            "post": {
                "summary": f"Restore {kind} items into a running server or the restore root",
                "parameters": [repo],
                "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
                "responses": {
                    "200": answer,
                    "400": {**error, "description": "Invalid request; the message names the field"},
                    "401": {**error, "description": "Not authenticated"},
                    "409": {**error, "description": "The target already has it: nothing was written"},
                    "422": {**error, "description": "The target is unreachable or refused the login"},
                },
            }
        }
    return paths


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
