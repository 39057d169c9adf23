"""OpenLDAP item recovery: entries of a backed-up back-mdb database read with ``slapcat`` on a copy-on-write view.

slapcat needs a configuration naming the database and the schema its entries use. Ours is a few lines of
slapd.conf written into the private workspace: the database directory is the view (never a path of this host),
the suffix a placeholder (slapcat dumps every entry of the database whatever the suffix), and the schema the
VM's own when its cn=config (``/etc/ldap/slapd.d``) is on the same volume, converted from LDIF to slapd.conf
directives, else Debian's standard schema files. Filters are slapcat's own (``-a``), so they mean exactly what
they mean to slapd. A restore adds entries with ``ldapadd`` after checking that none of them exists in the
target; operational attributes (entryUUID, timestamps ...) are left out, since a server sets those itself.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import BootbackError, ItemRecoveryError
from appliance.files import FileBrowser
from appliance.items.cowview import CowView
from appliance.items.discovery import Item
from appliance.items.targets import ServerTarget, TargetConflictError, TargetLoginError, check_name, secret_file
from appliance.repo.keys import KeySource

SLAPCAT = Path("/usr/sbin/slapcat")
STANDARD_SCHEMA = Path("/etc/ldap/schema")
STANDARD_FILES = ("core", "cosine", "nis", "inetorgperson")
SLAPD_D = "/etc/ldap/slapd.d/cn=config/cn=schema"
MAX_SCHEMA_BYTES = 4 << 20
OPERATIONAL = {
    "structuralobjectclass",
    "entryuuid",
    "entrycsn",
    "creatorsname",
    "createtimestamp",
    "modifiersname",
    "modifytimestamp",
    "contextcsn",
    "hassubordinates",
    "subschemasubentry",
}
_DIRECTIVES = {
    "olcattributetypes": "attributetype",
    "olcobjectclasses": "objectclass",
    "olcobjectidentifier": "objectidentifier",
}


@dataclass(frozen=True)
class Entry:
    dn: str
    ldif: str  # the entry's LDIF record, without the separating blank line

    def to_json(self) -> dict:
        classes = [v for a, v in _attributes(self.ldif) if a.lower() == "objectclass"]
        return {"dn": self.dn, "objectClass": classes}


def _unfold(ldif: str) -> list[str]:
    """LDIF lines with continuations (lines starting with one space) joined."""
    out: list[str] = []
    for line in ldif.splitlines():
        if line.startswith(" ") and out:
            out[-1] += line[1:]
        else:
            out.append(line)
    return out


def _attributes(record: str) -> list[tuple[str, str]]:
    pairs = []
    for line in _unfold(record):
        if line and not line.startswith("#") and ":" in line:
            name, _, value = line.partition(":")
            pairs.append((name, value.lstrip(": ").strip()))
    return pairs


def parse_ldif(text: str) -> list[Entry]:
    entries = []
    for record in re.split(r"\n\s*\n", text.strip()):
        lines = _unfold(record)
        if not lines or not lines[0].lower().startswith("dn:"):
            continue
        dn = lines[0][3:].strip()
        if dn.startswith(":"):  # base64 DN: show it decoded
            import base64

            dn = base64.b64decode(dn[1:].strip()).decode("utf-8", "replace")
        entries.append(Entry(dn, record.strip("\n")))
    return entries


def without_operational(entry: Entry) -> str:
    """The record as a client may add it: operational attributes (and their continuation lines) dropped."""
    kept: list[str] = []
    skipping = False
    for line in entry.ldif.splitlines():
        if line.startswith(" "):
            if not skipping:
                kept.append(line)
            continue
        name = line.split(":", 1)[0].split(";", 1)[0].strip().lower()
        skipping = name in OPERATIONAL
        if not skipping:
            kept.append(line)
    return "\n".join(kept)


def schema_from_slapd_d(browser: FileBrowser, volume: str) -> str | None:
    """The VM's own schema as slapd.conf directives, from its cn=config, or None when it has none."""
    try:
        files = [e for e in browser.listdir(f"/{volume}{SLAPD_D}") if e.kind == "file" and e.name.endswith(".ldif")]
    except BootbackError:
        return None
    order = sorted(files, key=lambda e: int(m[1]) if (m := re.search(r"\{(\d+)\}", e.name)) else 0)
    out, total = [], 0
    for e in order:
        total += e.size
        if total > MAX_SCHEMA_BYTES:
            raise ItemRecoveryError(f"the schema in {SLAPD_D} is larger than {MAX_SCHEMA_BYTES:,} bytes")
        with browser.open(f"/{volume}{SLAPD_D}/{e.name}") as fh:
            text = fh.read().decode("utf-8", "replace")
        for name, value in _attributes(text):
            directive = _DIRECTIVES.get(name.lower())
            if directive:
                definition = re.sub(r"^\{\d+\}", "", value)  # cn=config's ordering prefix
                out.append(f"{directive} {definition}")
    return "\n".join(out) + "\n"


