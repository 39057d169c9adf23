"""PostgreSQL item recovery: a disposable server on a copy-on-write view of a backed-up data directory.

The server is Debian's own binaries of the data directory's major version (``/usr/lib/postgresql/NN/bin``), run
as an unprivileged user, listening on a Unix socket in a private directory only (``listen_addresses=''``), with
a configuration of ours (neither the backed-up postgresql.conf nor postgresql.auto.conf is read: the copy's
auto.conf is emptied). Crash recovery runs on the copy, as after a power cut: a backup of a running VM is
crash-consistent. Tables and databases come out with ``pg_dump`` and go into a running server with ``psql`` in
one transaction, so a failed restore leaves the target as it was.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ItemRecoveryError
from appliance.items.cowview import SERVER_FILE, CowView
from appliance.items.discovery import Item
from appliance.items.ready import wait_until_ready
from appliance.items.runas import server_owner
from appliance.items.space import SpaceGuard
from appliance.items.targets import ServerTarget, TargetConflictError, TargetLoginError, secret_file
from appliance.repo.keys import KeySource

BIN_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "postgres"
START_TIMEOUT = 120.0  # crash recovery replays WAL: allow for a busy cluster's
SOCKET_LIMIT = 100  # sun_path is 108 bytes, with '/.s.PGSQL.5432' after the directory


def major_version(item: Item) -> str:
    """'15' from PG_VERSION, '9.6' for the old two-part numbering; anything else is not a data directory."""
    if not re.fullmatch(r"(\d{2,})|(\d\.\d)", item.version):
        raise ItemRecoveryError(
            f"{item.browser_path}: PG_VERSION holds {item.version[:40]!r}, not a PostgreSQL major version "
            "(damaged data directory?)"
        )
    return item.version


def server_bindir(version: str, root: Path = BIN_ROOT) -> Path:
    """Debian's binaries of that major version, or one line naming the package to install."""
    bindir = root / version / "bin"
    if not (bindir / "postgres").is_file():
        have = sorted(p.name for p in root.glob("*") if (p / "bin" / "postgres").is_file()) if root.is_dir() else []
        raise ItemRecoveryError(
            f"this data directory needs PostgreSQL {version}, whose server is not installed "
            f"(no {bindir}/postgres; on Debian: apt-get install postgresql-{version}; installed: "
            f"{', '.join(have) or 'none'})"
        )
    return bindir


