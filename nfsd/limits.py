"""What a client can make the NFS daemon hold, and how much of it (STYLE.md rule 14).

One frozen dataclass with safe defaults, so every server (``python -m nfsd``, ``bootback serve``) gets them
without configuration; ``python -m nfsd --help`` lists them as options. What they bound:

* Bytes per TCP connection: ``connection_bytes`` of requests (unparsed input and the records of calls in
  progress; one socket read of up to 256 KiB may go over) and ``connection_bytes`` of replies (reserved by a
  READ/READDIR before the backend reads, produced, or written but not yet read by the client). A connection
  over either bound, or with ``max_in_flight`` calls running, is not read and its buffered records are not
  started until it drains. Defaults: about 16.5 MiB per connection.
* Bytes of all connections together: ``total_bytes``. When reached, READ/READDIR replies wait for room and
  connections holding over ``FLOOR_BYTES`` are not read, while connections that keep up still get small calls
  (NULL, GETATTR: ESXi's heartbeat) answered. Worst case ``total_bytes`` + about 0.6 MiB per open connection.
* Connections: to the NFS port only from addresses some export allows, at most ``max_connections``
  in all (lowered at start to the descriptor limit less those open less ``fd_reserve``, which stay free for
  the control socket, the repository and the web app) and ``max_connections_per_client`` per address; others
  are accepted and closed at once. A connection with nothing received or drained for ``idle_timeout`` seconds
  is closed (ESXi sends a heartbeat every few seconds; a client that stops reading its replies is no longer
  read, so it goes idle too). With the defaults one address holds at most 16 x 16.5 MiB (264 MiB), about half
  of ``total_bytes``: starving other clients' READs takes several allowed addresses.
* UDP: at most ``udp_max_data`` bytes of file data or directory entries per reply (FSINFO over UDP advertises
  it), a reply over ``udp_max_reply`` bytes is replaced by SYSTEM_ERR, and at most ``udp_max_in_flight``
  calls run at once (further datagrams are dropped): a small request never buys a large reply.
* Logging: a line a client can cause per request is written at most ``log_burst`` times per ``log_interval``
  seconds per message; the next one written says how many were left out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields, replace

FLOOR_BYTES = 64 * 1024  # under total_bytes pressure, a connection holding less than this is still read


@dataclass(frozen=True)
class Limits:
    max_connections: int = 512
    max_connections_per_client: int = 16
    idle_timeout: float = 300.0
    connection_bytes: int = 8 << 20
    total_bytes: int = 512 << 20
    max_in_flight: int = 64  # calls in progress per connection
    fd_reserve: int = 64
    udp_max_data: int = 1024
    udp_max_reply: int = 2048
    udp_max_in_flight: int = 128
    log_burst: int = 5
    log_interval: float = 60.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"limit {f.name} must be a positive number, got {value!r}")
        if self.connection_bytes < 2 << 20:
            raise ValueError(
                f"connection_bytes {self.connection_bytes} is less than 2 MiB (a 1 MiB record or READ "
                "and a socket read must fit)"
            )
        if self.total_bytes < self.connection_bytes:
            raise ValueError(f"total_bytes {self.total_bytes} is less than connection_bytes {self.connection_bytes}")
        if self.max_connections_per_client > self.max_connections:
            raise ValueError(
                f"max_connections_per_client {self.max_connections_per_client} exceeds "
                f"max_connections {self.max_connections}"
            )
        if self.udp_max_reply < self.udp_max_data + 512:
            raise ValueError(f"udp_max_reply {self.udp_max_reply} leaves no room for udp_max_data + headers")


DEFAULT = Limits()


def parse_limits(pairs: Iterable[str], base: Limits = DEFAULT) -> Limits:
    """``base`` with ``name=value`` settings applied (``bootback serve --nfs-limit``); ValueError names a bad one."""
    kinds = {f.name: type(f.default) for f in fields(Limits)}
    changes: dict[str, int | float] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in kinds:
            raise ValueError(f"NFS limit {pair!r}: expected NAME=VALUE with NAME one of {', '.join(kinds)}")
        try:
            changes[name] = kinds[name](value.strip())
        except ValueError:
            raise ValueError(f"NFS limit {name}: {value.strip()!r} is not a {kinds[name].__name__}") from None
    return replace(base, **changes)
