"""What the CLI and the web API call: find the applications of a restore point, pick one, and run one action on it.

Outputs are written whole or not at all: a dump goes to a temporary file beside the output and is renamed into
place only once complete, and every check that can fail (the application, database, table exist; the binaries
are installed; the server starts) runs before anything is written.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config import default_state_dir
from appliance.errors import ItemRecoveryError
from appliance.files import FileBrowser
from appliance.items import mail, mariadb, openldap, postgres
from appliance.items.cowview import CowView
from appliance.items.discovery import KINDS, Item, discover, probe
from appliance.items.space import SpaceGuard
from appliance.items.targets import ServerTarget
from appliance.repo import Repository
from appliance.repo.backends import repository_arg
from appliance.repo.keys import KeySource

KIND_NAMES = {
    "postgres": "PostgreSQL data directory",
    "mariadb": "MariaDB/MySQL data directory",
    "openldap": "OpenLDAP database",
    "maildir": "Maildir",
    "mbox": "mbox mail file",
}


@dataclass(frozen=True)
class Target:
    """A restore point resolved once, so every step (and the FUSE process) reads the same point, with the key
    that unlocked its repository (``--key-file``, ``BOOTBACK_PASSPHRASE``, a prompt)."""

    repo: str
    point: str  # VM@ID, exact
    keys: KeySource | None = field(default=None, compare=False)  # None: the environment's

    @classmethod
    def resolve(cls, repo: str | Path, ref: str, keys: KeySource | None = None) -> Target:
        return cls(str(repo), Repository.open(repository_arg(str(repo)), keys).resolve(ref).ref, keys)

    def open(self) -> Repository:
        return Repository.open(repository_arg(self.repo), self.keys)


def default_work_root() -> Path:
    return default_state_dir() / "items"


def find_items(target: Target, path: str | None = None) -> list[Item]:
    """Every application of the point, or only the one at ``path`` (a look there instead of a walk)."""
    repo = target.open()
    point = repo.resolve(target.point)
    items: list[Item] = []
    for disk in point.disks:
        browser = FileBrowser(repo.open_disk(point, disk.name))
        items += discover(browser, disk.name) if path is None else probe(browser, disk.name, path)
    return items


def select(target: Target, kind: str, path: str | None = None, kinds: tuple[str, ...] | None = None) -> Item:
    """The one item of ``kind`` (or of any of ``kinds``), narrowed by ``path`` (inside its volume) when given."""
    if kind not in KINDS and kinds is None:
        raise ItemRecoveryError(f"unknown application kind {kind!r} (known: {', '.join(KINDS)})")
    wanted = kinds or (kind,)
    items = [i for i in find_items(target, path) if i.kind in wanted]
    if len(items) == 1:
        return items[0]
    what = " or ".join(KIND_NAMES.get(k, k) for k in wanted)
    if not items:
        where = f" at {path}" if path else ""
        raise ItemRecoveryError(f"no {what}{where} in {target.point}")
    paths = ", ".join(i.browser_path for i in items)
    raise ItemRecoveryError(
        f"{target.point} holds {len(items)} applications of kind {what}: choose one with --path ({paths})"
    )


class Output:
    """An output file in the making. ``stage(tmp, guard)`` moves a finished file beside ``out`` (a hidden
    .partial name) while the job's view is still open; leaving the ``with`` block without an error checks the
    reserve once more and renames it into place. So a reserve crossed late (by a server's writes after the last
    poll, seen when the view closes, or still crossed once it is gone) leaves no output, only the one error."""

    def __init__(self, out: Path | None) -> None:
        self.out = out  # None: the job writes no file (a restore into a server)
        self.staged = out.with_name(f".{out.name}.partial-{os.getpid()}") if out is not None else None
        self.guard: SpaceGuard | None = None

    def stage(self, tmp: Path, guard: SpaceGuard | None) -> None:
        assert self.staged is not None, "no output to stage"
        shutil.move(str(tmp), self.staged)
        self.guard = guard

    def __enter__(self) -> Output:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if self.staged is None:
            return
        try:
            if exc is None and self.staged.exists():
                if self.guard is not None:
                    self.guard.check()
                os.replace(self.staged, self.out)
        finally:
            self.staged.unlink(missing_ok=True)


# PostgreSQL -------------------------------------------------------------------------------------------------
WHOLE_DATABASE_HINT = "a whole database is named on its own: --db NAME --dump, or db=NAME in the API"


def split_spec(spec: str) -> tuple[str, str]:
    """'shop.orders' and 'shop.sales.orders' -> ('shop', '[sales.]orders'). A spec names a table only: a whole
    database is named apart (``database``), so one called 'shop.public.orders' is never read as a table."""
    database, _, table = spec.partition(".")
    if not database or not table or spec.count(".") > 2:
        raise ItemRecoveryError(f"expected DB.TABLE or DB.SCHEMA.TABLE, got {spec!r} ({WHOLE_DATABASE_HINT})")
    return database, table


def dump_request(specs: list[str], database: str | None) -> tuple[str, list[str]]:
    """The database and the tables of one dump. With ``database`` (whatever its name, dots included) the specs
    are its tables, [SCHEMA.]TABLE, and none means the whole of it; without, they are DB.[SCHEMA.]TABLE of one
    database."""
    if database is not None:
        return database, list(specs)
    if not specs:
        raise ItemRecoveryError(f"name tables as DB.TABLE ({WHOLE_DATABASE_HINT})")
    parsed = [split_spec(s) for s in specs]
    if len({db for db, _ in parsed}) > 1:
        raise ItemRecoveryError(
            f"dump tables of one database at a time, not {', '.join(sorted({d for d, _ in parsed}))}"
        )
    return parsed[0][0], [t for _, t in parsed]


def _checked_dump_request(
    specs: list[str], database: str | None, out: Path | None, to: ServerTarget | None, scheme: str
) -> tuple[str, list[str]]:
    """A database dump's request checked: exactly one destination, the output file's directory there, and
    ``dump_request``'s database and tables."""
    if (out is None) == (to is None):
        raise ItemRecoveryError(f"give exactly one of -o FILE and --to {scheme}://...")
    database, names = dump_request(specs, database)
    if out is not None and not out.parent.is_dir():
        raise ItemRecoveryError(f"no such directory for the output: {out.parent}")
    return database, names


