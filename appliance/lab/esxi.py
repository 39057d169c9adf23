"""A lab on an ESXi host (Veeam's way), through pyVmomi: the group's VMs, published by the appliance as sandboxes
on its NFS export (which the host mounts as a datastore), are registered on the host in an isolated port group,
powered on in boot order, each waited for until VMware Tools' heartbeat is green, then powered off and
unregistered, and the port group and its switch removed, whatever happened.

The isolated network is a standard vSwitch created for the lab with no uplinks (its spec has no bridge), so its
port group reaches nothing outside the host's lab; every network card of a registered VM is moved onto it before
the VM powers on, and a VM one of whose cards is still elsewhere is not powered on. The qemu path
(appliance/lab/runner.py) is the one that runs real guests and checks here; this one is tested against
govmomi's vSphere simulator for its API calls and their order (tests/integration/test_lab_esxi.py).

Entry points: ``EsxiLab(si, ...).run(vms)`` for VMs already on a datastore, ``verify_group_on_esxi`` for a
group the appliance publishes (what ``bootback lab verify GROUP --esxi SERVER`` runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from appliance.errors import UsageError

log = logging.getLogger("bootback.lab.esxi")
DEFAULT_TIMEOUT = 600.0  # seconds a VM may take until its tools' heartbeat is green
POLL = 0.5
PORTS = 64  # ports on the lab's switch: a group has at most 16 VMs (appliance.lab.group.MAX_VMS)


class EsxiLabError(UsageError):
    """The host refused a step of the lab (a vSphere fault), or a VM's network could not be isolated."""


@dataclass(frozen=True)
class EsxiTarget:
    server: str  # the ESXi host (or a vCenter managing it)
    user: str
    password: str
    port: int = 443
    host: str | None = None  # the ESXi host's name in the inventory; None: the only one there is
    datastore: str = "bootback"  # the NFS datastore on the host that mounts the appliance's export
    cafile: str | None = None  # the server's certificate (or its CA); None: the system's trust store
    insecure: bool = False  # no certificate check (a lab host with a self-signed certificate)


@dataclass(frozen=True)
class EsxiVM:
    name: str  # the group's VM name
    vmx: str  # its .vmx as a datastore path: "[datastore] folder/name.vmx"
    timeout: float = DEFAULT_TIMEOUT


def connect(target: EsxiTarget) -> Any:
    """A logged-in pyVmomi ServiceInstance."""
    from pyVim.connect import SmartConnect

    ctx = ssl.create_default_context(cafile=target.cafile)
    if target.insecure:
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        return SmartConnect(host=target.server, port=target.port, user=target.user, pwd=target.password, sslContext=ctx)
    except Exception as exc:  # noqa: BLE001 - pyVmomi raises faults, socket and ssl errors alike
        raise EsxiLabError(
            f"esxi {target.server}:{target.port}: cannot log in as {target.user}: {_fault(exc)}"
        ) from None


