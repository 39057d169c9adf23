"""Who may use the appliance: admin logins (password hashes) and API tokens, kept in STATE/web/.

Passwords are stored as werkzeug scrypt hashes, tokens as SHA-256 digests: a copy of the state directory
does not hand out access. Files are replaced atomically and readable by the owner only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from werkzeug.security import check_password_hash, generate_password_hash

from appliance.errors import ConfigError, UsageError

TOKEN_PREFIX = "bbt_"
ADMIN = "admin"
MIN_PASSWORD = 8


def web_dir(state_dir: Path | str) -> Path:
    path = Path(state_dir) / "web"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _write_private(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        _write_private(path, secrets.token_bytes(32))
    return path.read_bytes()


class Credentials:
    def __init__(self, state_dir: Path | str) -> None:
        self.dir = web_dir(state_dir)
        self.users_path = self.dir / "users.json"
        self.tokens_path = self.dir / "tokens.json"

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
        if len(password) < MIN_PASSWORD:
            raise UsageError(f"password: must have at least {MIN_PASSWORD} characters")
        users = _read_json(self.users_path, {})
        users[user] = {"hash": generate_password_hash(password), "changed": time.time()}
        _write_private(self.users_path, json.dumps(users, indent=2))

    def check_password(self, user: str, password: str) -> bool:
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
        doc = _read_json(self.tokens_path, {"tokens": []})
        entry = {"id": secrets.token_hex(4), "name": name, "created": time.time(), "digest": _digest(token)}
        doc["tokens"].append(entry)
        _write_private(self.tokens_path, json.dumps(doc, indent=2))
        return {"id": entry["id"], "name": name, "created": entry["created"], "token": token}

    def tokens(self) -> list[dict]:
        entries = _read_json(self.tokens_path, {"tokens": []})["tokens"]
        return [{k: t[k] for k in ("id", "name", "created")} for t in entries]

    def revoke_token(self, token_id: str) -> bool:
        doc = _read_json(self.tokens_path, {"tokens": []})
        kept = [t for t in doc["tokens"] if t["id"] != token_id]
        if len(kept) == len(doc["tokens"]):
            return False
        _write_private(self.tokens_path, json.dumps({"tokens": kept}, indent=2))
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
