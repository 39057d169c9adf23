"""MariaDB/MySQL item recovery: a disposable ``mariadbd`` on a copy-on-write view of a backed-up data directory.

The server reads no option file (``--no-defaults``), has no network (``--skip-networking``: a Unix socket in a
private directory), runs as the unprivileged 'mysql' user, and skips the grant tables, so the backup's accounts
and passwords do not matter. InnoDB and Aria crash recovery run on the copy. Tables come out with
``mariadb-dump``; a restore into a running server refuses tables the target already has, because a MariaDB
dump's DDL commits as it goes and could not be rolled back.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.errors import ItemRecoveryError
from appliance.items.cowview import SERVER_FILE, CowView
from appliance.items.discovery import Item
from appliance.items.postgres import Table
from appliance.items.ready import wait_until_ready
from appliance.items.runas import server_owner
from appliance.items.space import SpaceGuard
from appliance.items.targets import ServerTarget, TargetConflictError, TargetLoginError, secret_file
from appliance.repo.keys import KeySource

MARIADBD = Path("/usr/sbin/mariadbd")
CLIENT = "mariadb"
DUMP = "mariadb-dump"
START_TIMEOUT = 120.0
SYSTEM_SCHEMAS = ("mysql", "information_schema", "performance_schema", "sys")


def installed_version(binary: Path = MARIADBD) -> tuple[int, int]:
    if not binary.is_file():
        raise ItemRecoveryError(
            f"MariaDB's server is not installed (no {binary}; on Debian: apt-get install mariadb-server)"
        )
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"Ver (\d+)\.(\d+)", out)
    return (int(m[1]), int(m[2])) if m else (0, 0)


def check_version(item: Item, have: tuple[int, int]) -> None:
    """MariaDB opens data directories of its own and older versions; a newer one, or MySQL 8's (a different
    data dictionary), is refused with what would be needed."""
    m = re.match(r"(\d+)\.(\d+)", item.version)
    if item.version.startswith("mysql-8"):
        raise ItemRecoveryError(
            f"{item.browser_path} is a MySQL 8 data directory: it needs MySQL 8's mysqld, not MariaDB"
        )
    if m and (int(m[1]), int(m[2])) > have:
        raise ItemRecoveryError(
            f"{item.browser_path} was written by MariaDB {m[1]}.{m[2]}; the installed server is {have[0]}.{have[1]} "
            f"(needs MariaDB {m[1]}.{m[2]} or newer)"
        )


def quote_name(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


@contextmanager
def client(target: ServerTarget) -> Iterator[tuple[list[str], str]]:
    """(the mariadb client's options, the database) for ``target``. The password goes in an option file of its
    own (``--defaults-file``, which must come first): never argv, never MYSQL_PWD in the environment."""
    args = []
    if target.socket:
        args.append(f"--socket={target.socket}")
    elif target.host:
        args += [f"--host={target.host}", f"--port={target.port or 3306}", "--protocol=TCP"]
    if target.user:
        args.append(f"--user={target.user}")
    database = target.database or ""
    if target.password is None:
        yield ["--no-defaults", *args], database
        return
    escaped = target.password.replace("\\", "\\\\").replace('"', '\\"')
    with secret_file(f'[client]\npassword="{escaped}"\n') as conf:
        yield [f"--defaults-file={conf}", *args], database


class DisposableServer:
    def __init__(
        self, datadir: Path, rundir: Path, owner: tuple[int, int], where: str, guard: SpaceGuard | None = None
    ) -> None:
        self.datadir, self.rundir, self.owner, self.where = datadir, rundir, owner, where
        self.guard = guard  # stops the server (and a dump) when the work directory's free space runs low
        self.socket = rundir / "mysqld.sock"
        self.log = rundir / "error.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.rundir.mkdir(mode=0o700)
        os.chown(self.rundir, *self.owner)
        (self.datadir / "mysql.sock").unlink(missing_ok=True)
        cmd = [
            str(MARIADBD),
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--socket={self.socket}",
            f"--pid-file={self.rundir / 'mariadbd.pid'}",
            f"--log-error={self.log}",
            f"--tmpdir={self.rundir}",
            "--skip-networking",
            "--skip-grant-tables",
            "--skip-log-bin",
            "--skip-slave-start",
            "--innodb-buffer-pool-size=64M",
            "--innodb-flush-log-at-trx-commit=0",
            "--event-scheduler=OFF",
        ]
        if os.geteuid() == 0:
            cmd.append(f"--user={self.owner[0]}")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        if self.guard is not None:
            self.guard.watch(self.proc, group=True)
        (self.rundir / SERVER_FILE).write_text(f"{self.proc.pid}\n")  # for cowview.sweep after a SIGKILL
        ready = lambda: self.socket.exists() and self._ping()  # noqa: E731
        wait_until_ready(self.proc, ready, "MariaDB", self.where, self._failure, self.stop, START_TIMEOUT)

    def _ping(self) -> bool:
        return (
            subprocess.run(
                [CLIENT, "--no-defaults", f"--socket={self.socket}", "-e", "SELECT 1"], capture_output=True
            ).returncode
            == 0
        )

    def _failure(self) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        for level in ("[ERROR]",):
            for line in lines:
                if level in line:
                    return line[line.index(level) :]
        return lines[-1] if lines else "no output"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL)  # a throw-away copy: nothing to flush
        self.proc.wait()

    def query(self, sql: str) -> object:
        p = subprocess.run(
            [CLIENT, "--no-defaults", f"--socket={self.socket}", "-N", "-B", "--raw", "-e", sql],
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if p.returncode != 0:
            raise ItemRecoveryError(f"query on {self.where} failed (exit {p.returncode}): {_last_line(p.stderr)}")
        return json.loads(p.stdout.strip() or "null")

    def tables(self, database: str | None = None, counts: bool = True) -> list[Table]:
        where = (
            "table_type = 'BASE TABLE' AND table_schema NOT IN (" + ", ".join(f"'{s}'" for s in SYSTEM_SCHEMAS) + ")"
        )
        rows = (
            self.query(
                "SELECT JSON_ARRAYAGG(JSON_ARRAY(table_schema, table_name)) FROM information_schema.tables"
                f" WHERE {where}"
            )
            or []
        )
        rows = sorted((s, t) for s, t in rows if database is None or s == database)
        if database is not None and not rows and database not in self.databases():
            raise ItemRecoveryError(
                f"no database {database!r} in {self.where} (databases: {', '.join(self.databases())})"
            )
        if not counts or not rows:
            return [Table(s, s, t, None) for s, t in rows]
        union = " UNION ALL ".join(
            f"SELECT {i} AS i, COUNT(*) AS n FROM {quote_name(s)}.{quote_name(t)}" for i, (s, t) in enumerate(rows)
        )
        counted = dict(self.query(f"SELECT JSON_ARRAYAGG(JSON_ARRAY(i, n)) FROM ({union}) AS c"))
        return [Table(s, s, t, counted[i]) for i, (s, t) in enumerate(rows)]

    def databases(self) -> list[str]:
        names = self.query("SELECT JSON_ARRAYAGG(schema_name) FROM information_schema.schemata") or []
        return sorted(n for n in names if n not in SYSTEM_SCHEMAS)

    def dump(self, database: str, tables: list[str], out: Path) -> None:
        cmd = [
            DUMP,
            "--no-defaults",
            f"--socket={self.socket}",
            "--single-transaction",
            "--skip-lock-tables",
            "--",  # the names are the backup's: a table named '--result-file=/x' is a table
            database,
            *tables,
        ]
        with open(out, "wb") as fh:
            if self.guard is not None:
                code, err = self.guard.run_into(cmd, fh)
            else:
                p = subprocess.run(cmd, stdout=fh, stderr=subprocess.PIPE, timeout=24 * 3600)
                code, err = p.returncode, p.stderr.decode(errors="replace")
        if code != 0:
            msg = err.strip().splitlines()
            raise ItemRecoveryError(f"mariadb-dump of {database!r} from {self.where} failed: {msg[-1] if msg else '?'}")


def _target_query(args: list[str], database: str, sql: str) -> subprocess.CompletedProcess:
    """One statement on the target server, its rows tab-separated without a header."""
    return subprocess.run(
        [CLIENT, *args, "-N", "-B", "-e", sql, "--", database],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def _last_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else "?"


def check_target(target: ServerTarget) -> None:
    """Log in to the target once before the disposable server starts: one line, nothing written."""
    with client(target) as (args, database):
        p = _target_query(args, database, "SELECT 1")
    if p.returncode != 0:
        raise TargetLoginError(f"cannot log in to {target}, nothing was restored: {_last_line(p.stderr)}")


def restore(dump: Path, target: ServerTarget, tables: list[str]) -> None:
    """Into a running server; tables it already has are refused before anything is sent."""
    with client(target) as (args, database):
        if tables:
            names = ", ".join("'" + t.replace("\\", "\\\\").replace("'", "\\'") + "'" for t in tables)
            check = _target_query(
                args,
                database,
                "SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE()"
                f" AND table_name IN ({names})",
            )
            if check.returncode != 0:
                raise TargetLoginError(f"cannot reach the target server: {_last_line(check.stderr)}")
            clash = check.stdout.split()
            if clash:
                raise TargetConflictError(
                    f"the target database {database!r} already has table(s) {', '.join(clash)}: nothing was restored"
                )
        with open(dump, "rb") as fh:
            p = subprocess.run([CLIENT, *args, "--", database], stdin=fh, capture_output=True, timeout=24 * 3600)
    if p.returncode != 0:
        msg = p.stderr.decode(errors="replace").strip().splitlines()
        raise ItemRecoveryError(f"restore into {database!r} failed: {msg[-1] if msg else '?'}")


@contextmanager
def disposable_server(
    item: Item, repo: str, point: str, work_root: Path, view_mode: str = "auto", keys: KeySource | None = None
) -> Iterator[DisposableServer]:
    if item.kind != "mariadb":
        raise ItemRecoveryError(f"{item.browser_path} is a {item.kind} item, not a MariaDB/MySQL data directory")
    check_version(item, installed_version())
    owner = server_owner("mysql")
    view = CowView(repo, point, item.disk, item.browser_path, work_root, owner, mode=view_mode, keys=keys)
    with view as data:
        server = DisposableServer(data, data.parent / "run", owner, item.browser_path, view.guard)
        try:
            server.start()
            yield server
        finally:
            server.stop()
