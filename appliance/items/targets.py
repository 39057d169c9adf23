"""Where a restore writes, checked here once for the CLI, the API and the page: a running server (PostgreSQL,
MariaDB, slapd) named by a URL, or a Maildir.

A server target is parsed into its parts (scheme, host, port or Unix socket, user, database); the client tools
get those parts as separate arguments or environment variables, never the caller's text as a whole, so a URL
cannot smuggle in a client option (``passfile=``, ``service=``, ``options=-c ...``), and a name beginning with
'-' is refused where a tool could read it as an option. A Unix socket is allowed anywhere from the CLI (its
caller is root on the appliance) and, from the API, only under the directories the operator listed in
``BOOTBACK_ITEMS_SOCKET_DIRS``. The password travels apart from the URL; the tools read it from a 0600 file in a
private temporary directory (``secret_file``) that is removed when the tool ends: never argv (world-readable in
/proc), never a log line, an error or a response.

A Maildir restore from the API goes only under the operator's restore root (``BOOTBACK_ITEMS_RESTORE_ROOT``,
default STATE/items-restore), named relative to it, every existing component a real directory (no symlink).
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from appliance.errors import ItemRecoveryError

SOCKET_DIRS_ENV = "BOOTBACK_ITEMS_SOCKET_DIRS"  # ':'-separated directories whose sockets the API may reach
RESTORE_ROOT_ENV = "BOOTBACK_ITEMS_RESTORE_ROOT"  # where the API's Maildir restores go
SECRETS_ENV = "BOOTBACK_ITEMS_SECRETS"  # where password files the API may name (password_ref) live

SCHEMES = {
    "postgres": ("postgresql", "postgres"),
    "mariadb": ("mariadb", "mysql"),
    "openldap": ("ldap", "ldaps", "ldapi"),
}
# query parameters a target URL may carry; libpq's others name files (passfile, sslkey, service) or server options
PARAMS = {"postgres": {"host", "port", "sslmode"}, "mariadb": {"socket"}, "openldap": set()}
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|[0-9A-Fa-f:.]{2,45}")
NAME = re.compile(r"[^-\x00-\x1f\x7f][^\x00-\x1f\x7f]{0,254}")  # users, databases, DNs: no control, no leading '-'
PASSWORD = re.compile(r"[^\x00-\x1f\x7f]{1,1024}")
REF = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
PATH_PART = re.compile(r"[^-./\x00-\x1f\x7f][^/\x00-\x1f\x7f]{0,254}")


class TargetLoginError(ItemRecoveryError):
    """The target server could not be reached or refused the login: nothing was written to it."""


class TargetConflictError(ItemRecoveryError):
    """The target already holds what would be restored (or refused it as a whole): nothing was written."""


@dataclass(frozen=True)
class ServerTarget:
    """A running server to restore into. ``socket``: a socket directory (PostgreSQL) or file (MariaDB, ldapi)
    instead of host and port. The password is never part of ``str()`` or ``repr()``."""

    kind: str
    scheme: str
    host: str | None = None
    port: int | None = None
    socket: str | None = None
    user: str | None = None
    database: str | None = None
    sslmode: str | None = None
    password: str | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        user = f"{quote(self.user, safe='')}@" if self.user else ""
        if self.kind == "openldap":
            where = quote(self.socket, safe="") if self.socket else self._hostport()
            return f"{self.scheme}://{where}"
        where = self._hostport() if self.host or self.port else ""
        query = f"?{'host' if self.kind == 'postgres' else 'socket'}={self.socket}" if self.socket else ""
        return f"{self.scheme}://{user}{where}/{quote(self.database or '', safe='')}{query}"

    def _hostport(self) -> str:
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host or ""
        return f"{host}:{self.port}" if self.port else host


def socket_dirs_from_env() -> tuple[Path, ...]:
    """The API's allowed socket directories: ``BOOTBACK_ITEMS_SOCKET_DIRS`` (none when unset)."""
    return tuple(Path(p) for p in os.environ.get(SOCKET_DIRS_ENV, "").split(":") if p)