@dataclass(frozen=True)
class Table:
    database: str
    schema: str
    name: str
    rows: int | None

    def to_json(self) -> dict:
        return {"database": self.database, "schema": self.schema, "table": self.name, "rows": self.rows}


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class DisposableServer:
    """One PostgreSQL server on ``datadir``, sockets and logs in ``rundir``; ``stop()`` (or the context) ends it."""

    def __init__(
        self,
        datadir: Path,
        bindir: Path,
        rundir: Path,
        owner: tuple[int, int],
        where: str,
        guard: SpaceGuard | None = None,
    ) -> None:
        self.datadir, self.bindir, self.rundir, self.owner = datadir, bindir, rundir, owner
        self.where = where  # the data directory's place in the backup, for messages
        self.guard = guard  # stops the server (and a dump) when the work directory's free space runs low
        self.log = rundir / "server.log"
        self.proc: subprocess.Popen | None = None

    def _prepare(self) -> None:
        if len(str(self.rundir)) > SOCKET_LIMIT:
            raise ItemRecoveryError(
                f"work directory path too long for a Unix socket: {self.rundir} (use a shorter --work-dir)"
            )
        self.rundir.mkdir(mode=0o700)
        (self.rundir / "postgresql.conf").write_text("# bootback's own: the backed-up configuration is not used\n")
        (self.rundir / "pg_hba.conf").write_text("local all all trust\n")
        (self.rundir / "pg_ident.conf").write_text("")
        for f in (self.rundir, *self.rundir.iterdir()):
            os.chown(f, *self.owner)
        # The copy's, not the backup's: a lock file naming a process of the backed-up VM, and the signals that
        # would make the copy wait for a primary or an archive, go; recovery is then plain crash recovery.
        for name in ("postmaster.pid", "standby.signal", "recovery.signal"):
            (self.datadir / name).unlink(missing_ok=True)
        # ALTER SYSTEM's settings, read by every start and not all overridable with -c: in a backup of a VM that
        # was broken into, session_preload_libraries or dynamic_library_path would run the intruder's code here.
        # Nothing in it is needed to read the data (encoding, WAL size and layout live in pg_control).
        (self.datadir / "postgresql.auto.conf").write_text("# emptied by bootback: backed-up settings are not used\n")

    def start(self) -> None:
        self._prepare()
        settings = {
            "config_file": self.rundir / "postgresql.conf",
            "hba_file": self.rundir / "pg_hba.conf",
            "ident_file": self.rundir / "pg_ident.conf",
            "listen_addresses": "",
            "unix_socket_directories": self.rundir,
            "unix_socket_permissions": "0700",
            "port": 5432,
            "shared_preload_libraries": "",
            "archive_mode": "off",
            "logging_collector": "off",
            "ssl": "off",
            "fsync": "off",  # a throw-away copy: durability buys nothing
            "synchronous_commit": "off",
            "shared_buffers": "64MB",
            "autovacuum": "off",
        }
        cmd = [str(self.bindir / "postgres"), "-D", str(self.datadir)]
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                user=self.owner[0],
                group=self.owner[1],
                extra_groups=[] if os.geteuid() == 0 else None,
                cwd=self.rundir,
                start_new_session=True,
            )
        if self.guard is not None:
            self.guard.watch(self.proc, group=True)
        (self.rundir / SERVER_FILE).write_text(f"{self.proc.pid}\n")  # for cowview.sweep after a SIGKILL
        wait_until_ready(self.proc, self._ready, "PostgreSQL", self.where, self._failure, self.stop, START_TIMEOUT)

    def _ready(self) -> bool:
        cmd = [str(self.bindir / "pg_isready"), "-q", "-h", str(self.rundir), "-U", SUPERUSER, "-d", "postgres"]
        return subprocess.run(cmd, capture_output=True).returncode == 0

    def _failure(self) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        for level in ("PANIC:", "FATAL:", "ERROR:"):
            for line in lines:
                if level in line:
                    return line[line.index(level) :].replace("  ", " ")
        return lines[-1] if lines else "no output"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)  # immediate shutdown: nothing on the copy needs to be kept
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    # clients -----------------------------------------------------------------------------------------------
    def _conn(self, database: str) -> list[str]:
        # A database's name comes from the backup: psql and pg_dump read a -d holding '=' (or a URL) as a whole
        # connection string ('host=elsewhere dbname=x'), so it goes in as the quoted value of dbname, only a name.
        quoted = database.replace("\\", "\\\\").replace("'", "\\'")
        return ["-h", str(self.rundir), "-p", "5432", "-U", SUPERUSER, "-d", f"dbname='{quoted}'"]

    def query(self, database: str, sql: str) -> object:
        """The single JSON value ``sql`` returns."""
        p = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                *self._conn(database),
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if p.returncode != 0:
            raise ItemRecoveryError(f"query on database {database!r} of {self.where} failed: {_first_error(p.stderr)}")
        return json.loads(p.stdout.strip() or "null")

    def databases(self) -> list[str]:
        return self.query(
            "postgres",
            "SELECT coalesce(json_agg(datname ORDER BY datname), '[]') FROM pg_database "
            "WHERE datallowconn AND NOT datistemplate",
        )

    def tables(self, database: str, counts: bool = True) -> list[Table]:
        self.check_database(database)
        count = (
            "(xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', n.nspname, c.relname),"
            " false, true, '')))[1]::text::bigint"
            if counts
            else "NULL"
        )
        rows = self.query(
            database,
            f"SELECT coalesce(json_agg(json_build_array(n.nspname, c.relname, {count}) ORDER BY n.nspname, c.relname),"
            " '[]') FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p')"
            " AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%'"
            " AND NOT c.relispartition",
        )
        return [Table(database, s, t, n) for s, t, n in rows]

    def check_database(self, database: str) -> None:
        names = self.databases()
        if database not in names:
            raise ItemRecoveryError(f"no database {database!r} in {self.where} (databases: {', '.join(names)})")

    def find_table(self, database: str, name: str) -> Table:
        """``name`` is TABLE or SCHEMA.TABLE; a bare name must be unique across schemas."""
        tables = self.tables(database, counts=False)
        schema, _, table = name.rpartition(".")
        hits = [t for t in tables if t.name == table and (not schema or t.schema == schema)]
        if len(hits) == 1:
            return hits[0]
        listed = ", ".join(f"{t.schema}.{t.name}" for t in tables) or "none"
        if not hits:
            raise ItemRecoveryError(f"no table {name!r} in database {database!r} of {self.where} (tables: {listed})")
        raise ItemRecoveryError(f"table {name!r} is in several schemas of {database!r}: name one ({listed})")

    def rename_table(self, table: Table, new_name: str) -> Table:
        """On the copy only: a restore under another name is a dump of the renamed table. Its indexes (and so
        its primary key and unique constraints) and owned sequences are renamed too, or they would clash with
        the original's in the target: 'customers_pkey' becomes 'NEW_pkey'."""
        old = f"{quote_ident(table.schema)}.{quote_ident(table.name)}"
        self.query(
            table.database,
            f"""DO $$
DECLARE r record; old text := {quote_literal(table.name)}; new text := {quote_literal(new_name)};
BEGIN
  FOR r IN SELECT c.relname, c.relkind FROM pg_class c WHERE c.oid IN (
      SELECT indexrelid FROM pg_index WHERE indrelid = {quote_literal(old)}::regclass
      UNION SELECT objid FROM pg_depend WHERE refobjid = {quote_literal(old)}::regclass
        AND classid = 'pg_class'::regclass AND deptype IN ('a', 'i'))
    AND c.relkind IN ('i', 'S') LOOP
    EXECUTE format('ALTER %s %I.%I RENAME TO %I', CASE r.relkind WHEN 'i' THEN 'INDEX' ELSE 'SEQUENCE' END,
      {quote_literal(table.schema)}, r.relname,
      CASE WHEN left(r.relname, length(old)) = old THEN new || substr(r.relname, length(old) + 1)
           ELSE new || '_' || r.relname END);
  END LOOP;
  EXECUTE format('ALTER TABLE %s RENAME TO %I', {quote_literal(old)}, new);
END $$; SELECT 'null'::json""",
        )
        return Table(table.database, table.schema, new_name, table.rows)

    def dump(self, database: str, tables: list[Table], out: Path) -> None:
        """Plain SQL without owners or grants (the target's roles are not the backup's); the whole database when
        ``tables`` is empty. A table dump begins by creating its schemas when missing: pg_dump -t leaves them out,
        and a restore into another server would fail without them."""
        cmd = [str(self.bindir / "pg_dump"), *self._conn(database), "--no-owner", "--no-acl"]
        for t in tables:
            cmd += ["-t", f"{quote_ident(t.schema)}.{quote_ident(t.name)}"]
        with open(out, "wb") as fh:
            for schema in sorted({t.schema for t in tables} - {"public"}):
                fh.write(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)};\n".encode())
            fh.flush()
            if self.guard is not None:
                code, err = self.guard.run_into(cmd, fh)
            else:
                p = subprocess.run(cmd, stdout=fh, stderr=subprocess.PIPE, text=True, timeout=24 * 3600)
                code, err = p.returncode, p.stderr
        if code != 0:
            raise ItemRecoveryError(f"pg_dump of {database!r} from {self.where} failed: {_first_error(err)}")

    def restore(self, dump: Path, target: ServerTarget) -> None:
        """Into a running server, in one transaction: all of it or nothing."""
        p = _psql(self.bindir, target, ["--single-transaction", "-f", str(dump)], 24 * 3600)
        if p.returncode != 0:
            raise TargetConflictError(f"restore into {target} failed, nothing was changed: {_first_error(p.stderr)}")


