"""Who may use the appliance: admin logins (password hashes) and API tokens, kept in STATE/web/.

Passwords are stored as werkzeug scrypt hashes, tokens as SHA-256 digests: a copy of the state directory
does not hand out access. Files are replaced atomically (appliance.atomicfile) and readable by the owner only;
read-modify-write cycles hold a lock file, so two gunicorn workers creating tokens at once both keep theirs.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from werkzeug.security import check_password_hash, generate_password_hash

from appliance.access import logins
from appliance.access.statedir import FILE_MODE, web_dir
from appliance.atomicfile import create_once, write_atomic
from appliance.errors import ConfigError, UsageError

TOKEN_PREFIX = "bbt_"
ADMIN = "admin"
MIN_PASSWORD = 8


__all__ = ["Credentials", "secret_key", "web_dir"]
MAX_PASSWORD = 1024  # longer is no stronger, and every login attempt hashes what it is sent


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); fix or remove it") from None


def secret_key(state_dir: Path | str) -> bytes:
    """The Flask session signing key, shared by all gunicorn workers and stable across restarts."""
    path = web_dir(state_dir) / "session-key"
    if not path.exists():
        create_once(path, secrets.token_bytes(32), FILE_MODE)  # two workers starting at once agree on one key
    return path.read_bytes()


class Credentials:
    def __init__(self, state_dir: Path | str) -> None:
        self.dir = web_dir(state_dir)
        self.users_path = self.dir / "users.json"
        self.tokens_path = self.dir / "tokens.json"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Held around every read-modify-write of users.json or tokens.json, across processes."""
        fd = os.open(self.dir / "credentials.lock", os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # --- logins -----------------------------------------------------------------------------------------
    def ensure_admin(self, password: str | None = None, password_file: str | None = None) -> str | None:
        """Create the admin login on first start. Returns the password when it was generated (print it once)."""
        users = _read_json(self.users_path, {})
        if password_file:
            try:
                password = Path(password_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read the admin password file {password_file}: {exc}") from None
        if ADMIN in users and not password:
            return None
        if ADMIN in users and check_password_hash(users[ADMIN]["hash"], password or ""):
            return None
        generated = None
        if not password:
            password = generated = secrets.token_urlsafe(12)
        self.set_password(ADMIN, password)
        return generated

    def set_password(self, user: str, password: str) -> None:
        """Set a password; every login of ``user`` ends (a changed password is how an admin throws out others)."""
        if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
            raise UsageError(f"password: must have {MIN_PASSWORD} to {MAX_PASSWORD} characters")
        entry = {"hash": generate_password_hash(password), "changed": time.time()}
        with self._locked():
            users = _read_json(self.users_path, {})
            users[user] = entry
            write_atomic(self.users_path, json.dumps(users, indent=2), FILE_MODE)
        logins.end_all(self.dir.parent, user)

    def check_password(self, user: str, password: str) -> bool:
        if len(password) > MAX_PASSWORD:
            return False
        entry = _read_json(self.users_path, {}).get(user)
        if entry is None:
            # Same work as a real check, so timing does not reveal which user names exist.
            check_password_hash(generate_password_hash("x"), password)
            return False
        return check_password_hash(entry["hash"], password)

    # --- API tokens -------------------------------------------------------------------------------------
    def create_token(self, name: str) -> dict:
        if not name or len(name) > 64:
            raise UsageError("name: give the token a name of 1 to 64 characters")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        entry = {"id": secrets.token_hex(4), "name": name, "created": time.time(), "digest": _digest(token)}
        with self._locked():
            doc = _read_json(self.tokens_path, {"tokens": []})
            doc["tokens"].append(entry)
            write_atomic(self.tokens_path, json.dumps(doc, indent=2), FILE_MODE)
        return {"id": entry["id"], "name": name, "created": entry["created"], "token": token}

    def tokens(self) -> list[dict]:
        entries = _read_json(self.tokens_path, {"tokens": []})["tokens"]
        return [{k: t[k] for k in ("id", "name", "created")} for t in entries]

    def revoke_token(self, token_id: str) -> bool:
        with self._locked():
            doc = _read_json(self.tokens_path, {"tokens": []})
            kept = [t for t in doc["tokens"] if t["id"] != token_id]
            if len(kept) == len(doc["tokens"]):
                return False
            write_atomic(self.tokens_path, json.dumps({"tokens": kept}, indent=2), FILE_MODE)
        return True

    def check_token(self, token: str) -> dict | None:
        if not token.startswith(TOKEN_PREFIX):
            return None
        digest = _digest(token)
        for entry in _read_json(self.tokens_path, {"tokens": []})["tokens"]:
            if hmac.compare_digest(entry["digest"], digest):
                return entry
        return None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
