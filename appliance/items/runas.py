"""Which user a disposable server runs as: database servers refuse root (PostgreSQL) or should not have it."""

from __future__ import annotations

import os
import pwd

from appliance.errors import ItemRecoveryError


def server_owner(*names: str) -> tuple[int, int]:
    """As root: the first of ``names`` (the server's own Debian user) that exists, else nobody. Otherwise: ourselves."""
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    for name in (*names, "nobody"):
        try:
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
        except KeyError:
            continue
    raise ItemRecoveryError(f"no unprivileged user ({', '.join(names)} or nobody) to run the disposable server as")