def _fault(exc: BaseException) -> str:
    msg = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {msg}" if type(exc).__name__ not in msg else msg


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def wait_task(task: Any, what: str, timeout: float = 300.0) -> Any:
    """The task's result; its fault as an EsxiLabError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        state = task.info.state
        if state == "success":
            return task.info.result
        if state == "error":
            raise EsxiLabError(f"{what}: {_fault(task.info.error)}")
        if time.monotonic() > deadline:
            raise EsxiLabError(f"{what}: the host's task did not finish in {timeout:g} s")
        time.sleep(0.1)


def isolate_nics(vm: Any, network: Any) -> int:
    """Move every network card of ``vm`` onto ``network`` (the lab's port group); returns how many there were.
    Raises when a card is still on another network afterwards: such a VM must not power on."""
    from pyVmomi import vim

    cards = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    if cards:
        changes = []
        for card in cards:
            card.backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
                deviceName=network.name, network=network
            )
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="edit", device=card))
        wait_task(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=changes)), f"{vm.name}: isolating its NICs")
    for card in (d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)):
        backing = card.backing
        if getattr(backing, "deviceName", None) != network.name:
            raise EsxiLabError(
                f"{vm.name}: network card {card.deviceInfo.label if card.deviceInfo else card.key} is still on "
                f"{getattr(backing, 'deviceName', type(backing).__name__)!r}, not the lab's {network.name!r}"
            )
    return len(cards)


def wait_heartbeat(vm: Any, timeout: float) -> float:
    """Seconds until VMware Tools' heartbeat of ``vm`` is green; EsxiLabError at ``timeout``."""
    started = time.monotonic()
    status = None
    while time.monotonic() - started < timeout:
        # the same status as VirtualMachine.guestHeartbeatStatus, read through the summary that every
        # vSphere server (and the simulator) fills in
        status = vm.summary.quickStats.guestHeartbeatStatus
        if status == "green":
            return round(time.monotonic() - started, 1)
        time.sleep(POLL)
    raise EsxiLabError(f"{vm.name}: no green VMware Tools heartbeat in {timeout:g} s (last: {status})")


class EsxiLab:
    """One lab on one ESXi host. ``run`` does every step and undoes them all before it returns or raises."""

    def __init__(self, si: Any, host: str | None = None, lab_id: str | None = None) -> None:
        self.si = si
        self.host_name = host
        self.id = lab_id or uuid.uuid4().hex[:8]
        # ESXi limits switch and port group names to 31 characters
        self.vswitch = f"bootback-lab-{self.id}"[:31]
        self.port_group = f"bootback-lab-{self.id}-pg"[:31]

    def _host(self) -> tuple[Any, Any]:
        """(host, datacenter) by name, or the only host."""
        from pyVmomi import vim

        content = self.si.RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.HostSystem], True)
        try:
            hosts = list(view.view)
        finally:
            view.Destroy()
        names = [h.name for h in hosts]
        if self.host_name is None:
            if len(hosts) != 1:
                raise EsxiLabError(f"esxi: name the host, there are {len(hosts)}: {', '.join(names) or 'none'}")
            host = hosts[0]
        else:
            host = next((h for h in hosts if h.name == self.host_name), None)
            if host is None:
                raise EsxiLabError(f"esxi: no host {self.host_name!r} (hosts: {', '.join(names) or 'none'})")
        parent = host.parent
        while parent is not None and not isinstance(parent, vim.Datacenter):
            parent = parent.parent
        if parent is None:
            raise EsxiLabError(f"esxi: host {host.name} is in no datacenter")
        return host, parent

    def run(self, vms: list[EsxiVM]) -> dict[str, Any]:
        from pyVmomi import vim

        started = time.monotonic()
        report: dict[str, Any] = {
            "lab": self.id,
            "hypervisor": "esxi",
            "vswitch": self.vswitch,
            "port_group": self.port_group,
            "ok": None,
            "vms": [{"vm": v.name, "vmx": v.vmx, "state": "waiting", "checks": []} for v in vms],
            "failed": [],
            "cleanup_errors": [],
        }
        host, datacenter = self._host()
        report["host"] = host.name
        net = host.configManager.networkSystem
        registered: list[Any] = []
        have_switch = have_group = False
        try:
            # No bridge in the spec: the switch has no uplinks, so its port group reaches nothing off the host.
            net.AddVirtualSwitch(vswitchName=self.vswitch, spec=vim.host.VirtualSwitch.Specification(numPorts=PORTS))
            have_switch = True
            closed = vim.host.NetworkPolicy.SecurityPolicy(
                allowPromiscuous=False, macChanges=False, forgedTransmits=False
            )
            spec = vim.host.PortGroup.Specification(
                name=self.port_group, vlanId=0, vswitchName=self.vswitch, policy=vim.host.NetworkPolicy(security=closed)
            )
            net.AddPortGroup(portgrp=spec)
            have_group = True
            # the host's networks on ESXi; the datacenter's on vCenter (and in the simulator)
            network = next((n for n in [*host.network, *datacenter.network] if n.name == self.port_group), None)
            if network is None:
                raise EsxiLabError(f"esxi: the port group {self.port_group} is not among host {host.name}'s networks")
            pool = host.parent.resourcePool
            blocked: str | None = None
            for vm, doc in zip(vms, report["vms"], strict=True):
                if blocked:
                    doc.update(state="skipped", detail=blocked)
                    continue
                self._boot(vm, doc, datacenter.vmFolder, pool, host, network, registered)
                if doc["state"] != "passed":
                    blocked = f"{vm.name} did not pass"
        except Exception as exc:  # noqa: BLE001 - a vSphere fault or a lost connection: reported, cleaned up
            report["error"] = _fault(exc)
        finally:
            report["cleanup_errors"] = self._cleanup(net, registered, have_group, have_switch)
        report["failed"] = [f"{d['vm']}: {d['detail']}" for d in report["vms"] if d["state"] in ("failed", "error")]
        if report.get("error"):
            report["failed"].append(report["error"])
        report["failed"] += report["cleanup_errors"]
        report["ok"] = not report["failed"] and all(d["state"] == "passed" for d in report["vms"])
        report["seconds"] = round(time.monotonic() - started, 1)
        return report

    def _boot(self, vm: EsxiVM, doc: dict, folder: Any, pool: Any, host: Any, network: Any, registered: list) -> None:
        doc.update(state="registering", started=_now())
        name = f"{self.vswitch}-{vm.name}"
        try:
            ref = wait_task(
                folder.RegisterVM_Task(path=vm.vmx, name=name, asTemplate=False, pool=pool, host=host),
                f"{vm.name}: registering {vm.vmx}",
            )
            registered.append(ref)
            doc["registered_as"] = name
            doc["nics"] = isolate_nics(ref, network)
            doc["state"] = "booting"
            wait_task(ref.PowerOnVM_Task(), f"{vm.name}: power on")
            doc["boot_seconds"] = wait_heartbeat(ref, vm.timeout)
            line = f"heartbeat: passed after {doc['boot_seconds']} s: VMware Tools heartbeat green"
            doc["checks"].append({"type": "heartbeat", "ok": True, "line": line})
            doc.update(state="passed", finished=_now())
        except EsxiLabError as exc:
            doc["checks"].append({"type": "heartbeat", "ok": False, "line": f"heartbeat: FAILED: {exc}"})
            doc.update(state="failed", detail=str(exc), finished=_now())
        except Exception as exc:  # noqa: BLE001 - a fault on this VM: reported on it, the lab still cleans up
            doc.update(state="error", detail=f"{vm.name}: {_fault(exc)}", finished=_now())
        log.info("esxi lab %s: %s %s", self.id, vm.name, doc["state"])

    def _cleanup(self, net: Any, registered: list, have_group: bool, have_switch: bool) -> list[str]:
        """Power off and unregister every VM this lab registered (last first), then remove its port group and
        switch; each step is tried even when one before failed, and each failure is reported."""
        errors: list[str] = []
        for vm in reversed(registered):
            name = "?"
            try:
                name = vm.name
                if vm.runtime.powerState != "poweredOff":
                    wait_task(vm.PowerOffVM_Task(), f"{name}: power off")
                vm.UnregisterVM()
            except Exception as exc:  # noqa: BLE001 - the others are still cleaned up
                errors.append(f"cleanup {name}: {_fault(exc)}")
        if have_group:
            try:
                net.RemovePortGroup(pgName=self.port_group)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"cleanup port group {self.port_group}: {_fault(exc)}")
        if have_switch:
            try:
                net.RemoveVirtualSwitch(vswitchName=self.vswitch)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"cleanup vSwitch {self.vswitch}: {_fault(exc)}")
        for e in errors:
            log.error("esxi lab %s: %s", self.id, e)
        return errors


