"""Run one application group in a lab: its network, then each VM in boot order (a sandbox session, a guest on
the lab's bridge, its checks), the next VM only once the one before passed; a report per VM and per check.

The lab's pieces are released by ``close()`` whatever happened (guests killed, sandboxes stopped and thrown away,
the network namespace removed); a verification closes at once, a sandbox lab when it is stopped or expires.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.errors import RestorePointNotFoundError
from appliance.lab.checks import Probe, run_check
from appliance.lab.group import Group, GroupVM
from appliance.lab.machine import Machine
from appliance.lab.nameserver import dns_names
from appliance.lab.network import LabNetwork

log = logging.getLogger("bootback.lab")

# (vm=, point=, mode=, repo=) -> the published sessions' documents (the daemon's op_publish)
Publish = Callable[..., list[dict]]
# (id=) -> anything (the daemon's op_stop)
Stop = Callable[..., object]
# (repo=, vm=) -> the VM's points, oldest first (the daemon's op_points)
Points = Callable[..., list[dict]]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def point_at(points: list[dict], vm: str, at: datetime) -> str:
    """The id of ``vm``'s newest readable point taken at or before ``at`` (the group is consistent in time)."""
    chosen = None
    for p in points:
        if p.get("damaged") or p.get("vm") != vm:
            continue
        if datetime.fromisoformat(p["time"]) <= at:
            chosen = p["id"]
    if chosen is None:
        raise RestorePointNotFoundError(f"VM {vm!r} has no restore point at or before {at.isoformat()}")
    return chosen


class LabRun:
    def __init__(
        self,
        lab_id: str,
        group: Group,
        workdir: Path,
        publish: Publish,
        stop: Stop,
        points: Points,
        on_progress: Callable[[dict[str, Any]], None] = lambda report: None,
        nfs_host: str | None = None,
    ) -> None:
        """``nfs_host``: where qemu mounts the sandboxes from (appliance.verification.local_nfs_host; default:
        the published nfs:// URL's host)."""
        self.id, self.group, self.workdir = lab_id, group, Path(workdir)
        self._publish, self._stop, self._points = publish, stop, points
        self._progress = on_progress
        self.nfs_host = nfs_host
        self.cancelled = threading.Event()
        self.network = LabNetwork(lab_id, group.network, self.workdir)
        self.machines: list[Machine] = []
        self.sessions: list[str] = []
        self._lock = threading.Lock()
        self.report: dict[str, Any] = {
            "group": group.name,
            "lab": lab_id,
            "network": group.network,
            "lab_address": self.network.gateway,
            "namespace": self.network.name,
            "ok": None,
            "seconds": None,
            "vms": [
                {"vm": v.vm, "address": v.address, "mac": v.mac, "state": "waiting", "point": None, "checks": []}
                for v in group.vms
            ],
            "failed": [],
        }

    def run(self) -> dict[str, Any]:
        """Boot and check the group in order; the guests stay up (``close()`` ends them)."""
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        names = dns_names({v.vm: v.address for v in self.group.vms}) if self.group.dns else None
        self.network.create({v.mac: v.address for v in self.group.vms}, names)
        blocked: str | None = None
        for vm, doc in zip(self.group.vms, self.report["vms"], strict=True):
            if self.cancelled.is_set():
                blocked = blocked or "the lab was stopped"
            if blocked:
                doc.update(state="skipped", detail=blocked)
                continue
            self._vm(vm, doc)
            if doc["state"] != "passed":
                blocked = f"{vm.vm} did not pass"
            self._progress(self.report)
        self.report["failed"] = [
            f"{d['vm']}: {c['line']}" for d in self.report["vms"] for c in d["checks"] if not c["ok"]
        ] + [f"{d['vm']}: {d['detail']}" for d in self.report["vms"] if d["state"] == "error"]
        self.report["ok"] = all(d["state"] == "passed" for d in self.report["vms"])
        self.report["seconds"] = round(time.monotonic() - started, 1)
        return self.report

    def _vm(self, vm: GroupVM, doc: dict[str, Any]) -> None:
        doc.update(state="booting", started=_now())
        self._progress(self.report)
        try:
            point = vm.point
            if self.group.at is not None:
                point = point_at(self._points(repo=vm.repo, vm=vm.vm), vm.vm, self.group.at)
            (session,) = self._publish(vm=f"{vm.vm}@{point}", mode="sandbox", repo=vm.repo)
            with self._lock:
                self.sessions.append(session["id"])
            doc.update(point=session["point"], session=session["id"])
            base = f"nfs://{self.nfs_host}{session['path']}" if self.nfs_host else session["nfs_url"]
            drives = [f"{base}/{d['extent']}" for d in session["disks"]]
            machine = Machine(vm.vm, self.workdir, drives, self.network.tap(), vm.mac, vm.memory_mib, vm.nic)
            with self._lock:
                self.machines.append(machine)
            machine.start()
            doc["pid"] = machine.proc.pid if machine.proc else None
        except Exception as exc:  # noqa: BLE001 - this VM's error, reported on it; the lab goes on to close
            doc.update(state="error", detail=str(exc))
            log.warning("lab %s: %s could not start: %s", self.id, vm.vm, exc)
            return
        doc["console_log"] = str(machine.console_log)
        probe = Probe(machine, vm.address, self.network, self.workdir, self.cancelled)
        for check in vm.checks:
            result = run_check(probe, check)
            if result.ok and "boot_seconds" not in doc:  # the first sign of life a check saw
                doc["boot_seconds"] = round(time.monotonic() - machine.started, 1)
            doc["checks"].append(result.as_json())
            if result.screenshot:
                doc["screenshot"] = result.screenshot
            self._progress(self.report)
            if not result.ok:
                break  # the next checks would only fail for the same reason
        if "screenshot" not in doc and machine.running():
            try:
                doc["screenshot"] = str(machine.screendump(self.workdir / f"{vm.vm}.png"))
            except Exception as exc:  # noqa: BLE001 - a missing screenshot does not change the verdict
                doc["screenshot_error"] = str(exc)
        doc.update(state="passed" if all(c["ok"] for c in doc["checks"]) else "failed", finished=_now())
        log.info("lab %s: %s %s", self.id, vm.vm, doc["state"])

    def close(self) -> None:
        """Kill the guests, stop their sandboxes, remove the network. Safe to call twice and from any thread."""
        self.cancelled.set()
        with self._lock:
            machines, self.machines = self.machines, []
            sessions, self.sessions = self.sessions, []
        for machine in machines:
            machine.stop()
        for sid in sessions:
            try:
                self._stop(id=sid)
            except Exception as exc:  # noqa: BLE001 - the others are still stopped
                log.warning("lab %s: sandbox %s not stopped: %s", self.id, sid, exc)
        self.network.destroy()
