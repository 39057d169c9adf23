"""The labs' ESXi path (appliance/lab/esxi.py) against govmomi's vSphere simulator (tests/vcsim_lab/main.go: an
ESXi host that traces every SOAP call it gets and whose powered-on VMs' tools heartbeat turns green, except a
VM named *-notools).

The calls the host received are read from the simulator's own trace, so their order is what the host saw:
an uplink-less switch and its port group first, then each VM registered and powered on in boot order (the
next only once the one before had its heartbeat), then power-off, unregister, port group and switch removed,
also after a failure. The last test runs the whole `bootback lab verify GROUP --esxi` against a real daemon
whose published sandboxes the simulator's datastore shows (standing in for the host's NFS mount)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.demo.bootdisk import demo_vmx
from appliance.lab.esxi import EsxiLab, EsxiTarget, EsxiVM, isolate_nics, verify_group_on_esxi, wait_task
from appliance.lab.group import parse_group
from appliance.sessions.control import ControlClient
from tests.daemon_process import EXPORT, ROOT, DaemonProcess, bootback
from tests.nfsd_process import PRIVATE_PORTS

pyVmomi = pytest.importorskip("pyVmomi")
from pyVim.connect import Disconnect, SmartConnect  # noqa: E402
from pyVmomi import vim  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("go") is None, reason="needs Go and govmomi (scripts/setup.sh)")
DATASTORE = "bootback"
STEPS = {
    "AddVirtualSwitch",
    "AddPortGroup",
    "RegisterVM_Task",
    "ReconfigVM_Task",
    "PowerOnVM_Task",
    "PowerOffVM_Task",
    "UnregisterVM",
    "RemovePortGroup",
    "RemoveVirtualSwitch",
}


class Simulator:
    def __init__(self, port: int, root: Path, trace: Path) -> None:
        self.port, self.root, self.trace = port, root, trace

    def connect(self):
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        return SmartConnect(host="127.0.0.1", port=self.port, user="bootback", pwd="vcsim-pass", sslContext=ctx)

    def mark(self) -> int:
        return self.trace.stat().st_size

    def calls(self, since: int) -> list[tuple[str, str]]:
        """(method, detail) of each lab step the host received since ``since``, in order; detail is the VM's
        .vmx path for RegisterVM_Task, the request body for AddVirtualSwitch, else the object's id."""
        text = self.trace.read_text(errors="replace")[since:]
        out = []
        parts = re.split(r"^(Request|Response): ", text, flags=re.M)  # a message may span lines
        for body in (parts[i + 1] for i in range(1, len(parts) - 1, 2) if parts[i] == "Request"):
            m = re.search(r"<(?:\w+:)?Body[^>]*>\s*<(?:\w+:)?(\w+)", body)
            if not m or m[1] not in STEPS:
                continue
            if m[1] == "RegisterVM_Task":
                detail = re.search(r"<path[^>]*>([^<]*)</path>", body)[1]
            elif m[1] == "AddVirtualSwitch":
                detail = body
            else:
                detail = re.search(r"<_this[^>]*>([^<]*)</_this>", body)[1]
            out.append((m[1], detail))
        return out

    def place_vm(self, lab: str, folder: str, name: str) -> str:
        """A VM folder on the datastore, as the appliance publishes it."""
        d = self.root / DATASTORE / folder
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.vmx").write_text(demo_vmx(name, f"{name}.vmdk"))
        self.simulator_files(d, lab, name)
        return f"[{DATASTORE}] {folder}/{name}.vmx"

    @staticmethod
    def simulator_files(folder: Path, lab: str, name: str) -> None:
        """The simulator's RegisterVM opens NAME.nvram (NAME: the registered name) and vmware.log beside the
        .vmx, where a real host reads what the .vmx names."""
        (folder / f"bootback-lab-{lab}-{name}.nvram").write_bytes(b"")
        (folder / "vmware.log").write_text("")