def parse_server(
    kind: str,
    url: str,
    password: str | None = None,
    socket_dirs: Sequence[Path] | None = None,
    field_name: str = "--to",
    password_in_url: bool = True,
) -> ServerTarget:
    """``url`` as a ``kind`` target, or one error naming ``field_name`` and what is wrong (never the password).
    ``socket_dirs``: where a Unix socket may be (None: anywhere); ``password_in_url``: the CLI's legacy
    postgresql://USER:PASSWORD@... form (the API takes the password only as its own field)."""
    schemes = SCHEMES[kind]
    if not isinstance(url, str) or len(url) > 4096 or re.search(r"[\x00-\x20\x7f]", url):
        raise ItemRecoveryError(f"{field_name}: expected a {schemes[0]}:// URL without spaces or control characters")
    # Messages name the part that is wrong, never the URL as sent: it may hold a password.
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        raise ItemRecoveryError(f"{field_name}: not a valid URL (is the port a number from 0 to 65535?)") from None
    if u.scheme not in schemes:
        wanted = " or ".join(s + "://" for s in schemes)
        raise ItemRecoveryError(f"{field_name}: must be a {wanted} URL, not {u.scheme[:20] or 'one without a scheme'}")
    if u.fragment:
        raise ItemRecoveryError(f"{field_name}: no #fragment in a target URL")
    if u.password is not None:
        if not password_in_url:
            raise ItemRecoveryError(f"{field_name}: put the password in its own field, not in the URL")
        if password is None:
            password = unquote(u.password)
    if password is not None and not PASSWORD.fullmatch(password):
        raise ItemRecoveryError("password: expected 1 to 1024 characters without control characters")
    params = dict(parse_qsl(u.query, keep_blank_values=True))
    unknown = sorted(set(params) - PARAMS[kind])
    if unknown:
        allowed = ", ".join(sorted(PARAMS[kind])) or "none"
        raise ItemRecoveryError(f"{field_name}: parameter {unknown[0]!r} is not allowed (allowed: {allowed})")
    user = _name(f"{field_name} user", unquote(u.username)) if u.username else None
    socket = params.get("host") or params.get("socket")
    host = u.hostname
    if kind == "openldap":
        if u.username or u.path not in ("", "/") or u.query:
            raise ItemRecoveryError(
                f"{field_name}: an LDAP target is only {u.scheme}://HOST[:PORT] (no user, DN, query)"
            )
        database = None
        if u.scheme == "ldapi":
            socket, host = unquote(u.netloc) or None, None
            if socket is None:
                raise ItemRecoveryError(f"{field_name}: ldapi:// needs its socket, ldapi://%2Frun%2Fslapd%2Fldapi")
    else:
        database = _name(f"{field_name} database", unquote(u.path[1:])) if len(u.path) > 1 else None
        if database is None:
            raise ItemRecoveryError(f"{field_name}: name the target database, {schemes[0]}://USER@HOST/DB")
    if socket is not None:
        if host and kind == "postgres":
            raise ItemRecoveryError(f"{field_name}: give a host or ?host=SOCKET_DIR, not both")
        host = None  # PostgreSQL's port still names the socket file (.s.PGSQL.PORT)
        _check_socket(field_name, socket, socket_dirs)
    elif not host:
        if socket_dirs is not None:
            raise ItemRecoveryError(f"{field_name}: name the server's host (or an allowed Unix socket)")
    elif not HOST.fullmatch(host):
        raise ItemRecoveryError(f"{field_name}: {host[:80]!r} is not a host name or address")
    if "port" in params:
        if port is not None or not params["port"].isdigit() or not 0 < int(params["port"]) < 65536:
            raise ItemRecoveryError(f"{field_name}: port must be given once, a number from 1 to 65535")
        port = int(params["port"])
    sslmode = params.get("sslmode")
    if sslmode is not None and sslmode not in SSLMODES:
        raise ItemRecoveryError(f"{field_name}: sslmode must be one of {', '.join(SSLMODES)}, got {sslmode[:40]!r}")
    return ServerTarget(kind, u.scheme, host, port, socket, user, database, sslmode, password)