# --- a group the appliance publishes --------------------------------------------------------------------
Call = Callable[..., Any]  # a control-socket call: (op, **params) -> result


def datastore_vmx(session: dict[str, Any], export: str, datastore: str) -> str:
    """The datastore path of a published session's .vmx, as a host that mounts ``export`` as ``datastore`` sees it."""
    vmx = [f for f in session.get("files", []) if f.endswith(".vmx")]
    if len(vmx) != 1:
        raise EsxiLabError(f"session {session.get('id')}: expected one .vmx among its files, got {vmx}")
    folder = session["path"]
    prefix = export.rstrip("/") + "/"
    if not folder.startswith(prefix):
        raise EsxiLabError(f"session {session.get('id')}: folder {folder} is not under the export {export}")
    return f"[{datastore}] {folder[len(prefix) :]}/{vmx[0]}"


def verify_group_on_esxi(
    call: Call, group: Any, target: EsxiTarget, timeout: float = DEFAULT_TIMEOUT, lab_id: str | None = None
) -> dict[str, Any]:
    """Publish each of ``group``'s VMs as a sandbox, run the lab on ``target``, stop the sandboxes (always)."""
    from appliance.lab.runner import point_at

    export = call("status")["export"]
    sessions: list[str] = []
    vms: list[EsxiVM] = []
    try:
        for vm in group.vms:
            point = vm.point
            if group.at is not None:
                point = point_at(call("points", repo=vm.repo, vm=vm.vm), vm.vm, group.at)
            (session,) = call("publish", vm=f"{vm.vm}@{point}", mode="sandbox", repo=vm.repo)
            sessions.append(session["id"])
            vms.append(EsxiVM(vm.vm, datastore_vmx(session, export, target.datastore), timeout))
        si = connect(target)
        try:
            report = EsxiLab(si, target.host, lab_id).run(vms)
        finally:
            from pyVim.connect import Disconnect

            Disconnect(si)
    finally:
        for sid in sessions:
            try:
                call("stop", id=sid)
            except Exception as exc:  # noqa: BLE001 - the other sandboxes are still stopped
                log.warning("esxi lab: sandbox %s not stopped: %s", sid, exc)
    report["group"] = group.name
    report["sessions"] = sessions
    return report


