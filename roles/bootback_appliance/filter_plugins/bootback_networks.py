"""The one place where the role checks the networks allowed to reach the appliance (NFS clients, admins)."""

from __future__ import annotations

import ipaddress

from ansible.errors import AnsibleFilterError
from ansible.utils.display import Display


def bootback_networks(value: object, name: str) -> list[str]:
    """Return VALUE (the list variable NAME) as normalized CIDR networks, or fail naming the bad entry.

    An empty list is refused: "nobody" is never what an operator means, and "everybody" must be written out as
    0.0.0.0/0 (or ::/0), which is allowed but warned about."""
    if not isinstance(value, list) or not value:
        raise AnsibleFilterError(
            f"{name} must list at least one network in CIDR form such as 10.1.0.0/16, "
            f"not {value!r} (write 0.0.0.0/0 to allow every address)"
        )
    networks = []
    for item in value:
        try:
            net = ipaddress.ip_network(str(item).strip(), strict=True)
        except ValueError as exc:
            raise AnsibleFilterError(
                f'{name}: "{item}" is not an address or a CIDR network such as 10.1.0.0/16 ({exc})'
            ) from None
        if net.prefixlen == 0:
            Display().warning(
                f"{name} contains {net}: every {'IPv4' if net.version == 4 else 'IPv6'} address "
                "may reach these appliance ports"
            )
        networks.append(str(net))
    return networks


class FilterModule:
    def filters(self) -> dict:
        return {"bootback_networks": bootback_networks}
