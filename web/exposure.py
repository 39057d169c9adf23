"""Whether the NFS export is open to every address, from the daemon's status, for the page's banner and the API.

The daemon reports ``nfs_open_to_everyone`` (bool) and ``nfs_clients`` (the configured networks); older daemons
only ``allowed_networks``. A network of prefix length 0 (0.0.0.0/0, ::/0) is everyone. Anything else missing or
unreadable is *unknown* (None): no banner is better than a wrong one either way."""

from __future__ import annotations

import ipaddress
from typing import Any

WARNING = (
    "NFS is open to every address ({networks}): anyone who can reach this appliance can mount the "
    "datastore and read or change published VMs. Restrict it with --clients / BOOTBACK_CLIENTS."
)


def nfs_open_to_everyone(status: dict[str, Any]) -> bool | None:
    flag = status.get("nfs_open_to_everyone")
    if isinstance(flag, bool):
        return flag
    networks = status.get("nfs_clients", status.get("allowed_networks"))
    if not isinstance(networks, list):
        return None
    try:
        return any(ipaddress.ip_network(str(n), strict=False).prefixlen == 0 for n in networks)
    except ValueError:
        return None


def nfs_warning(status: dict[str, Any]) -> str | None:
    """The warning to show when NFS is open to everyone, else None."""
    if nfs_open_to_everyone(status) is not True:
        return None
    networks = status.get("nfs_clients", status.get("allowed_networks"))
    shown = ", ".join(map(str, networks)) if isinstance(networks, list) and networks else "any address"
    return WARNING.format(networks=shown)
