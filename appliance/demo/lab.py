"""The demo's virtual lab: two small VMs backed up into the demo repository and the application group
``demo-lab`` kept in the demo's state, so ``bootback lab verify demo-lab`` works on a fresh machine.

``demo-web`` serves a page and answers qemu-guest-agent's ping (its "agent" check); ``demo-client`` boots
after it, fetches that page over the lab network and says so on its console, which is its check.
The guests are the lab's busybox guests (appliance.lab.guests), built like the demo disk: no loop device, mount
or root.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from appliance.demo.bootdisk import DemoBuildError, demo_vmx
from appliance.ingest.backup import backup_vm
from appliance.ingest.sources import open_source
from appliance.lab.guests import WEB_ADDRESS, WEB_NAME, WEB_PAGE, build_guest_disk
from appliance.lab.service import save_group
from appliance.repo import Repository

log = logging.getLogger("bootback.demo")
GROUP = "demo-lab"
WEB, CLIENT = WEB_NAME, "demo-client"
CLIENT_ADDRESS = "10.0.0.20"


def demo_lab_group() -> dict[str, Any]:
    return {
        "name": GROUP,
        "dns": True,  # the client finds the web VM by its name
        "vms": [
            {
                "vm": WEB,
                "address": WEB_ADDRESS,
                "memory_mib": 96,
                "cache_mib": 64,  # the busybox guests write next to nothing
                "checks": [
                    {"type": "console", "expect": "bootback-lab: web serving http", "timeout": 180},
                    {"type": "ping", "timeout": 30},
                    {"type": "http", "path": "/", "text": WEB_PAGE, "timeout": 30},
                    {"type": "agent", "timeout": 60},
                    {"type": "screenshot", "timeout": 15},
                ],
            },
            {
                "vm": CLIENT,
                "address": CLIENT_ADDRESS,
                "memory_mib": 96,
                "cache_mib": 64,  # the busybox guests write next to nothing
                "checks": [
                    {"type": "console", "expect": f"client resolved {WEB} to {WEB_ADDRESS}", "timeout": 180},
                    {"type": "console", "expect": f"client reached {WEB_ADDRESS}: {WEB_PAGE}", "timeout": 120},
                    {"type": "screenshot", "timeout": 15},
                ],
            },
        ],
    }


def prepare_demo_lab(repo: Repository, state_dir: Path, build_cache: Path) -> bool:
    """Back up the lab's VMs (once) and define ``demo-lab`` when no group of that name is kept (an operator's
    change stays). False, with a warning, where the guests cannot be built (no cpio or kernel)."""
    try:
        for vm, role in ((WEB, "web"), (CLIENT, "client")):
            if not repo.restore_points(vm):
                _backup(repo, vm, build_guest_disk(build_cache, role).path)
    except (DemoBuildError, OSError) as exc:
        log.warning("demo: no lab group %s (%s)", GROUP, exc)
        return False
    groups = Path(state_dir) / "lab-groups"
    if not (groups / f"{GROUP}.json").exists():
        save_group(groups, demo_lab_group())
    return True


def _backup(repo: Repository, vm: str, disk: Path) -> None:
    source = open_source(disk, name=f"{vm}.img")  # the cached disk, read in place under the VM's disk name
    try:
        backup_vm(repo, vm, [source], demo_vmx(vm, f"{vm}.img"), {"bootable": True, "demo": True, "lab": GROUP})
    finally:
        source.close()