def pg_list(
    target: Target, item: Item, work_root: Path, database: str | None = None, counts: bool = True
) -> list[postgres.Table]:
    """Tables with exact row counts; ``counts=False`` reads only the catalogs (no table is scanned or fetched)."""
    with postgres.disposable_server(item, target.repo, target.point, work_root, keys=target.keys) as server:
        names = [database] if database else server.databases()
        return [t for name in names for t in server.tables(name, counts)]


def pg_databases(target: Target, item: Item, work_root: Path) -> list[str]:
    with postgres.disposable_server(item, target.repo, target.point, work_root, keys=target.keys) as server:
        return server.databases()


def pg_dump(
    target: Target,
    item: Item,
    work_root: Path,
    specs: list[str],
    out: Path | None = None,
    to: ServerTarget | None = None,
    as_name: str | None = None,
    database: str | None = None,
) -> str:
    """Dump the whole ``database``, or tables DB.[SCHEMA.]TABLE of one database, to ``out`` (SQL) or restore
    them into the server at ``to`` (all in one transaction); returns what was done."""
    database, names = _checked_dump_request(specs, database, out, to, "postgresql")
    if as_name is not None and len(names) != 1:
        raise ItemRecoveryError("--as renames one table; to restore a database under another name, name it in --to")
    if to is not None:
        postgres.check_target(postgres.server_bindir(postgres.major_version(item)), to)
        with postgres.disposable_server(item, target.repo, target.point, work_root, keys=target.keys) as server:
            what, dump = _pg_dump_on(server, database, names, as_name)
            server.restore(dump, to)
        return f"restored {what} from {target.point}"
    with (
        Output(out) as output,
        postgres.disposable_server(item, target.repo, target.point, work_root, keys=target.keys) as server,
    ):
        what, dump = _pg_dump_on(server, database, names, as_name)
        output.stage(dump, server.guard)
    return f"dumped {what} from {target.point} to {out}"


def _pg_dump_on(
    server: postgres.DisposableServer, database: str, names: list[str], as_name: str | None
) -> tuple[str, Path]:
    """The dump made on the disposable server, and what it holds."""
    server.check_database(database)
    tables = [server.find_table(database, t) for t in names]
    if as_name:
        tables = [server.rename_table(tables[0], as_name)]
    dump = server.rundir / "dump.sql"
    server.dump(database, tables, dump)
    return ", ".join(f"{database}.{t.schema}.{t.name}" for t in tables) or f"database {database}", dump


# Mail -------------------------------------------------------------------------------------------------------
MAIL_KINDS = ("maildir", "mbox")


@contextmanager
def mail_store(target: Target, item: Item, work_root: Path) -> Iterator[tuple[mail.Store, Path, SpaceGuard]]:
    """The store on a private view, a scratch directory beside it for outputs in the making, and the view's
    space guard."""
    if item.kind not in MAIL_KINDS:
        raise ItemRecoveryError(f"{item.browser_path} is a {item.kind} item, not a mail store")
    root, _, name = item.browser_path.rpartition("/") if item.kind == "mbox" else (item.browser_path, "", "")
    owner = (os.geteuid(), os.getegid())
    view = CowView(target.repo, target.point, item.disk, root, work_root, owner, keys=target.keys)
    with view as data:
        scratch = data.parent / "out"
        scratch.mkdir()
        yield mail.Store(data / name if name else data, item.kind), scratch, view.guard


def mail_list(target: Target, item: Item, work_root: Path, flt: mail.Filter) -> list[mail.Message]:
    with mail_store(target, item, work_root) as (store, _, _):
        return store.select(flt)


