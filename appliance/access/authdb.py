"""The small SQLite database in STATE/web/auth.db that every gunicorn worker shares: login sessions and the
login throttle. SQLite's file locks make each transaction atomic across worker processes; ``BEGIN IMMEDIATE``
takes the write lock up front so a read-modify-write cannot interleave with another worker's."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from appliance.access.statedir import FILE_MODE, web_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS logins (digest TEXT PRIMARY KEY, user TEXT NOT NULL, created REAL NOT NULL,
                                   expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS attempts (key TEXT PRIMARY KEY, count INTEGER NOT NULL, last REAL NOT NULL);
CREATE INDEX IF NOT EXISTS attempts_last ON attempts (last);
CREATE TABLE IF NOT EXISTS trusted (key TEXT PRIMARY KEY, last REAL NOT NULL);
"""


def db_path(state_dir: Path | str) -> Path:
    path = web_dir(state_dir) / "auth.db"
    if not path.exists():
        # Created 0600 before SQLite opens it: SQLite gives its journal the database file's mode.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
        os.fchmod(fd, FILE_MODE)
        os.close(fd)
    return path


@contextmanager
def transaction(state_dir: Path | str, write: bool = True) -> Iterator[sqlite3.Connection]:
    """One transaction on the shared database (a write lock from the start unless ``write`` is False);
    commits on success, rolls back on an exception."""
    with closing(sqlite3.connect(db_path(state_dir), timeout=10, isolation_level=None)) as conn:
        conn.executescript(SCHEMA)
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
