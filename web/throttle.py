"""Login throttling, shared by every gunicorn worker through STATE/web/auth.db.

Policy (the numbers are ``Policy``'s defaults):
- Per client address (IPv4 address, IPv6 /64, which one host usually owns whole): the first ``free`` = 5
  failed logins in ``window`` = 15 min cost nothing; after that the address must wait ``first_delay`` = 2 s,
  then 4, 8 ... seconds, at most ``max_delay`` = 60 s, after its last attempt before the next one is looked
  at. So one address gets about one guess a minute while it keeps failing.
- Overall: once ``global_free`` = 100 logins failed in the window across all addresses (a guesser with many
  addresses), attempts from addresses that have not logged in successfully in the last ``trusted_for`` = 30
  days are looked at no more than one per ``global_spacing`` = 1 s across all of them.
- An attempt that must wait gets 429 with Retry-After; its password is not checked (no scrypt work either) and
  it does not count as a failure, so hammering does not lengthen the wait. A password that is checked and is
  right always logs in, and clears its address's failures. Nothing ever locks an account: a guesser on one
  address does not slow another address at all (until the overall limit, which addresses the admin has used
  before bypass), and even on the guesser's own address a correct login goes through after at most
  ``max_delay``.
- An attempt counts as failed the moment it is admitted and is forgiven when the password proves right, so
  concurrent requests cannot slip through between a check and a failure being written.
- The address is the TCP peer (gunicorn serves the port directly; X-Forwarded-For is not trusted). At most
  ``max_tracked`` addresses are remembered; beyond that the longest-quiet ones are forgotten first.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.access.authdb import transaction

EVERYONE = "*"  # the key of the overall counter


@dataclass(frozen=True)
class Policy:
    free: int = 5
    window: float = 900.0
    first_delay: float = 2.0
    max_delay: float = 60.0
    global_free: int = 100
    global_spacing: float = 1.0
    trusted_for: float = 30 * 86400.0
    max_tracked: int = 10000


def client_key(addr: str | None) -> str:
    """The throttling key of a peer address: IPv4 as is, IPv6 by its /64."""
    try:
        ip = ipaddress.ip_address(addr or "")
    except ValueError:
        return f"?{(addr or '')[:64]}"
    if ip.version == 6 and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class LoginThrottle:
    def __init__(self, state_dir: Path | str, policy: Policy | None = None) -> None:
        self.state = state_dir
        self.policy = policy or Policy()

    def _delay(self, failures: int) -> float:
        p = self.policy
        return 0.0 if failures < p.free else min(p.first_delay * 2.0 ** (failures - p.free), p.max_delay)

    def admit(self, addr: str | None, now: float | None = None) -> float:
        """0 when this attempt may be checked now (it is counted as failed until ``succeeded``), else the
        seconds to wait before trying again (nothing is recorded)."""
        p, key = self.policy, client_key(addr)
        now = time.time() if now is None else now
        with transaction(self.state) as db:
            rows = dict(
                (
                    (k, (c, t))
                    for k, c, t in db.execute(
                        "SELECT key, count, last FROM attempts WHERE key IN (?, ?)", (key, EVERYONE)
                    )
                )
            )
            count, last = rows.get(key, (0, 0.0))
            count = 0 if now - last > p.window else count
            wait = last + self._delay(count) - now
            if wait > 0:
                return wait
            g_count, g_last = rows.get(EVERYONE, (0, 0.0))
            g_count = 0 if now - g_last > p.window else g_count
            if g_count >= p.global_free and not self._trusted(db, key, now):
                wait = g_last + p.global_spacing - now
                if wait > 0:
                    return wait
            db.execute("INSERT OR REPLACE INTO attempts VALUES (?, ?, ?)", (key, count + 1, now))
            db.execute("INSERT OR REPLACE INTO attempts VALUES (?, ?, ?)", (EVERYONE, g_count + 1, now))
            if key not in rows:
                self._forget_old(db, now)
        return 0.0

    def succeeded(self, addr: str | None, now: float | None = None) -> None:
        """The admitted attempt from ``addr`` had the right password: forgive it and trust the address."""
        key, now = client_key(addr), time.time() if now is None else now
        with transaction(self.state) as db:
            db.execute("DELETE FROM attempts WHERE key = ?", (key,))
            db.execute("UPDATE attempts SET count = max(count - 1, 0) WHERE key = ?", (EVERYONE,))
            db.execute("INSERT OR REPLACE INTO trusted VALUES (?, ?)", (key, now))
            db.execute("DELETE FROM trusted WHERE last < ?", (now - self.policy.trusted_for,))

    def _trusted(self, db, key: str, now: float) -> bool:  # noqa: ANN001 - an sqlite3 connection
        row = db.execute("SELECT last FROM trusted WHERE key = ?", (key,)).fetchone()
        return bool(row) and now - row[0] <= self.policy.trusted_for

    def _forget_old(self, db, now: float) -> None:  # noqa: ANN001
        p = self.policy
        db.execute("DELETE FROM attempts WHERE last < ? AND key != ?", (now - p.window, EVERYONE))
        db.execute(
            "DELETE FROM attempts WHERE key != ? AND key NOT IN (SELECT key FROM attempts WHERE key != ? "
            "ORDER BY last DESC LIMIT ?)",
            (EVERYONE, EVERYONE, p.max_tracked),
        )