def write_config(space: Path, dbdir: Path, schema: str | None) -> Path:
    conf = space / "slapd.conf"
    lines = []
    if schema is None:
        lines += [f"include {STANDARD_SCHEMA / name}.schema" for name in STANDARD_FILES]
    else:
        (space / "vm.schema").write_text(schema)
        lines.append(f"include {space / 'vm.schema'}")
    size = (dbdir / "data.mdb").stat().st_size
    lines += [
        "modulepath /usr/lib/ldap",
        "moduleload back_mdb",
        "database mdb",
        'suffix "dc=bootback-recovery"',  # a placeholder: slapcat dumps every entry whatever the suffix
        f'directory "{dbdir}"',
        f"maxsize {size + (1 << 20)}",
    ]
    conf.write_text("\n".join(lines) + "\n")
    return conf


def slapcat(conf: Path, where: str, ldap_filter: str | None = None) -> list[Entry]:
    if not SLAPCAT.is_file():
        raise ItemRecoveryError(f"OpenLDAP's slapcat is not installed (no {SLAPCAT}; on Debian: apt-get install slapd)")
    cmd = [str(SLAPCAT), "-f", str(conf), "-o", "ldif-wrap=no"]
    if ldap_filter:
        cmd += ["-a", ldap_filter]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        why = [ln for ln in p.stderr.splitlines() if ln.strip()]
        raise ItemRecoveryError(f"slapcat could not read {where}: {why[-1] if why else 'exit ' + str(p.returncode)}")
    return parse_ldif(p.stdout)


def restore(entries: list[Entry], target: ServerTarget, bind_dn: str, scratch: Path) -> None:
    """ldapadd of the entries (parents first, as slapcat gives them); refused if any DN exists in the target.
    The bind password is read by the tools from a file of its own (``-y``), never from argv."""
    check_name("bind_dn", bind_dn)
    with secret_file(target.password or "") as password:
        auth = ["-x", "-H", str(target), "-D", bind_dn, "-y", str(password)]
        for e in entries:
            p = subprocess.run(
                ["ldapsearch", *auth, "-LLL", "-s", "base", "-b", e.dn, "1.1"],
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
            if p.returncode == 0:
                raise TargetConflictError(f"the target already has {e.dn!r}: nothing was restored")
            if p.returncode != 32:  # 32: no such object, the expected answer
                why = p.stderr.strip().splitlines()
                raise TargetLoginError(
                    f"cannot query the target {target}, nothing was restored: "
                    f"{why[-1] if why else 'exit ' + str(p.returncode)}"
                )
        ldif = scratch / "restore.ldif"
        ldif.write_text("\n\n".join(without_operational(e) for e in entries) + "\n")
        p = subprocess.run(
            ["ldapadd", *auth, "-f", str(ldif)], capture_output=True, text=True, timeout=3600, stdin=subprocess.DEVNULL
        )
    if p.returncode != 0:
        why = p.stderr.strip().splitlines()
        raise ItemRecoveryError(f"ldapadd into {target} failed: {why[-1] if why else 'exit ' + str(p.returncode)}")


class Directory:
    """``with Directory(...) as d:`` the database on a private view, with its slapcat configuration."""

    def __init__(
        self, item: Item, repo: str, point: str, work_root: Path, browser: FileBrowser, keys: KeySource | None = None
    ) -> None:
        if item.kind != "openldap":
            raise ItemRecoveryError(f"{item.browser_path} is a {item.kind} item, not an OpenLDAP database")
        self.item = item
        self.schema = schema_from_slapd_d(browser, item.volume)
        owner = (os.geteuid(), os.getegid())
        self.view = CowView(repo, point, item.disk, item.browser_path, work_root, owner, keys=keys)

    def __enter__(self) -> Directory:
        data = self.view.__enter__()
        try:
            self.scratch = data.parent / "ldap"
            self.scratch.mkdir(mode=0o700)
            self.conf = write_config(self.scratch, data, self.schema)
        except BaseException as exc:
            self.view.close(exc)
            raise
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.view.close(exc)

    def entries(self, ldap_filter: str | None = None) -> list[Entry]:
        return slapcat(self.conf, self.item.browser_path, ldap_filter)
