"""The admin page's application item recovery: pick a restore point, see its applications, open one (a
database's tables with row counts, a directory's entries, a mail store's messages) and download items through
the API's download routes (the login cookie authenticates them). Listing is GET (no state changes, no CSRF
token); "Restore to server" is a POST form with the session's CSRF token, run by the same function as the API's
restore routes, and its answer page shows what was done or one error line (never the password)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, render_template, request

from appliance.items import service
from web import backup_items as q
from web import daemon
from web import validation as field
from web.security import login_required
from web.validation import ApiError

bp = Blueprint("items_page", __name__)
OPENABLE = ("postgres", "mariadb", "openldap", "mail")


@bp.get("/items")
@login_required
def items() -> Any:
    repo = request.args.get("repository", "")
    ctx: dict[str, Any] = {"repository": repo, "point": request.args.get("point", ""), "error": None, "item": None}
    try:
        field.REPOSITORY.check(repo)
        tgt = q.target(repo)
        ctx["point"] = tgt.point
        kind = request.args.get("kind") or None
        if kind is None:
            with daemon.domain_errors():
                ctx["items"] = service.find_items(tgt)
        else:
            ctx.update(_open(tgt, kind))
    except ApiError as exc:
        ctx["error"], status = exc.message, exc.status
    else:
        status = 200
    return render_template("items.html", **ctx), status


def _open(tgt: service.Target, kind: str) -> dict[str, Any]:
    if kind not in OPENABLE:
        raise ApiError(400, f"kind: expected one of {', '.join(OPENABLE)}, got {kind[:40]!r}")
    item = q.select(tgt, kind)
    work = q.work_root()
    doc: dict[str, Any] = {"kind": kind, "item": item, "args": request.args}
    with daemon.domain_errors():
        if kind == "postgres":
            doc["tables"] = service.pg_list(tgt, item, work, q.database())
        elif kind == "mariadb":
            doc["tables"] = service.mariadb_list(tgt, item, work, q.database())
        elif kind == "openldap":
            found = service.ldap_entries(tgt, item, work, q.ldap_filter())
            doc["entries"], doc["total"] = found[: q.MAX_LISTED], len(found)
        else:
            found = service.mail_list(tgt, item, work, q.mail_filter())
            doc["messages"], doc["total"] = found[: q.MAX_LISTED], len(found)
    return doc


@bp.post("/items/restore")
@login_required
def restore() -> Any:
    ctx: dict[str, Any] = {"repository": request.form.get("repository", ""), "result": None, "error": None}
    ctx["kind"] = request.form.get("kind", "")
    try:
        field.REPOSITORY.check(ctx["repository"])
        ctx.update(q.run_restore(ctx["repository"], ctx["kind"]))
    except ApiError as exc:
        ctx["error"], status = exc.message, exc.status
    else:
        status = 200
    ctx.setdefault("point", request.form.get("point", ""))
    return render_template("items_restored.html", **ctx), status