# --- `bootback lab verify GROUP --esxi SERVER` -------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ESXi lab (instead of the appliance's own qemu lab)")
    g.add_argument("--esxi", metavar="SERVER", help="run the lab on this ESXi host (or vCenter) through its API")
    g.add_argument("--esxi-user", default="root")
    g.add_argument("--esxi-password-file", help="a file holding the password (else $BOOTBACK_ESXI_PASSWORD)")
    g.add_argument("--esxi-port", type=int, default=443)
    g.add_argument("--esxi-host", help="the host's name in the inventory (default: the only one)")
    g.add_argument("--esxi-datastore", default="bootback", help="the datastore mounting the appliance's export")
    g.add_argument("--esxi-ca", help="the server's certificate or CA (PEM)")
    g.add_argument("--esxi-insecure", action="store_true", help="do not check the server's certificate")
    g.add_argument("--esxi-timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per VM for its heartbeat")


def target_from_args(args: argparse.Namespace) -> EsxiTarget:
    if args.esxi_password_file:
        try:
            with open(args.esxi_password_file) as f:
                password = f.read(4096).rstrip("\n")
        except OSError as exc:
            raise UsageError(f"--esxi-password-file {args.esxi_password_file}: {exc.strerror}") from None
    else:
        password = os.environ.get("BOOTBACK_ESXI_PASSWORD", "")
    if not password:
        raise UsageError("--esxi: give the password with --esxi-password-file or $BOOTBACK_ESXI_PASSWORD")
    if not 0 < args.esxi_port < 65536:
        raise UsageError(f"--esxi-port: 1 to 65535, got {args.esxi_port}")
    if not 1 <= args.esxi_timeout <= 86400:
        raise UsageError(f"--esxi-timeout: 1 to 86400 seconds, got {args.esxi_timeout:g}")
    return EsxiTarget(
        args.esxi,
        args.esxi_user,
        password,
        args.esxi_port,
        args.esxi_host,
        args.esxi_datastore,
        args.esxi_ca,
        args.esxi_insecure,
    )


def cmd_verify_esxi(args: argparse.Namespace, client: Any, group_ref: str | dict[str, Any]) -> int:
    """The CLI's ``lab verify --esxi``: prints the report (JSON with --json), exit 70 when a VM fails."""
    from appliance.errors import VerificationFailedError
    from appliance.lab.group import parse_group

    target = target_from_args(args)
    if isinstance(group_ref, str):
        docs = [g for g in client.call("lab_groups") if g.get("name") == group_ref]
        if not docs or docs[0].get("error"):
            raise UsageError(f"no usable lab group {group_ref!r}")
        doc = docs[0]  # the daemon's parsed form: keep what chooses the VMs and their points
        vms = [{k: v[k] for k in ("vm", "repo", "point") if v.get(k) is not None} for v in doc["vms"]]
        if doc.get("at"):
            vms = [{k: v for k, v in vm.items() if k != "point"} for vm in vms]
        group = parse_group({"name": doc["name"], "at": doc.get("at"), "vms": vms})
    else:
        group = parse_group(group_ref)
    report = verify_group_on_esxi(client.call, group, target, args.esxi_timeout)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"esxi lab {report['lab']} ({group.name}) on {report.get('host', target.server)}: "
            f"{'passed' if report['ok'] else 'FAILED'}"
        )
        for vm in report["vms"]:
            print(
                f"  {vm['vm']}: {vm['state']}" + (f", up after {vm['boot_seconds']} s" if "boot_seconds" in vm else "")
            )
            for check in vm["checks"]:
                print(f"    {check['line']}")
    if not report["ok"]:
        raise VerificationFailedError(
            f"lab {group.name} did not verify on {target.server}: {'; '.join(report['failed'])}"
        )
    return 0
