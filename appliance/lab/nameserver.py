"""The lab's name server (a group's ``dns: true``): on the lab's own address, port 53, inside the lab's network,
it answers A queries for the names of the group's VMs (``demo-web`` and ``demo-web.lab``) and nothing else, so
guests that find their peers by name do so in the lab as in production, and no query leaves it.

Busybox's ``dnsd`` is not in Debian's busybox, and dnsmasq would be one more daemon to install and supervise for
a handful of fixed names: this is a thread of the daemon on a socket made inside the lab's namespace, with
dnspython parsing and building the messages (a query is hostile input from a guest: anything dnspython does not
parse, or that is not one plain question, is dropped unanswered).
"""

from __future__ import annotations

import logging
import re
import socket
import threading

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

log = logging.getLogger("bootback.lab")
DOMAIN = "lab"  # guests may ask for NAME or NAME.lab
TTL = 60
MAX_QUERY = 512  # bytes of a UDP query read (RFC 1035's classic limit; EDNS is not offered)
LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def dns_names(vms: dict[str, str]) -> dict[str, str]:
    """``{vm name: address}`` -> ``{dns name: address}`` for the names that are valid DNS labels (lower case);
    a VM named otherwise ("web 01", "db_1") has no name in the lab."""
    out = {}
    for vm, address in vms.items():
        label = vm.lower()
        if LABEL_RE.match(label):
            out[label] = address
            out[f"{label}.{DOMAIN}"] = address
    return out


def answer(query: bytes, names: dict[str, str]) -> bytes | None:
    """The reply to one query's wire bytes, or None to drop it (not DNS, not one question, a reply)."""
    try:
        msg = dns.message.from_wire(query)
    except (dns.exception.DNSException, ValueError):
        return None
    if msg.flags & dns.flags.QR or len(msg.question) != 1:
        return None
    question = msg.question[0]
    reply = dns.message.make_response(msg)
    reply.flags |= dns.flags.AA
    reply.flags &= ~dns.flags.RA  # nothing is recursed: the lab reaches no other server
    name = question.name.to_text(omit_final_dot=True).lower()
    address = names.get(name)
    if address is None or question.rdclass != dns.rdataclass.IN:
        reply.set_rcode(dns.rcode.NXDOMAIN)
    elif question.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
        reply.answer.append(dns.rrset.from_text(question.name, TTL, "IN", "A", address))
    # a known name's other types (AAAA, MX ...): no error, no data
    return reply.to_wire()


class LabDns:
    """Serves ``names`` on ``sock`` (a UDP socket, bound by the caller inside the lab) until ``stop()``."""

    def __init__(self, sock: socket.socket, names: dict[str, str]) -> None:
        self.sock, self.names = sock, dict(names)
        self.sock.settimeout(0.5)  # how soon stop() is noticed
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="lab-dns")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                query, peer = self.sock.recvfrom(MAX_QUERY)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                reply = answer(query, self.names)
                if reply is not None:
                    self.sock.sendto(reply, peer)
            except Exception as exc:  # noqa: BLE001 - one bad query must not end the lab's DNS
                log.warning("lab dns: query from %s dropped: %s", peer, exc)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(5)
        self.sock.close()
