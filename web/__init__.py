"""The web app on the control port: REST API under /api/v1 and the admin page (Flask app factory)."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

from flask import Flask, Response, flash, jsonify, redirect, request, url_for
from werkzeug.exceptions import HTTPException, InternalServerError

from appliance.config import default_state_dir
from appliance.errors import UsageError
from web.validation import ApiError


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    from appliance.access import logins
    from appliance.access.credentials import secret_key
    from web import api, backup_items, items_page, labs, pages

    app = Flask(__name__)
    config = dict(test_config or {})
    state = Path(config.pop("STATE_DIR", None) or default_state_dir())
    app.config.from_mapping(
        STATE_DIR=state,
        SECRET_KEY=secret_key(state),
        SESSION_COOKIE_NAME="bootback_session",
        SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=datetime.timedelta(seconds=logins.LIFETIME),
        MAX_CONTENT_LENGTH=MAX_BODY,
        MAX_FORM_MEMORY_SIZE=MAX_BODY,
        LOGIN_POLICY=None,  # a web.throttle.Policy; None is its defaults
    )
    app.config.update(config)
    app.register_blueprint(api.bp)
    app.register_blueprint(backup_items.bp)
    app.register_blueprint(items_page.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(labs.api)
    app.register_blueprint(labs.page)
    app.after_request(_security_headers)
    # The one place requests' errors become answers (STYLE rule 15): expected ones (ApiError, and the
    # UsageError the web's own checks raise) say why; anything else is a bug or an unforeseen failure.
    app.register_error_handler(ApiError, _expected)
    app.register_error_handler(UsageError, _expected)
    app.register_error_handler(HTTPException, _api_errors_as_json)
    app.register_error_handler(Exception, _unexpected)
    return app


MAX_BODY = 1 << 20  # request bodies (JSON, forms) larger than this get 413 before they are read
log = logging.getLogger("bootback.web")


def _expected(exc: ApiError | UsageError) -> Any:
    """JSON {error: {status, message}} for the API; for the page, the message flashed back on the dashboard
    (a form or URL the page would never send, or an action the daemon refused: post/redirect/get)."""
    if isinstance(exc, UsageError):
        exc = ApiError(400, str(exc))
    if request.path.startswith("/api/"):
        return jsonify(error={"status": exc.status, "message": exc.message}), exc.status
    flash(exc.message, "error")
    return redirect(url_for("pages.index"), 303)


def _unexpected(exc: Exception) -> Any:
    """A bug or an unforeseen failure: the details go to the log, the caller gets a plain 500 (no internals)."""
    if isinstance(exc, HTTPException):
        return _api_errors_as_json(exc)
    log.error("unexpected error on %s %s", request.method, request.path, exc_info=exc)
    return _api_errors_as_json(InternalServerError("internal error; the appliance's log has the details"))


def _api_errors_as_json(exc: HTTPException) -> Any:
    """Unknown API paths and wrong methods answer JSON like the rest of the API; pages keep HTML."""
    if request.path.startswith("/api/"):
        if exc.response is not None:  # already a JSON answer (abort with one)
            return exc.response
        return jsonify(error={"status": exc.code, "message": exc.description}), exc.code
    return exc


def _security_headers(resp: Response) -> Response:
    h = resp.headers
    h.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data:; style-src 'self'; "
        "script-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    )
    h.setdefault("X-Content-Type-Options", "nosniff")
    h.setdefault("X-Frame-Options", "DENY")
    h.setdefault("Referrer-Policy", "no-referrer")
    h.setdefault("Strict-Transport-Security", "max-age=31536000")
    h.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    if request.path.startswith("/api/") or resp.mimetype == "text/html":
        h.setdefault("Cache-Control", "no-store")
    return resp