def mail_export(target: Target, item: Item, work_root: Path, flt: mail.Filter, out: Path, fmt: str) -> str:
    if not out.parent.is_dir():
        raise ItemRecoveryError(f"no such directory for the output: {out.parent}")
    with Output(out) as output, mail_store(target, item, work_root) as (store, scratch, guard):
        msgs = store.select(flt)
        tmp = scratch / "export"
        store.export(msgs, tmp, fmt, guard.claim)
        output.stage(tmp, guard)
    return f"exported {len(msgs)} message(s) from {item.browser_path} of {target.point} to {out}"


def mail_restore(
    target: Target, item: Item, work_root: Path, flt: mail.Filter, dest: Path, folder: str | None, parents: bool = False
) -> str:
    """The matching messages into the Maildir ``dest``; ``parents``: make its missing parent directories (the
    API's, whose ``dest`` was checked to lie under the restore root)."""
    with mail_store(target, item, work_root) as (store, _, _):
        count = store.restore(store.select(flt), dest, folder, parents)
    return f"restored {count} message(s) from {item.browser_path} of {target.point} into {dest}"


# MariaDB ----------------------------------------------------------------------------------------------------
def mariadb_list(
    target: Target, item: Item, work_root: Path, database: str | None = None, counts: bool = True
) -> list[postgres.Table]:
    with mariadb.disposable_server(item, target.repo, target.point, work_root, keys=target.keys) as server:
        return server.tables(database, counts)


def mariadb_databases(target: Target, item: Item, work_root: Path) -> list[str]:
    with mariadb.disposable_server(item, target.repo, target.point, work_root, keys=target.keys) as server:
        return server.databases()


def mariadb_dump(
    target: Target,
    item: Item,
    work_root: Path,
    specs: list[str],
    out: Path | None = None,
    to: ServerTarget | None = None,
    database: str | None = None,
) -> str:
    """The whole ``database``, or DB.TABLE specs (several tables of one database), to ``out`` or into the server
    at ``to``."""
    database, names = _checked_dump_request(specs, database, out, to, "mariadb")
    if to is not None:
        mariadb.check_target(to)  # a wrong password or an unreachable server fails before the server starts
    with (
        Output(out) as output,
        mariadb.disposable_server(item, target.repo, target.point, work_root, keys=target.keys) as server,
    ):
        have = {t.name for t in server.tables(database, counts=False)}
        missing = [n for n in names if n not in have]
        if missing:
            raise ItemRecoveryError(
                f"no table {missing[0]!r} in database {database!r} of {item.browser_path} "
                f"(tables: {', '.join(sorted(have))})"
            )
        dump = server.rundir / "dump.sql"
        server.dump(database, names, dump)
        what = ", ".join(f"{database}.{n}" for n in names) or f"database {database}"
        if to is not None:
            mariadb.restore(dump, to, names or sorted(have))
            return f"restored {what} from {target.point}"
        output.stage(dump, server.guard)
    return f"dumped {what} from {target.point} to {out}"


# OpenLDAP ---------------------------------------------------------------------------------------------------
def _directory(target: Target, item: Item, work_root: Path) -> openldap.Directory:
    repo = target.open()
    browser = FileBrowser(repo.open_disk(repo.resolve(target.point), item.disk))
    return openldap.Directory(item, target.repo, target.point, work_root, browser, target.keys)


def ldap_entries(target: Target, item: Item, work_root: Path, ldap_filter: str | None) -> list[openldap.Entry]:
    with _directory(target, item, work_root) as directory:
        return directory.entries(ldap_filter)


def ldap_export(target: Target, item: Item, work_root: Path, ldap_filter: str | None, out: Path) -> str:
    if not out.parent.is_dir():
        raise ItemRecoveryError(f"no such directory for the output: {out.parent}")
    with Output(out) as output, _directory(target, item, work_root) as directory:
        entries = directory.entries(ldap_filter)
        if not entries:
            raise ItemRecoveryError(f"no entry matches {ldap_filter!r}: nothing to export")
        tmp = directory.scratch / "export.ldif"
        text = ("\n\n".join(e.ldif for e in entries) + "\n").encode()
        directory.view.guard.claim(len(text))
        tmp.write_bytes(text)
        output.stage(tmp, directory.view.guard)
    return f"exported {len(entries)} entries from {item.browser_path} of {target.point} to {out}"


def ldap_restore(
    target: Target, item: Item, work_root: Path, ldap_filter: str | None, to: ServerTarget, bind_dn: str
) -> str:
    """The matching entries into the slapd at ``to`` (its password set), bound as ``bind_dn``."""
    if to.password is None:
        raise ItemRecoveryError("an LDAP restore needs the bind password (--password-file, or password in the API)")
    with _directory(target, item, work_root) as directory:
        entries = directory.entries(ldap_filter)
        if not entries:
            raise ItemRecoveryError(f"no entry matches {ldap_filter!r}: nothing to restore")
        openldap.restore(entries, to, bind_dn, directory.scratch)
    return f"restored {len(entries)} entries from {item.browser_path} of {target.point} into {to}"