def check_name(what: str, value: str) -> str:
    """A name handed to a client tool (a bind DN, a table's new name): printable, not read as an option."""
    return _name(what, value)


def _name(what: str, value: str) -> str:
    if not NAME.fullmatch(value):
        raise ItemRecoveryError(f"{what}: {value[:80]!r} must be 1 to 255 printable characters and not begin with '-'")
    return value


def _check_socket(field_name: str, socket: str, allowed: Sequence[Path] | None) -> None:
    if not socket.startswith("/") or "/../" in f"{socket}/" or "/./" in f"{socket}/":
        raise ItemRecoveryError(f"{field_name}: a Unix socket must be an absolute path, got {socket[:100]!r}")
    if allowed is None:
        return
    real = os.path.realpath(socket)
    if not any(real.startswith(f"{os.path.realpath(d)}/") for d in allowed):
        where = ", ".join(map(str, allowed)) or f"none configured ({SOCKET_DIRS_ENV})"
        raise ItemRecoveryError(
            f"{field_name}: Unix socket {socket[:100]!r} is outside the allowed directories ({where})"
        )


# The password, out of argv ---------------------------------------------------------------------------------
@contextmanager
def secret_file(text: str) -> Iterator[Path]:
    """``text`` in a 0600 file of a private 0700 directory (on tmpfs when /dev/shm is there, so it never reaches
    a disk), removed on leaving whatever happens."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="bootback-secret-", dir=base) as d:
        path = Path(d) / "secret"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)


def read_password_ref(name: str, secrets_dir: Path) -> str:
    """The password in the operator's file ``secrets_dir/name`` (the API's ``password_ref``): a plain name."""
    if not REF.fullmatch(name):
        raise ItemRecoveryError(f"password_ref: expected a file name such as pg-restore, got {name[:80]!r}")
    return read_password_file(secrets_dir / name, "password_ref")


def read_password_file(path: Path, field_name: str = "--password-file") -> str:
    """The first line of a regular file (no symlink followed, no FIFO waited on): the CLI's --password-file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise ItemRecoveryError(f"{field_name}: cannot open the password file {path.name!r}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise ItemRecoveryError(f"{field_name}: {path.name!r} is not a regular file")
        text = fh.read(1026).decode(errors="replace")
    password = text.splitlines()[0] if text else ""
    if not PASSWORD.fullmatch(password):
        raise ItemRecoveryError(f"{field_name}: {path.name!r} holds no usable password on its first line")
    return password


# Maildir ---------------------------------------------------------------------------------------------------
def maildir_under(root: Path, relative: str, field_name: str = "restore_to") -> Path:
    """``root/relative`` for a Maildir restore: a relative path of plain names (no '..', '.', leading '-' or
    '.'), whose existing components are real directories, never symlinks; the root is made when missing, the
    Maildir's other parents by the restore itself, once something matched."""
    parts = relative.split("/") if isinstance(relative, str) else []
    if not relative or len(relative) > 1024 or not all(PATH_PART.fullmatch(p) for p in parts):
        raise ItemRecoveryError(
            f"{field_name}: expected a Maildir path relative to the restore root such as alice/Maildir "
            f"(plain names, no '..'), got {str(relative)[:100]!r}"
        )
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    where = root
    for part in parts:
        where = where / part
        try:
            st = os.lstat(where)
        except FileNotFoundError:
            break
        if not stat.S_ISDIR(st.st_mode):
            raise ItemRecoveryError(f"{field_name}: {relative[:100]!r} leads through something that is not a directory")
    return root / relative
