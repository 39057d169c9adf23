"""Application item recovery for the API: the applications inside a restore point, a PostgreSQL cluster's tables,
and a table or database dump as a download. The web app runs ``appliance.items.service`` itself (as the CLI
does), with its work directory under the state directory; the daemon is asked only where the repository is."""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from flask import Blueprint, Response, current_app, jsonify, request

from appliance.items import service
from web import daemon
from web.security import api_auth
from web.validation import NAME, ApiError, check_path_params

bp = Blueprint("items_api", __name__, url_prefix="/api/v1/repositories/<name>/items")
bp.url_value_preprocessor(check_path_params)
SPEC = re.compile(r"[^\x00-\x1f/]{1,200}")  # DB[.SCHEMA.TABLE]: PostgreSQL names, no control characters
PIECE = 1 << 20


def _target(name: str) -> service.Target:
    point = request.args.get("point", "")
    if not NAME.fullmatch(point):
        raise ApiError(400, f"point: expected VM or VM@POINT, got {point[:100]!r}")
    with daemon.domain_errors():
        return service.Target.resolve(daemon.repository(name)["path"], point)


def _path() -> str | None:
    path = request.args.get("path")
    if path is not None and (not path.startswith("/") or len(path) > 4096 or "\x00" in path):
        raise ApiError(400, f"path: expected an absolute path such as /var/lib/postgresql/15/main, got {path[:100]!r}")
    return path


def _work() -> Path:
    return Path(current_app.config["STATE_DIR"]) / "items"


@bp.get("")
@api_auth
def items(name: str) -> Response:
    target = _target(name)
    with daemon.domain_errors():
        found = service.find_items(target)
    return jsonify({"point": target.point, "items": [i.to_json() for i in found]})


@bp.get("/postgres/tables")
@api_auth
def postgres_tables(name: str) -> Response:
    target = _target(name)
    db = request.args.get("db") or None
    if db is not None and not SPEC.fullmatch(db):
        raise ApiError(400, f"db: {db[:100]!r} is not a database name")
    with daemon.domain_errors():
        item = service.select(target, "postgres", _path())
        tables = service.pg_list(target, item, _work(), db)
    return jsonify({"point": target.point, "path": item.path, "tables": [t.to_json() for t in tables]})


@bp.get("/postgres/dump")
@api_auth
def postgres_dump(name: str) -> Response:
    """``dump=DB`` or ``dump=DB.[SCHEMA.]TABLE``: plain SQL, made whole before the first byte is sent."""
    target = _target(name)
    spec = request.args.get("dump", "")
    if not SPEC.fullmatch(spec):
        raise ApiError(400, f"dump: expected DB, DB.TABLE or DB.SCHEMA.TABLE, got {spec[:100]!r}")
    _work().mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="download-", dir=_work()))
    try:
        out = scratch / "dump.sql"
        with daemon.domain_errors():
            item = service.select(target, "postgres", _path())
            service.pg_dump(target, item, _work(), [spec], out=out)
        size = out.stat().st_size
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    filename = quote(f"{spec}.sql")
    headers = {"Content-Disposition": f"attachment; filename*=UTF-8''{filename}", "Content-Length": str(size)}
    return Response(_stream_then_delete(out, scratch), mimetype="application/sql", headers=headers)


def _stream_then_delete(path: Path, scratch: Path) -> Iterator[bytes]:
    try:
        with open(path, "rb") as fh:
            while piece := fh.read(PIECE):
                yield piece
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
