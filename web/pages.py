"""The admin page: server-rendered views over the same daemon operations as the API."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, abort, current_app, flash, redirect, render_template, request, session, url_for

from web import backup_files, daemon
from web.security import credentials, csrf_token, login_required
from web.validation import NAME, ApiError

bp = Blueprint("pages", __name__)

MAX_FAILURES, WINDOW = 5, 300.0


def _failures() -> dict[str, list[float]]:
    """Failed logins per client address (per worker process): slows down password guessing."""
    return current_app.extensions.setdefault("bootback_login_failures", defaultdict(list))


@bp.app_template_global()
def csrf() -> str:
    return csrf_token()


@bp.app_template_filter("size")
def human_size(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    if request.method == "POST":
        addr = request.remote_addr or "?"
        recent = [t for t in _failures()[addr] if t > time.time() - WINDOW]
        _failures()[addr] = recent
        if len(recent) >= MAX_FAILURES:
            return render_template("login.html", error="Too many failed logins; wait a few minutes."), 429
        sent = request.form.get("csrf_token", "")
        if not sent or sent != session.get("csrf"):
            return render_template("login.html", error="The login form expired; try again."), 400
        user, password = request.form.get("username", ""), request.form.get("password", "")
        if credentials().check_password(user, password):
            session.clear()
            session.permanent = True
            session["user"] = user
            csrf_token()
            target = request.args.get("next", "")
            # Only local paths: no open redirect through ?next=
            local = target.startswith("/") and not target.startswith("//")
            return redirect(target if local else url_for("pages.index"))
        recent.append(time.time())
        return render_template("login.html", error="Wrong user name or password."), 401
    return render_template("login.html")


@bp.post("/logout")
@login_required
def logout() -> Response:
    session.clear()
    return redirect(url_for("pages.login"))


@bp.get("/")
@login_required
def index() -> Any:
    ctx: dict[str, Any] = {"error": None}
    try:
        ctx["status"] = daemon.call("status")
        ctx["repositories"] = daemon.call("repositories")
        ctx["points"] = {r["name"]: list(reversed(daemon.call("points", repo=r["name"]))) for r in ctx["repositories"]}
        ctx["sessions"] = daemon.call("sessions")
        ctx["verifications"] = daemon.call("verifications")[:20]
    except ApiError as exc:
        ctx["error"] = exc.message
    ctx["tokens"] = credentials().tokens()
    return render_template("dashboard.html", **ctx)


@bp.post("/sessions")
@login_required
def publish() -> Response:
    f = request.form
    vm, point, mode, repo = f.get("vm", ""), f.get("point", "latest"), f.get("mode", ""), f.get("repository") or None
    if not NAME.match(vm) or not NAME.match(point) or mode not in ("instant", "sandbox"):
        flash("Choose a VM, a restore point and a mode.", "error")
        return redirect(url_for("pages.index"))

    def start() -> str:
        (doc,) = daemon.call("publish", vm=vm, point=point, mode=mode, repo=repo)
        return f"{mode.capitalize()} session {doc['id']} started: {doc['vm']} is at {doc['nfs_url']}"

    return _act(start, f"Could not publish {vm}")


@bp.post("/verifications")
@login_required
def verify() -> Response:
    f = request.form
    vm, point, repo, expect = f.get("vm", ""), f.get("point", "latest"), f.get("repository") or None, f.get("expect")
    if not NAME.match(vm) or not NAME.match(point):
        flash("Choose a VM and a restore point.", "error")
        return redirect(url_for("pages.index"))

    def start() -> str:
        job = daemon.call("verify", vm=vm, point=point, repo=repo, expect=(expect or "").strip() or None)
        return f"Verification of {vm}@{job['point']} started: it boots as a sandbox without network."

    return _act(start, f"Could not verify {vm}")


def _act(action: Callable[[], str], failure: str) -> Response:
    """Run a daemon action for a form, flash its outcome, and go back to the page (post/redirect/get)."""
    try:
        flash(action(), "ok")
    except ApiError as exc:
        flash(f"{failure}: {exc.message}", "error")
    return redirect(url_for("pages.index"))


@bp.post("/sessions/<sid>/stop")
@login_required
def stop(sid: str) -> Response:
    force = request.form.get("force") == "on"

    def stop_it() -> str:
        daemon.call("stop", id=sid, force=force)
        return f"Session {sid} stopped."

    return _act(stop_it, f"Could not stop {sid}")


@bp.post("/sessions/<sid>/migrate")
@login_required
def migrate(sid: str) -> Response:
    output = request.form.get("output", "").strip()
    if not output.startswith("/"):
        flash("Migration target: give an absolute path on the appliance.", "error")
        return redirect(url_for("pages.index"))

    def start() -> str:
        daemon.call("migrate", id=sid, output=output)
        return f"Migration of {sid} to {output} started."

    return _act(start, f"Could not migrate {sid}")


@bp.post("/tokens")
@login_required
def create_token() -> Response:
    try:
        tok = credentials().create_token(request.form.get("name", "").strip())
        flash(f"API token '{tok['name']}' created; copy it now, it is not shown again: {tok['token']}", "token")
    except Exception as exc:  # noqa: BLE001 - UsageError with a message for the user
        flash(str(exc), "error")
    return redirect(url_for("pages.index"))


@bp.post("/tokens/<token_id>/revoke")
@login_required
def revoke_token(token_id: str) -> Response:
    if not credentials().revoke_token(token_id):
        abort(404)
    flash("Token revoked.", "ok")
    return redirect(url_for("pages.index"))


@bp.get("/files")
@login_required
def files() -> Any:
    """Browse a restore point's disk and download files or folders (file-level recovery)."""
    repo = request.args.get("repository", "")
    ctx: dict[str, Any] = {"repository": repo, "error": None, "doc": None, "disks": []}
    try:
        point, disk, path = backup_files.query()
        ctx.update(point=point, disk=disk, path=path, crumbs=_crumbs(path))
        vm, _, pid = point.partition("@")
        points = daemon.call("points", repo=repo, vm=vm)  # oldest first
        if pid in ("", "latest"):
            summary = points[-1] if points else None
        else:
            summary = next((p for p in points if p["id"] == pid), None)
        if summary is None:
            raise ApiError(404, f"no restore point {point} in {repo}")
        ctx["disks"] = [d["name"] for d in summary["disks"]]
        if disk is None and len(ctx["disks"]) > 1:
            return render_template("files.html", **ctx)  # choose a disk first
        ctx["doc"] = backup_files.listing(repo, point, disk, path)
    except ApiError as exc:
        ctx["error"], status = exc.message, exc.status
    else:
        status = 200
    return render_template("files.html", **ctx), status


def _crumbs(path: str) -> list[tuple[str, str]]:
    parts = [p for p in path.split("/") if p]
    return [("/", "/")] + [(p, "/" + "/".join(parts[: i + 1])) for i, p in enumerate(parts)]
