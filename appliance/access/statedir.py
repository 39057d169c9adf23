"""STATE/web: the web app's private directory (login hashes, token digests, session key, TLS key, auth.db).

Owner-only: the directory is 0700 and every file in it 0600, set explicitly rather than left to the umask
(gunicorn workers run with umask 0 unless told otherwise)."""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE, FILE_MODE = 0o700, 0o600


def web_dir(state_dir: Path | str) -> Path:
    path = Path(state_dir) / "web"
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    if path.stat().st_mode & 0o777 != DIR_MODE:  # made before, by an older version or with another umask
        os.chmod(path, DIR_MODE)
    return path
