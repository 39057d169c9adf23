"""The admin page: server-rendered views over the same daemon operations as the API."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from flask import Blueprint, Response, abort, current_app, flash, redirect, render_template, request, url_for

from appliance.access.credentials import MAX_PASSWORD
from appliance.errors import UsageError
from web import backup_files, daemon
from web import validation as field
from web.exposure import nfs_warning
from web.security import credentials, csrf_ok, csrf_token, current_user, log_in, log_out, login_required, safe_next
from web.throttle import LoginThrottle
from web.validation import ApiError, check_path_params, form_fields

bp = Blueprint("pages", __name__)
bp.url_value_preprocessor(check_path_params)


@bp.app_template_global()
def csrf() -> str:
    return csrf_token()


@bp.app_template_global("current_user")
def _current_user() -> str | None:
    return current_user()


@bp.app_template_global("nfs_warning")
def _nfs_warning() -> str | None:
    """The banner on every admin page while NFS is open to every address (None when not, or unknown)."""
    try:
        return nfs_warning(daemon.status())
    except ApiError:
        return None


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
    if request.method == "GET":
        return render_template("login.html")
    if not csrf_ok():
        return render_template("login.html", error="The login form expired; try again."), 400
    user, password = request.form.get("username", ""), request.form.get("password", "")
    if not 0 < len(user) <= 64 or len(password) > MAX_PASSWORD:
        return render_template("login.html", error="Wrong user name or password."), 401
    throttle = LoginThrottle(current_app.config["STATE_DIR"], current_app.config.get("LOGIN_POLICY"))
    wait = throttle.admit(request.remote_addr)
    if wait > 0:
        seconds = math.ceil(wait)
        page = render_template(
            "login.html", error=f"Too many failed logins from your address; try again in {seconds} s."
        )
        return page, 429, {"Retry-After": str(seconds)}
    if not credentials().check_password(user, password):
        return render_template("login.html", error="Wrong user name or password."), 401
    throttle.succeeded(request.remote_addr)
    log_in(user)
    return redirect(safe_next(request.args.get("next")) or url_for("pages.index"))


@bp.post("/logout")
@login_required
def logout() -> Response:
    log_out()
    return redirect(url_for("pages.login"))


@bp.get("/")
@login_required
def index() -> Any:
    ctx: dict[str, Any] = {"error": None}
    try:
        ctx["status"] = daemon.status()
        ctx["repositories"] = daemon.call("repositories")
        ctx["points"] = {
            r["name"]: list(reversed(daemon.call("points", repo=r["name"])))
            for r in ctx["repositories"]
            if not r.get("error")
        }
        ctx["sessions"] = daemon.call("sessions")
        ctx["verifications"] = daemon.call("verifications")[:20]
    except ApiError as exc:
        ctx["error"] = exc.message
    ctx["tokens"] = credentials().tokens()
    return render_template("dashboard.html", **ctx)


@bp.post("/sessions")
@login_required
def publish() -> Response:
    def start() -> str:
        f = form_fields(
            replace(field.VM, required=True), field.POINT, replace(field.MODE, required=True), field.REPOSITORY
        )
        (doc,) = daemon.call("publish", vm=f["vm"], point=f["point"], mode=f["mode"], repo=f["repository"])
        return f"{f['mode'].capitalize()} session {doc['id']} started: {doc['vm']} is at {doc['nfs_url']}"

    return act(start, f"Could not publish {_shown('vm')}")


@bp.post("/verifications")
@login_required
def verify() -> Response:
    def start() -> str:
        f = form_fields(replace(field.VM, required=True), field.POINT, field.REPOSITORY, field.EXPECT)
        job = daemon.call("verify", vm=f["vm"], point=f["point"], repo=f["repository"], expect=f["expect"])
        return f"Verification of {f['vm']}@{job['point']} started: it boots as a sandbox without network."

    return act(start, f"Could not verify {_shown('vm')}")


def _shown(name: str) -> str:
    """A form value for a message (flash text is escaped by the template; this only keeps it short)."""
    return request.form.get(name, "")[:100]


def act(action: Callable[[], str], failure: str, back: str = "pages.index") -> Response:
    """Run a daemon action for a form, flash its outcome, and go back to the page ``back`` (post/redirect/get).
    A refusal, the daemon's or a document's own check (``parse_group``), is flashed after ``failure``."""
    try:
        flash(action(), "ok")
    except ApiError as exc:
        flash(f"{failure}: {exc.message}", "error")
    except UsageError as exc:
        flash(f"{failure}: {exc}", "error")
    return redirect(url_for(back))


@bp.post("/sessions/<sid>/stop")
@login_required
def stop(sid: str) -> Response:
    force = request.form.get("force") == "on"

    def stop_it() -> str:
        daemon.call("stop", id=sid, force=force)
        return f"Session {sid} stopped."

    return act(stop_it, f"Could not stop {sid}")


@bp.post("/sessions/<sid>/prefetch")
@login_required
def prefetch(sid: str) -> Response:
    def start() -> str:
        daemon.call("prefetch", id=sid)
        return f"Prefetch of {sid} started: its disks come into the read cache in the background."

    return act(start, f"Could not prefetch {sid}")


@bp.post("/sessions/<sid>/migrate")
@login_required
def migrate(sid: str) -> Response:
    def start() -> str:
        output = form_fields(field.OUTPUT)["output"]
        daemon.call("migrate", id=sid, output=output, overwrite=request.form.get("overwrite") == "on")
        return f"Migration of {sid} to {output} started."

    return act(start, f"Could not migrate {sid}")


@bp.post("/tokens")
@login_required
def create_token() -> Response:
    name = form_fields(field.TOKEN_NAME)["name"]  # an ApiError or UsageError is flashed by web._expected
    tok = credentials().create_token(name)
    flash(f"API token '{tok['name']}' created; copy it now, it is not shown again: {tok['token']}", "token")
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
        field.REPOSITORY.check(repo)
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
        if summary.get("damaged"):  # never browsed, nor replaced by an older point
            raise ApiError(500, summary["error"])
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
