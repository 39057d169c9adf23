"""Authentication and CSRF for the API and the page.

Scripts send ``Authorization: Bearer <token>``; the browser has a login cookie. Every state-changing
request made with the cookie must carry the session's CSRF token (form field ``csrf_token`` or header
``X-CSRF-Token``); bearer requests need none, since browsers never attach bearer tokens on their own.
"""

from __future__ import annotations

import functools
import hmac
import secrets
from collections.abc import Callable
from typing import Any

from flask import abort, current_app, g, jsonify, redirect, request, session, url_for

from web.credentials import Credentials

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def credentials() -> Credentials:
    return Credentials(current_app.config["STATE_DIR"])


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(24)
    return session["csrf"]


def _csrf_ok() -> bool:
    sent = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token") or ""
    expected = session.get("csrf")
    return bool(expected) and hmac.compare_digest(sent, expected)


def _authenticate() -> str | None:
    """Who is calling: 'token:<name>', 'user:<name>' or None."""
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        entry = credentials().check_token(header[7:].strip())
        return f"token:{entry['name']}" if entry else None
    user = session.get("user")
    if user and request.method not in SAFE_METHODS and not _csrf_ok():
        abort(_json_error(403, "CSRF token missing or wrong; reload the page"))
    return f"user:{user}" if user else None


def _json_error(status: int, message: str) -> Any:
    resp = jsonify(error={"status": status, "message": message})
    resp.status_code = status
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="bootback"'
    return resp


def api_auth(view: Callable) -> Callable:
    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        who = _authenticate()
        if who is None:
            return _json_error(401, "authentication required: send 'Authorization: Bearer <token>' "
                                    "(create one with 'bootback token create NAME') or log in")  # fmt: skip
        g.who = who
        return view(*args, **kwargs)

    return wrapped


def login_required(view: Callable) -> Callable:
    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not session.get("user"):
            return redirect(url_for("pages.login", next=request.path))
        if request.method not in SAFE_METHODS and not _csrf_ok():
            abort(400, "The form has expired or was not sent by this page (CSRF check); reload and try again.")
        g.who = f"user:{session['user']}"
        return view(*args, **kwargs)

    return wrapped
