"""Application groups: which VMs a lab boots, from which restore points, in which order, with which checks.

Written by people (a YAML or JSON file, or the API's JSON), so every field is checked here, once, and an error
names the field and the value. Example::

    name: shop
    network: 10.0.0.0/24          # the lab's segment (default); the lab itself is .1
    at: 2026-05-01T03:00:00Z      # optional: each VM's newest point at or before this time (a consistent group)
    schedule: "0 3 * * *"         # optional: the daemon verifies the group then (cron; appliance.lab.schedule)
    dns: true                     # optional: the lab answers its VMs' names (db, db.lab) on its own address
    vms:
      - vm: db
        address: 10.0.0.10        # given by the lab's DHCP (default: the next free one from .10)
        cache_mib: 2048           # write cache its sandbox may take (default 512): checked before the lab starts
        checks:
          - {type: console, expect: "db ready", timeout: 60}
          - {type: tcp, port: 5432}
      - vm: app
        checks:
          - {type: http, port: 80, path: /status, status: 200, text: "db: reachable"}
          - {type: screenshot}
          - {type: agent}           # qemu-guest-agent answers (guest-ping)
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from appliance.errors import UsageError
from appliance.lab.network import check_subnet
from appliance.lab.schedule import check_schedule
from appliance.repo.manifest import check_vm_name
from appliance.verification import compile_expect

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_VMS = 16
MAX_CHECKS = 32
MAX_FILE = 256 << 10  # bytes of a group file
MIN_MEMORY, MAX_MEMORY = 96, 8192  # MiB; the Debian kernel does not boot in 64
DEFAULT_CACHE_MIB, MAX_CACHE_MIB = 512, 1 << 22  # MiB of write cache a VM's sandbox may take (up to 4 TiB)
NICS = ("e1000", "virtio-net-pci", "rtl8139")
CHECK_TYPES = ("console", "ping", "tcp", "http", "script", "screenshot", "agent")
DEFAULT_TIMEOUT = 120.0  # seconds a check may take (it retries within them)
MAX_TIMEOUT = 3600.0


@dataclass(frozen=True)
class Check:
    type: str
    timeout: float
    expect: str | None = None  # console: a regular expression (RE2)
    port: int | None = None  # tcp, http
    path: str = "/"  # http
    status: int = 200  # http
    text: str | None = None  # http: the body must contain it
    https: bool = False
    script: list[str] = field(default_factory=list)  # script: argv; the VM's address is appended


@dataclass(frozen=True)
class GroupVM:
    vm: str
    repo: str | None
    point: str  # "latest", a point id, or resolved from the group's ``at``
    address: str
    mac: str
    memory_mib: int
    nic: str
    checks: list[Check]
    cache_mib: int = 512  # write-cache space its sandbox may take: a lab is refused when it is not there


@dataclass(frozen=True)
class Group:
    name: str
    network: str
    at: datetime | None
    vms: list[GroupVM]
    schedule: str | None = None  # five cron fields: the daemon verifies the group at those times
    dns: bool = False  # a name server in the lab answering the VMs' names (appliance.lab.nameserver)

    def as_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        doc = asdict(self)
        doc["at"] = self.at.isoformat() if self.at else None
        return doc


def load_file(path: Path) -> dict[str, Any]:
    """A group file's document (YAML, which JSON is a subset of), before ``parse_group``."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as exc:
        raise UsageError(f"group file {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE:
        raise UsageError(f"group file {path}: larger than {MAX_FILE} bytes")
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise UsageError(f"group file {path}: not YAML or JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"group file {path}: a mapping with 'name' and 'vms', got {type(doc).__name__}")
    return doc


def _fields(where: str, doc: object, allowed: set[str], required: set[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise UsageError(f"{where}: a mapping, got {doc!r}")
    unknown = sorted(set(map(str, doc)) - allowed)
    if unknown:
        raise UsageError(f"{where}: unknown field {unknown[0]!r}; known: {', '.join(sorted(allowed))}")
    missing = sorted(required - set(doc))
    if missing:
        raise UsageError(f"{where}: missing field {missing[0]!r}")
    return doc


def _number(where: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise UsageError(f"{where}: a number from {low:g} to {high:g}, got {value!r}")
    return value


def _int(where: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UsageError(f"{where}: a whole number from {low} to {high}, got {value!r}")
    return value


def _str(where: str, value: object, max_len: int = 1000) -> str:
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise UsageError(f"{where}: a non-empty string of at most {max_len} characters, got {value!r}")
    return value


def parse_check(where: str, doc: object) -> Check:
    common = {"type", "timeout"}
    allowed = {
        "console": {"expect"},
        "ping": set(),
        "tcp": {"port"},
        "http": {"port", "path", "status", "text", "https"},
        "script": {"script"},
        "screenshot": set(),
        "agent": set(),  # qemu-guest-agent answers guest-ping on its virtio-serial channel
    }
    if not isinstance(doc, dict) or doc.get("type") not in CHECK_TYPES:
        got = doc.get("type") if isinstance(doc, dict) else doc
        raise UsageError(f"{where}: a check with 'type' one of {', '.join(CHECK_TYPES)}, got {got!r}")
    kind = doc["type"]
    required = (
        {"expect"} if kind == "console" else {"port"} if kind == "tcp" else {"script"} if kind == "script" else set()
    )
    doc = _fields(f"{where} ({kind})", doc, common | allowed[kind], required | {"type"})
    timeout = _number(f"{where}.timeout", doc.get("timeout", DEFAULT_TIMEOUT), 1, MAX_TIMEOUT)
    args: dict[str, Any] = {"type": kind, "timeout": float(timeout)}
    if kind == "console":
        args["expect"] = _str(f"{where}.expect", doc["expect"])
        compile_expect(args["expect"])
    if kind in ("tcp", "http"):
        default_port = 443 if doc.get("https") else 80
        args["port"] = _int(f"{where}.port", doc.get("port", default_port), 1, 65535)
    if kind == "http":
        path = _str(f"{where}.path", doc.get("path", "/"))
        if not path.startswith("/") or any(c in path for c in " \r\n"):
            raise UsageError(f"{where}.path: an absolute URL path without spaces, got {path!r}")
        args.update(path=path, status=_int(f"{where}.status", doc.get("status", 200), 100, 599))
        if doc.get("text") is not None:
            args["text"] = _str(f"{where}.text", doc["text"])
        if not isinstance(doc.get("https", False), bool):
            raise UsageError(f"{where}.https: true or false, got {doc['https']!r}")
        args["https"] = doc.get("https", False)
    if kind == "script":
        script = doc["script"]
        script = [script] if isinstance(script, str) else script
        if not isinstance(script, list) or not script or not all(isinstance(a, str) and a for a in script):
            raise UsageError(f"{where}.script: a program path or a list of arguments, got {doc['script']!r}")
        if not Path(script[0]).is_absolute():
            raise UsageError(f"{where}.script: the program by its absolute path, got {script[0]!r}")
        args["script"] = script
    return Check(**args)


def _mac(group_index: int, vm_index: int) -> str:
    return f"52:54:00:6c:{group_index:02x}:{vm_index:02x}"  # locally administered qemu range, unique in the lab


def parse_group(doc: object) -> Group:
    """A group from its document (a file's or the API's); raises UsageError naming the first bad field."""
    doc = _fields("group", doc, {"name", "network", "at", "vms", "schedule", "dns"}, {"name", "vms"})
    name = _str("group name", doc["name"], 64)
    if not NAME_RE.match(name):
        raise UsageError(f"group name: letters, digits, '.', '_' and '-', got {name!r}")
    network = check_subnet(doc.get("network", "10.0.0.0/24"))
    subnet = ipaddress.IPv4Network(network)
    hosts = list(subnet.hosts())
    at = None
    if doc.get("at") is not None:
        raw = doc["at"]
        try:
            at = raw if isinstance(raw, datetime) else datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
        except ValueError:
            raise UsageError(f"group at: an ISO 8601 time such as 2026-05-01T03:00:00Z, got {raw!r}") from None
        if at.tzinfo is None:
            raise UsageError(f"group at: a time with its zone (Z or +HH:MM), got {raw!r}")
    vms_doc = doc["vms"]
    if not isinstance(vms_doc, list) or not 1 <= len(vms_doc) <= MAX_VMS:
        raise UsageError(f"group vms: a list of 1 to {MAX_VMS} VMs, got {vms_doc!r}")
    fixed = {
        str(v.get("address")) for v in vms_doc if isinstance(v, dict) and v.get("address") is not None
    }  # addresses given, so the automatic ones go around them
    free = (str(h) for h in hosts[9:] if str(h) not in fixed)
    vms: list[GroupVM] = []
    for i, v in enumerate(vms_doc):
        where = f"vms[{i}]"
        v = _fields(where, v, {"vm", "repo", "point", "address", "memory_mib", "nic", "checks", "cache_mib"}, {"vm"})
        vm = _str(f"{where}.vm", v["vm"], 255)
        try:
            check_vm_name(vm)  # the repository's own rule: a name it could never hold is refused here, not later
        except UsageError as exc:
            raise UsageError(f"{where}.vm: {exc}") from None
        where = f"vm {vm}"
        if any(x.vm == vm for x in vms):
            raise UsageError(f"{where}: named twice in the group")
        repo = _str(f"{where}.repo", v["repo"]) if v.get("repo") is not None else None
        point = _str(f"{where}.point", v.get("point", "latest"), 100)
        if at is not None and "point" in v:
            raise UsageError(f"{where}: 'point' and the group's 'at' both choose the restore point; keep one")
        if v.get("address") is not None:
            try:
                address = ipaddress.IPv4Address(str(v["address"]))
            except ValueError:
                raise UsageError(f"{where}.address: an IPv4 address, got {v['address']!r}") from None
            if address not in subnet or address in (subnet.network_address, subnet.broadcast_address, hosts[0]):
                raise UsageError(f"{where}.address: a host of the lab's network {network} other than {hosts[0]}")
            if any(x.address == str(address) for x in vms):
                raise UsageError(f"{where}.address: {address} is another VM's")
            address = str(address)
        else:
            address = next(free, None)
            if address is None:
                raise UsageError(f"{where}: no free address left in {network}")
        memory = _int(f"{where}.memory_mib", v.get("memory_mib", 128), MIN_MEMORY, MAX_MEMORY)
        cache_mib = _int(f"{where}.cache_mib", v.get("cache_mib", DEFAULT_CACHE_MIB), 1, MAX_CACHE_MIB)
        nic = v.get("nic", "e1000")
        if nic not in NICS:
            raise UsageError(f"{where}.nic: one of {', '.join(NICS)}, got {nic!r}")
        checks_doc = v.get("checks", [])
        if not isinstance(checks_doc, list) or len(checks_doc) > MAX_CHECKS:
            raise UsageError(f"{where}.checks: a list of at most {MAX_CHECKS} checks, got {checks_doc!r}")
        checks = [parse_check(f"{where}.checks[{j}]", c) for j, c in enumerate(checks_doc)]
        vms.append(GroupVM(vm, repo, point, address, _mac(0, i), memory, nic, checks, cache_mib))
    schedule = check_schedule(doc["schedule"]) if doc.get("schedule") is not None else None
    dns = doc.get("dns", False)
    if not isinstance(dns, bool):
        raise UsageError(f"group dns: true or false, got {dns!r}")
    return Group(name, network, at, vms, schedule, dns)


def group_from_json(text: str) -> Group:
    try:
        return parse_group(json.loads(text))
    except ValueError as exc:
        raise UsageError(f"group: not JSON: {exc}") from None