@pytest.fixture(scope="module")
def vcsim(build_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    source = ROOT / "tests" / "vcsim_lab" / "main.go"
    binary = build_cache / f"vcsim-lab-{hashlib.sha256(source.read_bytes()).hexdigest()[:12]}"
    if not binary.exists():
        env = {**os.environ, "GO111MODULE": "off", "GOPATH": "/usr/share/gocode", "GOCACHE": str(build_cache / "go")}
        subprocess.run(["go", "build", "-o", f"{binary}.tmp", str(source)], check=True, env=env, timeout=600)
        os.replace(f"{binary}.tmp", binary)
    root = tmp_path_factory.mktemp("vcsim-lab")
    (root / DATASTORE).mkdir()
    trace = root / "trace.log"
    trace.touch()
    proc = subprocess.Popen(
        [str(binary)], cwd=root, stdout=subprocess.PIPE, text=True, env={**os.environ, "VCSIM_TRACE": str(trace)}
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("https://"), f"the simulator did not start: {url!r}"
        sim = Simulator(int(url.rsplit(":", 1)[1].split("/")[0]), root, trace)
        si = sim.connect()
        # the host mounts the appliance's export as the datastore (what roles/bootback_esxi_datastore does)
        host = si.content.rootFolder.childEntity[0].hostFolder.childEntity[0].host[0]
        spec = vim.host.NasVolume.Specification(
            remoteHost="127.0.12.7", remotePath="/bootback", localPath=DATASTORE, accessMode="readWrite", type="NFS"
        )
        host.configManager.datastoreSystem.CreateNasDatastore(spec=spec)
        Disconnect(si)
        yield sim
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


@pytest.fixture
def si(vcsim: Simulator):
    si = vcsim.connect()
    yield si
    host = _host(si)
    # nothing of any lab is left on the host
    assert [vm.name for vm in host.vm] == []
    network = host.configManager.networkSystem.networkInfo
    assert not [s.name for s in network.vswitch if s.name.startswith("bootback-lab-")]
    assert not [p.spec.name for p in network.portgroup if p.spec.name.startswith("bootback-lab-")]
    Disconnect(si)


def _host(si):
    view = si.content.viewManager.CreateContainerView(si.content.rootFolder, [vim.HostSystem], True)
    (host,) = view.view
    view.Destroy()
    return host


def test_group_boots_in_order_on_an_isolated_port_group_and_everything_is_undone(vcsim, si) -> None:
    vms = [
        EsxiVM("db", vcsim.place_vm("t1", "db-sandbox-1", "db"), 10),
        EsxiVM("app", vcsim.place_vm("t1", "app-sandbox-1", "app"), 10),
    ]
    mark = vcsim.mark()
    report = EsxiLab(si, lab_id="t1").run(vms)
    assert report["ok"] is True, (report["failed"], report.get("error"))
    db, app = report["vms"]
    assert (db["state"], app["state"]) == ("passed", "passed")
    assert db["finished"] <= app["started"], "app was registered before db's heartbeat was green"
    assert db["checks"][0]["line"].startswith("heartbeat: passed after ")
    calls = vcsim.calls(mark)
    names = [c[0] for c in calls]
    assert names == [
        "AddVirtualSwitch",
        "AddPortGroup",
        "RegisterVM_Task",
        "PowerOnVM_Task",
        "RegisterVM_Task",
        "PowerOnVM_Task",
        "PowerOffVM_Task",  # app first: the reverse of the boot order
        "UnregisterVM",
        "PowerOffVM_Task",
        "UnregisterVM",
        "RemovePortGroup",
        "RemoveVirtualSwitch",
    ], calls
    assert [c[1] for c in calls if c[0] == "RegisterVM_Task"] == [vms[0].vmx, vms[1].vmx]
    on = [c[1] for c in calls if c[0] == "PowerOnVM_Task"]
    assert [c[1] for c in calls if c[0] == "PowerOffVM_Task"] == on[::-1]
    switch = calls[0][1]
    assert "bootback-lab-t1" in switch and "<bridge" not in switch, "the lab's switch has an uplink"


def test_a_failure_midway_still_powers_off_unregisters_and_removes_the_port_group(vcsim, si) -> None:
    """db boots; app's .vmx is not on the datastore, so registering it fails: the lab fails naming app, the
    VM after it is never registered, and db is powered off and unregistered, the port group removed."""
    db = EsxiVM("db", vcsim.place_vm("t2", "db-sandbox-2", "db"), 10)
    ghost = EsxiVM("app", f"[{DATASTORE}] nowhere/app.vmx", 10)
    last = EsxiVM("web", vcsim.place_vm("t2", "web-sandbox-2", "web"), 10)
    mark = vcsim.mark()
    report = EsxiLab(si, lab_id="t2").run([db, ghost, last])
    assert report["ok"] is False
    states = [(v["vm"], v["state"]) for v in report["vms"]]
    assert states == [("db", "passed"), ("app", "failed"), ("web", "skipped")], report
    assert report["failed"][0].startswith("app: app: registering [bootback] nowhere/app.vmx: "), report["failed"]
    names = [c[0] for c in vcsim.calls(mark)]
    assert names == [
        "AddVirtualSwitch",
        "AddPortGroup",
        "RegisterVM_Task",
        "PowerOnVM_Task",
        "RegisterVM_Task",  # app's, refused
        "PowerOffVM_Task",
        "UnregisterVM",
        "RemovePortGroup",
        "RemoveVirtualSwitch",
    ]


def test_a_vm_whose_tools_never_answer_fails_at_its_timeout(vcsim, si) -> None:
    dead = EsxiVM("db-notools", vcsim.place_vm("t3", "db-notools-sandbox", "db-notools"), 2)
    mark = vcsim.mark()
    report = EsxiLab(si, lab_id="t3").run([dead])
    (vm,) = report["vms"]
    assert vm["state"] == "failed" and "no green VMware Tools heartbeat in 2 s (last: gray)" in vm["detail"], vm
    assert vm["checks"][0]["line"].startswith("heartbeat: FAILED: ")
    assert [c[0] for c in vcsim.calls(mark)][-4:] == [
        "PowerOffVM_Task",
        "UnregisterVM",
        "RemovePortGroup",
        "RemoveVirtualSwitch",
    ]


def test_every_network_card_is_moved_onto_the_lab_port_group(vcsim, si) -> None:
    """The simulator registers VMs without the .vmx's cards, so this VM is made with one on the production
    network ("VM Network"), as a published VM has."""
    host = _host(si)
    datacenter = si.content.rootFolder.childEntity[0]
    card = vim.vm.device.VirtualE1000(
        key=-1,
        backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName="VM Network"),
        deviceInfo=vim.Description(label="Network adapter 1", summary="VM Network"),
    )
    spec = vim.vm.ConfigSpec(
        name="nic-test",
        files=vim.vm.FileInfo(vmPathName=f"[{DATASTORE}]"),
        deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="add", device=card)],
    )
    vm = wait_task(datacenter.vmFolder.CreateVM_Task(config=spec, pool=host.parent.resourcePool, host=host), "create")
    net = host.configManager.networkSystem
    net.AddVirtualSwitch(vswitchName="bootback-lab-nic", spec=vim.host.VirtualSwitch.Specification(numPorts=8))
    net.AddPortGroup(
        portgrp=vim.host.PortGroup.Specification(
            name="bootback-lab-nic-pg", vlanId=0, vswitchName="bootback-lab-nic", policy=vim.host.NetworkPolicy()
        )
    )
    try:
        network = next(n for n in datacenter.network if n.name == "bootback-lab-nic-pg")
        before = [
            d.backing.deviceName for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)
        ]
        assert before == ["VM Network"]
        assert isolate_nics(vm, network) == 1
        after = [d.backing for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]
        assert [(b.deviceName, b.network) for b in after] == [("bootback-lab-nic-pg", network)]
    finally:
        wait_task(vm.Destroy_Task(), "destroy")
        net.RemovePortGroup(pgName="bootback-lab-nic-pg")
        net.RemoveVirtualSwitch(vswitchName="bootback-lab-nic")


