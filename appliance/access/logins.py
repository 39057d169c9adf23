"""Server-side login sessions: the cookie carries a random session id, and a login is valid only while its
id is in STATE/web/auth.db. Logout deletes it; a password change deletes every login of that user; so a
stolen or kept cookie dies with them, in every gunicorn worker at once."""

from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path

from appliance.access.authdb import transaction

LIFETIME = 8 * 3600.0  # a login lasts at most this long, however active (absolute, not sliding)
MAX_PER_USER = 32  # logins kept per user; the oldest is ended when a new one would exceed this


def _digest(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()  # the database never holds a usable session id


def start(state_dir: Path | str, user: str) -> str:
    sid = secrets.token_urlsafe(32)
    now = time.time()
    with transaction(state_dir) as db:
        db.execute("DELETE FROM logins WHERE expires <= ?", (now,))
        db.execute("INSERT INTO logins VALUES (?, ?, ?, ?)", (_digest(sid), user, now, now + LIFETIME))
        db.execute(
            "DELETE FROM logins WHERE user = ? AND digest NOT IN (SELECT digest FROM logins WHERE user = ? "
            "ORDER BY created DESC LIMIT ?)",
            (user, user, MAX_PER_USER),
        )
    return sid


def check(state_dir: Path | str, sid: str) -> str | None:
    """The user the session id belongs to, or None when it was ended, expired or never existed."""
    with transaction(state_dir, write=False) as db:
        row = db.execute(
            "SELECT user FROM logins WHERE digest = ? AND expires > ?", (_digest(sid), time.time())
        ).fetchone()
    return row[0] if row else None


def end(state_dir: Path | str, sid: str) -> None:
    with transaction(state_dir) as db:
        db.execute("DELETE FROM logins WHERE digest = ?", (_digest(sid),))


def end_all(state_dir: Path | str, user: str) -> int:
    """End every login of ``user`` (after a password change); returns how many were ended."""
    with transaction(state_dir) as db:
        return db.execute("DELETE FROM logins WHERE user = ?", (user,)).rowcount