def check_target(bindir: Path, target: ServerTarget) -> None:
    """Log in to the target once before anything is dumped: a wrong password or an unreachable server is one
    line, early, and nothing is written."""
    p = _psql(bindir, target, ["-A", "-t", "-c", "SELECT 1"], 60)
    if p.returncode != 0:
        raise TargetLoginError(f"cannot log in to {target}, nothing was restored: {_first_error(p.stderr)}")


def _psql(bindir: Path, target: ServerTarget, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """psql on ``target``, its connection in libpq's environment variables (no inherited PG* one: no service
    file, no other passfile), the password in a PGPASSFILE of its own (never argv, never the environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGHOST=target.socket or target.host or "", PGUSER=target.user or "", PGDATABASE=target.database or "")
    env.update(PGAPPNAME="bootback-restore", PGCONNECT_TIMEOUT="20")
    if target.port:
        env["PGPORT"] = str(target.port)
    if target.sslmode:
        env["PGSSLMODE"] = target.sslmode
    env = {k: v for k, v in env.items() if v}
    cmd = [str(bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-w", *args]
    # Without a password the file is empty: the caller's ~/.pgpass (root's, for the API's user too) is not read.
    escaped = (target.password or "").replace("\\", "\\\\").replace(":", "\\:")
    with secret_file(f"*:*:*:*:{escaped}\n" if target.password is not None else "") as passfile:
        env["PGPASSFILE"] = str(passfile)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)


def _first_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        if "ERROR" in ln or "FATAL" in ln or "error" in ln:
            return ln
    return lines[0] if lines else "no message"


@contextmanager
def disposable_server(
    item: Item, repo: str, point: str, work_root: Path, view_mode: str = "auto", keys: KeySource | None = None
) -> Iterator[DisposableServer]:
    """A running server on a private view of ``item``'s data directory, stopped and deleted on leaving."""
    if item.kind != "postgres":
        raise ItemRecoveryError(f"{item.browser_path} is a {item.kind} item, not a PostgreSQL data directory")
    bindir = server_bindir(major_version(item))
    owner = server_owner("postgres")
    view = CowView(repo, point, item.disk, item.browser_path, work_root, owner, mode=view_mode, keys=keys)
    with view as data:
        server = DisposableServer(data, bindir, data.parent / "run", owner, item.browser_path, view.guard)
        try:
            server.start()
            yield server
        finally:
            server.stop()
