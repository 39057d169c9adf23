"""Find the applications inside a restore point's disks by the files they leave, read through the file browser.

Each kind is recognised by a marker that its own server writes and checks:
- PostgreSQL: a directory with ``PG_VERSION`` and ``global/pg_control`` (the version is PG_VERSION's text);
- MariaDB/MySQL: a directory with a ``mysql/`` system schema and ``ibdata1`` or ``aria_log_control``
  (the version from ``mysql_upgrade_info`` / ``mariadb_upgrade_info`` when present);
- OpenLDAP: ``data.mdb`` in a directory under ``/var/lib/ldap`` (LMDB, the back-mdb database);
- Maildir: a directory with ``cur``, ``new`` and ``tmp``; mbox: a file under ``/var/mail`` or
  ``/var/spool/mail``, or named ``*.mbox``/``mbox``, that begins with ``From ``.

The walk is bounded (``max_dirs``) and skips the operating system's own trees, so a full root file system is
scanned in seconds; a directory found as an application is not descended into.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from appliance.errors import BootbackError
from appliance.files import FileBrowser
from appliance.files.filesystems import Entry

KINDS = ("postgres", "mariadb", "openldap", "maildir", "mbox")
SKIP = {"proc", "sys", "dev", "run", "usr", "boot", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "snap"}
MAX_DIRS = 20_000
MAX_VERSION_BYTES = 256


@dataclass(frozen=True)
class Item:
    kind: str  # one of KINDS
    disk: str
    volume: str
    path: str  # inside the volume: /var/lib/postgresql/15/main
    version: str

    @property
    def browser_path(self) -> str:
        return f"/{self.volume}{self.path}"

    def to_json(self) -> dict:
        return {"kind": self.kind, "disk": self.disk, "volume": self.volume, "path": self.path, "version": self.version}


def _small_text(browser: FileBrowser, path: str) -> str:
    try:
        with browser.open(path) as fh:
            raw = fh.read(MAX_VERSION_BYTES)
    except BootbackError:
        return ""
    return raw.decode("utf-8", "replace").strip()


def _classify_dir(browser: FileBrowser, path: str, inner: str, names: dict[str, Entry]) -> tuple[str, str] | None:
    """(kind, version) when the directory at browser path ``path`` with children ``names`` is an application's."""
    if names.get("PG_VERSION", _NONE).kind == "file" and names.get("global", _NONE).kind == "directory":
        try:
            browser.stat(f"{path}/global/pg_control")
        except BootbackError:
            return None
        return "postgres", _small_text(browser, f"{path}/PG_VERSION")
    if names.get("mysql", _NONE).kind == "directory" and ("ibdata1" in names or "aria_log_control" in names):
        if "mysql.ibd" in names:  # MySQL 8's data dictionary: not something MariaDB can open
            return "mariadb", "mysql-8"
        for marker in ("mariadb_upgrade_info", "mysql_upgrade_info"):
            if marker in names:
                text = _small_text(browser, f"{path}/{marker}")
                m = re.match(r"[0-9][0-9A-Za-z.+~-]*", text)
                return "mariadb", m[0] if m else "unknown"
        return "mariadb", "unknown"
    if all(names.get(d, _NONE).kind == "directory" for d in ("cur", "new", "tmp")):
        return "maildir", "-"
    if names.get("data.mdb", _NONE).kind == "file" and (inner + "/").startswith("/var/lib/ldap/"):
        return "openldap", "mdb"
    return None


_NONE = Entry("", "none", 0, None)


def _is_mbox_candidate(dir_inner: str, name: str) -> bool:
    return dir_inner in ("/var/mail", "/var/spool/mail") or name == "mbox" or name.endswith(".mbox")


def _is_mbox(browser: FileBrowser, path: str) -> bool:
    try:
        with browser.open(path) as fh:
            return fh.read(5) == b"From "
    except BootbackError:
        return False


def discover(browser: FileBrowser, disk: str, max_dirs: int = MAX_DIRS) -> list[Item]:
    """Every application found on the disk behind ``browser``, in path order per volume."""
    found: list[Item] = []
    budget = [max_dirs]
    for vol in browser.volumes():
        if vol.filesystem is None:
            continue
        try:
            _walk(browser, disk, vol.id, "/", found, budget)
        except BootbackError:
            continue  # a volume the browser cannot read holds nothing we can list; files/extract say why
    return found


def _walk(browser: FileBrowser, disk: str, vol: str, inner: str, found: list[Item], budget: list[int]) -> None:
    if budget[0] <= 0:
        return
    budget[0] -= 1
    path = f"/{vol}{inner}".rstrip("/")
    try:
        entries = browser.listdir(path)
    except BootbackError:
        return
    names = {e.name: e for e in entries}
    kind = _classify_dir(browser, path, inner, names) if inner != "/" else None
    if kind is not None:
        found.append(Item(kind[0], disk, vol, inner, kind[1]))
        return
    for e in entries:
        child = f"{inner.rstrip('/')}/{e.name}"
        if e.kind == "directory":
            if inner == "/" and e.name in SKIP:
                continue
            _walk(browser, disk, vol, child, found, budget)
        elif (
            e.kind == "file" and _is_mbox_candidate(inner.rstrip("/"), e.name) and _is_mbox(browser, f"{path}/{e.name}")
        ):
            found.append(Item("mbox", disk, vol, child, "-"))


def probe(browser: FileBrowser, disk: str, path: str) -> list[Item]:
    """The application at ``path`` (inside a volume) on any volume of the disk: one look instead of a walk."""
    inner = "/" + path.strip("/")
    found: list[Item] = []
    for vol in browser.volumes():
        if vol.filesystem is None or inner == "/":
            continue
        where = f"/{vol.id}{inner}"
        try:
            entry = browser.stat(where)
            if entry.kind == "file":
                parent = inner.rsplit("/", 1)[0]
                if _is_mbox_candidate(parent, entry.name) and _is_mbox(browser, where):
                    found.append(Item("mbox", disk, vol.id, inner, "-"))
                continue
            names = {e.name: e for e in browser.listdir(where)}
        except BootbackError:
            continue
        kind = _classify_dir(browser, where, inner, names)
        if kind is not None:
            found.append(Item(kind[0], disk, vol.id, inner, kind[1]))
    return found
