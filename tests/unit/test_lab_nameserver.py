"""The lab's name server: the group's VM names (and NAME.lab) and nothing else; hostile datagrams are dropped
and the server goes on answering. Served on a real UDP socket on loopback, asked by dnspython's client."""

from __future__ import annotations

import socket

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from appliance.errors import UsageError
from appliance.lab.group import parse_group
from appliance.lab.nameserver import LabDns, dns_names


@pytest.fixture
def server():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    names = dns_names({"demo-web": "10.0.0.10", "DB01": "10.0.0.11", "web 01": "10.0.0.12", "db_1": "10.0.0.13"})
    lab = LabDns(sock, names)
    yield sock.getsockname()
    lab.stop()


def ask(addr: tuple[str, int], name: str, rdtype: str = "A") -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, rdtype), addr[0], port=addr[1], timeout=3)


def test_the_vms_names_and_nothing_else(server) -> None:
    for name, address in (("demo-web", "10.0.0.10"), ("demo-web.lab.", "10.0.0.10"), ("db01", "10.0.0.11")):
        reply = ask(server, name)
        assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AA, reply
        assert [r.address for r in reply.answer[0]] == [address]
    assert ask(server, "DEMO-WEB").answer[0][0].address == "10.0.0.10"  # names are case-insensitive
    empty = ask(server, "demo-web", "AAAA")
    assert empty.rcode() == dns.rcode.NOERROR and empty.answer == []
    for unknown in ("example.com", "web 01", "db_1", "lab", "bootback.internal"):
        reply = ask(server, unknown)
        assert reply.rcode() == dns.rcode.NXDOMAIN and reply.answer == [], unknown
        assert not reply.flags & dns.flags.RA  # nothing is looked up elsewhere


def test_hostile_datagrams_are_dropped_and_the_server_goes_on(server) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)  # a reply on loopback comes in microseconds
        reply_not_query = dns.message.make_response(dns.message.make_query("demo-web", "A")).to_wire()
        for junk in (b"", b"\x00" * 3, b"\xff" * 512, reply_not_query, b"\x12\x34" + b"\x01\x00" + b"\x00\x40" * 4):
            s.sendto(junk, server)
            with pytest.raises(TimeoutError):
                s.recvfrom(4096)
    assert ask(server, "demo-web").answer[0][0].address == "10.0.0.10"


def test_dns_in_a_group_is_true_or_false() -> None:
    group = {"name": "g", "vms": [{"vm": "db"}]}
    assert parse_group(group).dns is False and parse_group({**group, "dns": True}).dns is True
    with pytest.raises(UsageError, match="group dns: true or false, got 'yes'"):
        parse_group({**group, "dns": "yes"})