def test_a_group_the_appliance_publishes_runs_from_its_export(vcsim, si, tmp_path: Path) -> None:
    """verify_group_on_esxi (what `bootback lab verify GROUP --esxi` runs): a real daemon publishes each VM as a
    sandbox under its export; the host registers each .vmx from the datastore that mounts that export. Here the
    simulator's datastore is a directory, so each published .vmx is copied into it over NFS (libnfs's nfs-cp)."""
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(1 << 20))
    repo = tmp_path / "repo"
    bootback("init", repo)
    for vm in ("db", "app"):
        bootback("backup", repo, "--vm", vm, disk)
    d = DaemonProcess(repo, tmp_path / "state", *PRIVATE_PORTS).start()
    try:
        client = ControlClient(d.state)
        ports = client.call("status")["ports"]

        def call(op: str, **params):
            result = client.call(op, **params)
            if op == "publish":  # the host's NFS mount of the export, as the simulator's datastore directory
                for session in result:
                    vmx = next(f for f in session["files"] if f.endswith(".vmx"))
                    folder = vcsim.root / DATASTORE / session["path"].removeprefix(EXPORT + "/")
                    folder.mkdir(parents=True)
                    url = f"nfs://127.0.0.1{session['path']}/{vmx}?nfsport={ports['nfs']}&mountport={ports['mount']}"
                    subprocess.run(["nfs-cp", url, str(folder / vmx)], check=True, capture_output=True, timeout=30)
                    vcsim.simulator_files(folder, "t5", session["vm"])
            return result

        group = parse_group({"name": "shop", "vms": [{"vm": "db"}, {"vm": "app"}]})
        target = EsxiTarget("127.0.0.1", "bootback", "vcsim-pass", vcsim.port, datastore=DATASTORE, insecure=True)
        mark = vcsim.mark()
        report = verify_group_on_esxi(call, group, target, timeout=10, lab_id="t5")
        assert report["ok"] is True and report["group"] == "shop", report
        registered = [c[1] for c in vcsim.calls(mark) if c[0] == "RegisterVM_Task"]
        assert [re.fullmatch(rf"\[{DATASTORE}\] (db|app)-sandbox-\w+/(db|app)\.vmx", p)[1] for p in registered] == [
            "db",
            "app",
        ], registered
        assert "guestOS" in (vcsim.root / DATASTORE / registered[0].split("] ")[1]).read_text()
        assert client.call("sessions") == [], "the sandboxes were not stopped"

        # the CLI, for a group the appliance keeps: nothing mirrors the export into the simulator's datastore
        # now, so registering db fails; the command says which .vmx, exits 70, and leaves nothing behind
        client.call("lab_define", group={"name": "shop", "vms": [{"vm": "db"}, {"vm": "app"}]})
        password = tmp_path / "esxi-password"
        password.write_text("vcsim-pass\n")
        esxi = ["--esxi", "127.0.0.1", "--esxi-port", str(vcsim.port), "--esxi-user", "bootback", "--esxi-insecure"]
        p = d.cli("lab", "verify", "shop", *esxi, ok=False)
        assert p.returncode == 2 and "--esxi: give the password with --esxi-password-file" in p.stderr, p.stderr
        mark = vcsim.mark()
        p = d.cli("lab", "verify", "shop", *esxi, "--esxi-password-file", password, "--json", ok=False)
        assert p.returncode == 70, p.stdout + p.stderr
        report = json.loads(p.stdout)
        assert [v["state"] for v in report["vms"]] == ["failed", "skipped"], report
        assert re.search(r"db: registering \[bootback\] db-sandbox-\w+/db\.vmx: .*NotFound", p.stderr), p.stderr
        assert [c[0] for c in vcsim.calls(mark)] == [
            "AddVirtualSwitch",
            "AddPortGroup",
            "RegisterVM_Task",
            "RemovePortGroup",
            "RemoveVirtualSwitch",
        ]
        assert client.call("sessions") == [], "the sandboxes were not stopped"
    finally:
        d.stop()
