"""A small network of our own for firewall tests: a bridge with an address on this host and two network
namespaces behind it, one in the network a test allows and one outside it, so the same port can be tried
from an allowed and from a refused source address. Only addresses we create (198.18.0.0/15, the range set
aside for network testing), and everything is removed afterwards."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.daemon_process import ROOT

PROBE = ROOT / "roles" / "bootback_appliance" / "molecule" / "default" / "probe.py"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@dataclass(frozen=True)
class Lab:
    host: str  # this host's address on the lab bridge: what the namespaces connect to
    allowed_net: str  # the allowed namespace's own /28 (the refused one sits outside it)
    allowed_ns: str
    refused_ns: str
    refused_addr: str  # the refused namespace's address (a test may allow it alone, for another port)

    def probe(self, ns: str, kind: str, port: int) -> str:
        """ "open", "refused" or "timeout" for a KIND ("tcp" or "rpc-udp") probe of PORT from namespace NS."""
        p = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, str(PROBE), kind, self.host, str(port)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return p.stdout.strip()

    def env(self) -> dict[str, str]:
        return {
            "BOOTBACK_LAB_HOST": self.host,
            "BOOTBACK_LAB_ALLOWED_NET": self.allowed_net,
            "BOOTBACK_LAB_ALLOWED_NS": self.allowed_ns,
            "BOOTBACK_LAB_REFUSED_NS": self.refused_ns,
            "BOOTBACK_LAB_PYTHON": sys.executable,
            "BOOTBACK_LAB_PROBE": str(PROBE),
        }


@contextmanager
def firewall_lab() -> Iterator[Lab]:
    tag = os.urandom(3).hex()
    subnet = ipaddress.ip_network(f"198.18.{int(tag[:2], 16)}.0/24")
    hosts = list(subnet.hosts())
    bridge, names = f"bbfw{tag}", {"ok": f"bbfw-{tag}-ok", "no": f"bbfw-{tag}-no"}
    addresses = {"ok": hosts[1], "no": hosts[99]}  # .2 inside 198.18.N.0/28, .100 outside it
    created: list[tuple[str, ...]] = []
    try:
        ip("link", "add", bridge, "type", "bridge")
        created.append(("link", "del", bridge))
        ip("addr", "add", f"{hosts[0]}/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        for key, ns in names.items():
            ip("netns", "add", ns)
            created.append(("netns", "del", ns))
            outside, inside = f"bbfw{tag}{key}", f"bbfw{tag}{key}i"
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            created.append(("link", "del", outside))
            ip("link", "set", inside, "netns", ns)
            ip("link", "set", outside, "master", bridge, "up")
            ip("-n", ns, "addr", "add", f"{addresses[key]}/24", "dev", inside)
            ip("-n", ns, "link", "set", inside, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield Lab(str(hosts[0]), f"{subnet.network_address}/28", names["ok"], names["no"], str(addresses["no"]))
    finally:
        for args in reversed(created):
            subprocess.run(["ip", *args], capture_output=True, timeout=20)


def nft_table(name: str) -> str:
    """The running table (empty when it does not exist)."""
    p = subprocess.run(["nft", "list", "table", "inet", name], capture_output=True, text=True, timeout=20)
    return p.stdout if p.returncode == 0 else ""


def delete_nft_table(name: str, file: Path | None = None) -> None:
    subprocess.run(["nft", "delete", "table", "inet", name], capture_output=True, timeout=20)
    if file is not None:
        file.unlink(missing_ok=True)
