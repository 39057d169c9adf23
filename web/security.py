"""Authentication, CSRF and safe redirects for the API and the page.

Scripts send ``Authorization: Bearer <token>``; the browser has a login cookie. The cookie (signed by Flask)
holds a login session id that must still be in STATE/web/auth.db (``appliance.access.logins``): logout and password
changes end it server-side. Every state-changing request made with the cookie must carry the session's CSRF
token (form field ``csrf_token`` or header ``X-CSRF-Token``); bearer requests need none, since browsers never
attach bearer tokens on their own.
"""

from __future__ import annotations

import functools
import hmac
import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from flask import abort, current_app, g, jsonify, redirect, request, session, url_for

from appliance.access import logins
from appliance.access.credentials import Credentials

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def credentials() -> Credentials:
    return Credentials(current_app.config["STATE_DIR"])


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(24)
    return session["csrf"]


def csrf_ok() -> bool:
    sent = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token") or ""
    expected = session.get("csrf")
    return bool(expected) and isinstance(sent, str) and hmac.compare_digest(sent.encode(), expected.encode())


def log_in(user: str) -> None:
    """A fresh cookie session (no fixation) bound to a new server-side login."""
    session.clear()
    session.permanent = True
    session["sid"] = logins.start(current_app.config["STATE_DIR"], user)
    g.user = user
    csrf_token()


def log_out() -> None:
    if isinstance(sid := session.get("sid"), str):
        logins.end(current_app.config["STATE_DIR"], sid)
    session.clear()
    g.user = None


def current_user() -> str | None:
    """The logged-in user of this request's cookie, checked against the server-side logins (once per request).
    A cookie whose login was ended or expired loses it, so the browser stops sending it."""
    if "user" not in g:
        sid = session.get("sid")
        g.user = logins.check(current_app.config["STATE_DIR"], sid) if isinstance(sid, str) else None
        if g.user is None and ("sid" in session or "user" in session):
            session.pop("sid", None)  # the CSRF token stays: a page may already have rendered it into a form
            session.pop("user", None)
    return g.user


def safe_next(target: str | None) -> str | None:
    """``target`` when it is a path on this site (for ?next= after login), else None: no open redirect.

    Browsers are lenient: they drop tabs and newlines anywhere in a URL, read a backslash as a slash, and
    take '//host' as another host; so a target with control characters, whitespace or backslashes, or that
    starts with two slashes, or has a scheme or host, is refused, before and after percent-decoding."""
    if not target or len(target) > 2048:
        return None
    for form in (target, unquote(target)):
        if any(c in form for c in "\\ ") or any(ord(c) < 32 or ord(c) == 127 for c in form):
            return None
        parts = urlsplit(form)
        if not form.startswith("/") or form.startswith("//") or parts.scheme or parts.netloc:
            return None
    return target


def _authenticate() -> str | None:
    """Who is calling: 'token:<name>', 'user:<name>' or None."""
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        entry = credentials().check_token(header[7:].strip())
        return f"token:{entry['name']}" if entry else None
    user = current_user()
    if user and request.method not in SAFE_METHODS and not csrf_ok():
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
            return _json_error(
                401,
                "authentication required: send 'Authorization: Bearer <token>' "
                "(create one with 'bootback token create NAME') or log in",
            )
        g.who = who
        return view(*args, **kwargs)

    return wrapped


def login_required(view: Callable) -> Callable:
    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        user = current_user()
        if not user:
            back = request.full_path.rstrip("?") if request.method == "GET" else None  # a form post can't resume
            return redirect(url_for("pages.login", next=back))
        if request.method not in SAFE_METHODS and not csrf_ok():
            abort(400, "The form has expired or was not sent by this page (CSRF check); reload and try again.")
        g.who = f"user:{user}"
        return view(*args, **kwargs)

    return wrapped
