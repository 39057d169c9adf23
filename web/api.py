"""REST API under /api/v1: everything the admin page does, for scripts."""

from __future__ import annotations

from dataclasses import replace

from flask import Blueprint, Response, g, jsonify, request

from appliance import __version__
from web import backup_files, daemon
from web import validation as field
from web.exposure import nfs_open_to_everyone, nfs_warning
from web.metrics import render_metrics
from web.openapi import openapi_document
from web.security import api_auth, credentials
from web.validation import NAME, ApiError, check_path_params, json_body, query_flag

bp = Blueprint("api", __name__, url_prefix="/api/v1")
bp.url_value_preprocessor(check_path_params)


# --- open -----------------------------------------------------------------------------------------------
@bp.get("/health")
def health() -> tuple[Response, int]:
    """The one endpoint open without authentication (container HEALTHCHECK, load balancers)."""
    try:
        status = daemon.call("status")
        ok = True
    except ApiError as exc:
        status, ok = {"message": exc.message}, False
    body = {"status": "ok" if ok else "unavailable", "daemon": ok, "version": __version__}
    if ok:
        body["sessions"] = status["sessions"]
    return jsonify(body), 200 if ok else 503


# --- appliance ------------------------------------------------------------------------------------------
@bp.get("/openapi.json")
@api_auth
def openapi() -> Response:
    return jsonify(openapi_document())


@bp.get("/status")
@api_auth
def status() -> Response:
    doc = dict(daemon.status())
    doc["nfs_open_to_everyone"] = nfs_open_to_everyone(doc)  # the daemon's answer, else derived, else null
    doc["warnings"] = [w for w in (nfs_warning(doc),) if w]
    return jsonify(doc)


@bp.get("/metrics")
@api_auth
def metrics() -> Response:
    text = render_metrics(daemon.call("status"), daemon.call("sessions"), daemon.call("repositories"))
    return Response(text, mimetype="text/plain; version=0.0.4")


@bp.get("/exports")
@api_auth
def exports() -> Response:
    s = daemon.call("status")
    return jsonify(
        [
            {
                "path": s["export"],
                "host": s["host"],
                "allowed_networks": s["allowed_networks"],
                "ports": s["ports"],
                "url": f"nfs://{s['host']}{s['export']}",
            }
        ]
    )


@bp.get("/clients")
@api_auth
def clients() -> Response:
    return jsonify(daemon.call("clients"))


@bp.get("/cache")
@api_auth
def cache() -> Response:
    s = daemon.call("status")
    sessions = daemon.call("sessions")
    return jsonify(
        {
            **s["cache"],
            "sessions": [
                {
                    "id": x["id"],
                    "vm": x["vm"],
                    "mode": x["mode"],
                    "cache_dir": x["cache_dir"],
                    "used_bytes": x["cache_used_bytes"],
                    "changed_bytes": x["changed_bytes"],
                }
                for x in sessions
            ],
        }
    )


# --- repositories ---------------------------------------------------------------------------------------
@bp.get("/repositories")
@api_auth
def repositories() -> Response:
    return jsonify(daemon.call("repositories"))


@bp.get("/repositories/<name>")
@api_auth
def repository(name: str) -> Response:
    return jsonify(daemon.repository(name))


@bp.get("/repositories/<name>/points")
@api_auth
def points(name: str) -> Response:
    daemon.repository(name)
    vm = request.args.get("vm")
    if vm is not None and not NAME.fullmatch(vm):
        raise ApiError(400, f"vm: {vm!r} is not a valid VM name")
    return jsonify(daemon.call("points", repo=name, vm=vm))


@bp.get("/repositories/<name>/files")
@api_auth
def files(name: str) -> Response:
    return jsonify(backup_files.listing(name, *backup_files.query()))


@bp.get("/repositories/<name>/files/content")
@api_auth
def file_content(name: str) -> Response:
    return backup_files.download(name, *backup_files.query())


# --- sessions -------------------------------------------------------------------------------------------
@bp.get("/sessions")
@api_auth
def sessions() -> Response:
    return jsonify(daemon.call("sessions"))


@bp.post("/sessions")
@api_auth
def publish() -> tuple[Response, int]:
    body = json_body(field.VM, field.VMS, field.POINT, field.MODE, field.REPOSITORY, field.CACHE)
    vms = body["vms"] or []
    if not body["vm"] and not vms:
        raise ApiError(400, "vm: required (or 'vms' for several)")
    created = daemon.call(
        "publish",
        vm=body["vm"],
        vms=vms,
        point=body["point"],
        mode=body["mode"],
        cache=body["cache"],
        repo=body["repository"],
    )
    return jsonify(created), 201


# --- backup verification --------------------------------------------------------------------------------
@bp.get("/verifications")
@api_auth
def verifications() -> Response:
    return jsonify(daemon.call("verifications"))


@bp.post("/verifications")
@api_auth
def verify() -> tuple[Response, int]:
    body = json_body(
        replace(field.VM, required=True), field.POINT, field.REPOSITORY, field.EXPECT, field.TIMEOUT, field.MEMORY_MIB
    )
    job = daemon.call(
        "verify",
        vm=body["vm"],
        point=body["point"],
        repo=body["repository"],
        expect=body["expect"],
        timeout=body["timeout"],
        memory_mib=body["memory_mib"],
    )
    return jsonify(job), 202


@bp.get("/verifications/<vid>")
@api_auth
def verification(vid: str) -> Response:
    return jsonify(daemon.call("verification", id=vid))


@bp.get("/sessions/<sid>")
@api_auth
def session(sid: str) -> Response:
    return jsonify(daemon.call("session", id=sid))


@bp.delete("/sessions/<sid>")
@api_auth
def stop(sid: str) -> Response:
    return jsonify(daemon.call("stop", id=sid, force=query_flag("force")))


@bp.post("/sessions/<sid>/migration")
@api_auth
def migrate(sid: str) -> tuple[Response, int]:
    body = json_body(field.OUTPUT, field.OVERWRITE)
    return jsonify(daemon.call("migrate", id=sid, output=body["output"], overwrite=body["overwrite"])), 202


@bp.post("/sessions/<sid>/prefetch")
@api_auth
def prefetch(sid: str) -> tuple[Response, int]:
    json_body()  # it has no fields: one sent would be ignored, so it is refused
    return jsonify(daemon.call("prefetch", id=sid)), 202


@bp.get("/sessions/<sid>/migration")
@api_auth
def migration(sid: str) -> Response:
    doc = daemon.call("session", id=sid)
    if doc.get("migration") is None:
        raise ApiError(404, f"session {sid} has no migration; start one with POST .../migration")
    return jsonify(doc["migration"])


# --- API tokens -----------------------------------------------------------------------------------------
@bp.get("/tokens")
@api_auth
def tokens() -> Response:
    return jsonify(credentials().tokens())


@bp.post("/tokens")
@api_auth
def create_token() -> tuple[Response, int]:
    body = json_body(field.TOKEN_NAME)
    return jsonify(credentials().create_token(body["name"])), 201


@bp.delete("/tokens/<token_id>")
@api_auth
def revoke_token(token_id: str) -> Response:
    if not credentials().revoke_token(token_id):
        raise ApiError(404, f"no token with id {token_id!r}")
    return jsonify({"id": token_id, "revoked": True, "by": g.who})
