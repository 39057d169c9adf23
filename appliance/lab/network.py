"""The lab's isolated network: a network namespace of the lab's own holding one Linux bridge, the guests' tap
devices on it, a DHCP server (busybox udhcpd) handing each guest its address, and the lab's own address on the
bridge from which the checks probe the guests.

Why this reaches nothing else: the namespace has no interface but its loopback, the bridge and the taps, no
route out and forwarding off; the host's loopback and the appliance's addresses live in the host's namespace,
which no link joins. qemu itself stays in the host's namespace (it reads the guest's disks from the appliance
over NFS there): the tap device is created inside the lab's namespace by a thread that entered it, and qemu gets
its file descriptor (``-netdev tap,fd=N``), so only the guest's NIC is in the lab.

Needs CAP_NET_ADMIN (root): ``ip netns``, bridges and taps are privileged.
"""

from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import logging
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from appliance.errors import BootbackError, UsageError
from appliance.lab.nameserver import DOMAIN, LabDns

log = logging.getLogger("bootback.lab")
PREFIX = "bootback-lab-"  # every namespace a lab creates is named so (stale ones are removed at start)
BRIDGE = "labbr0"
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
T = TypeVar("T")


class LabNetworkError(BootbackError):
    """The lab's network or a guest could not be set up."""


def _ip(*args: str, timeout: float = 20) -> str:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise LabNetworkError(f"ip {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def namespaces() -> list[str]:
    """The lab namespaces that exist now (``ip netns list``)."""
    try:
        out = _ip("netns", "list")
    except (LabNetworkError, FileNotFoundError):
        return []
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def run_in(namespace: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a new thread that entered ``namespace`` first: sockets it opens live there. setns()
    moves only the calling thread, and this thread ends with the call, so no other thread changes namespace."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {namespace}: {os.strerror(err)}")
            finally:
                os.close(fd)
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            out["error"] = exc

    t = threading.Thread(target=target, name=f"in-{namespace}", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


class LabNetwork:
    """One lab's segment: ``create()``, ``tap()`` per guest, ``exec()`` for probes, ``destroy()``."""

    def __init__(self, lab_id: str, subnet: str, workdir: Path) -> None:
        self.name = f"{PREFIX}{lab_id}"
        self.subnet = ipaddress.ip_network(subnet)
        self.gateway = str(next(self.subnet.hosts()))  # the lab's own address (checks come from it)
        self.workdir = Path(workdir)
        self._taps = 0
        self._dhcpd: subprocess.Popen | None = None
        self._dns: LabDns | None = None

    def create(self, leases: dict[str, str], names: dict[str, str] | None = None) -> None:
        """The namespace, its bridge and a DHCP server giving each MAC in ``leases`` its address; with ``names``
        (DNS name -> address), a name server on the lab's address that the DHCP server tells guests of."""
        _ip("netns", "add", self.name)
        try:
            ns = ("-n", self.name)
            _ip(*ns, "link", "set", "lo", "up")
            _ip(*ns, "link", "add", BRIDGE, "type", "bridge", "stp_state", "0", "forward_delay", "0")
            _ip(*ns, "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", BRIDGE)
            _ip(*ns, "link", "set", BRIDGE, "up")
            if names is not None:
                self._dns = LabDns(run_in(self.name, self._dns_socket), names)
            self._start_dhcp(leases)
        except BaseException:
            self.destroy()
            raise

    def _dns_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # made here, it lives in the lab's namespace
        try:
            sock.bind((self.gateway, 53))
        except OSError:
            sock.close()
            raise
        return sock

    def _start_dhcp(self, leases: dict[str, str]) -> None:
        hosts = list(self.subnet.hosts())
        pool = hosts[len(hosts) // 2 :]  # guests without a fixed address get one from the upper half
        conf = self.workdir / "udhcpd.conf"
        lines = [
            f"interface {BRIDGE}",
            f"start {pool[0]}",
            f"end {pool[-1]}",
            f"lease_file {self.workdir / 'udhcpd.leases'}",
            f"pidfile {self.workdir / 'udhcpd.pid'}",
            f"opt subnet {self.subnet.netmask}",
            "opt lease 86400",
            *(f"static_lease {mac} {address}" for mac, address in leases.items()),
            *([f"opt dns {self.gateway}", f"opt domain {DOMAIN}"] if self._dns else []),
        ]  # no router: the guests learn of no way out (the name server is the lab's own, answering its names)
        conf.write_text("\n".join(lines) + "\n")
        (self.workdir / "udhcpd.leases").touch()
        self._dhcpd = subprocess.Popen(
            ["ip", "netns", "exec", self.name, "busybox", "udhcpd", "-f", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "udhcpd.log", "wb"),  # noqa: SIM115 - the child keeps it
        )

    def tap(self) -> int:
        """A new tap device on the bridge, created inside the namespace; returns its file descriptor (inheritable,
        for qemu's ``-netdev tap,fd=N``; the caller closes it once qemu has it)."""
        name = f"labtap{self._taps}"
        self._taps += 1

        def open_tap() -> int:
            fd = os.open("/dev/net/tun", os.O_RDWR)
            try:
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
            except OSError:
                os.close(fd)
                raise
            return fd

        fd = run_in(self.name, open_tap)
        os.set_inheritable(fd, True)
        _ip("-n", self.name, "link", "set", name, "master", BRIDGE, "up")
        return fd

    def exec(self, argv: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a program inside the lab's network (a probe, a user's check script)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            capture_output=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )

    def destroy(self) -> None:
        if self._dns is not None:
            self._dns.stop()
            self._dns = None
        if self._dhcpd is not None and self._dhcpd.poll() is None:
            self._dhcpd.kill()
            self._dhcpd.wait()
        try:
            _ip("netns", "del", self.name)
        except LabNetworkError as exc:
            if self.name in namespaces():
                log.warning("lab network %s not removed: %s", self.name, exc)


def check_subnet(text: object) -> str:
    """A lab network: an IPv4 network of /16 to /29 written as such (``10.0.0.0/24``)."""
    try:
        net = ipaddress.IPv4Network(str(text))
    except ValueError as exc:
        raise UsageError(f"network: an IPv4 network such as 10.0.0.0/24, got {text!r} ({exc})") from None
    if not 16 <= net.prefixlen <= 29:
        raise UsageError(f"network: a prefix between /16 and /29, got {text!r}")
    return str(net)
