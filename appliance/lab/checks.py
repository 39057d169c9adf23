"""The checks a lab runs against a guest, each from inside the lab's network, each retried until it passes or its
timeout ends, each ending in one result line that says what was checked and what was seen.

A check is ``run_check(probe, check) -> CheckResult``; ``Probe`` is what a check may use: the guest's machine
(console, screenshots), its address, and the lab network (to run code and programs inside it).
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.lab.group import Check
from appliance.lab.machine import Machine, MachineError
from appliance.lab.network import LabNetwork, run_in
from appliance.verification import compile_expect

RETRY = 1.0  # seconds between attempts
MAX_BODY = 64 << 10  # bytes of an HTTP answer read
MAX_OUTPUT = 4000  # characters of a script's output kept
AGENT_WAIT = 3.0  # seconds one guest-agent attempt waits for its answers


@dataclass
class Probe:
    machine: Machine
    address: str
    network: LabNetwork
    workdir: Path
    cancelled: threading.Event


@dataclass
class CheckResult:
    type: str
    target: str
    ok: bool
    seconds: float
    detail: str
    screenshot: str | None = None

    @property
    def line(self) -> str:
        state = "passed" if self.ok else "FAILED"
        return f"{self.type} {self.target}: {state} after {self.seconds:.1f} s: {self.detail}"

    def as_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "target": self.target,
            "ok": self.ok,
            "seconds": round(self.seconds, 1),
            "detail": self.detail,
            "screenshot": self.screenshot,
            "line": self.line,
        }


def target_of(check: Check, address: str) -> str:
    if check.type == "console":
        return repr(check.expect)
    if check.type == "tcp":
        return f"{address}:{check.port}"
    if check.type == "http":
        return f"{'https' if check.https else 'http'}://{address}:{check.port}{check.path}"
    if check.type == "script":
        return " ".join([*check.script, address])
    if check.type == "agent":
        return "org.qemu.guest_agent.0"
    return address


def run_check(probe: Probe, check: Check) -> CheckResult:
    """Try ``check`` until it passes, its timeout ends, the guest stops, or the lab is cancelled."""
    attempt = ATTEMPTS[check.type]
    started = time.monotonic()
    deadline = started + check.timeout
    detail = "not tried"
    extra: dict[str, Any] = {}
    while True:
        remaining = deadline - time.monotonic()
        try:
            ok, detail = attempt(probe, check, max(0.5, min(remaining, 10.0)), extra)
        except OSError as exc:
            ok, detail = False, exc.strerror or str(exc)
        if ok:
            break
        if not probe.machine.running():
            detail = f"{detail} (the guest stopped: {probe.machine.qemu_errors().strip()[-300:] or 'powered off'})"
            break
        if time.monotonic() + RETRY >= deadline:
            detail = f"{detail} (gave up at the {check.timeout:g} s timeout)"
            break
        if probe.cancelled.wait(RETRY):
            detail = f"{detail} (the lab was stopped)"
            break
    seconds = time.monotonic() - started
    return CheckResult(check.type, target_of(check, probe.address), ok, seconds, detail, extra.get("screenshot"))


def _console(probe: Probe, check: Check, _wait: float, _extra: dict) -> tuple[bool, str]:
    pattern = compile_expect(check.expect)
    text = probe.machine.console()
    m = pattern.search(text) if pattern else None
    if m:
        return True, f"console printed {m.group(0)!r}"
    last = text.strip().splitlines()[-1:] or ["nothing yet"]
    return False, f"console does not match; last line {last[0][-200:]!r}"


def _ping(probe: Probe, check: Check, wait: float, _extra: dict) -> tuple[bool, str]:
    secs = str(max(1, int(wait)))
    try:
        p = probe.network.exec(["busybox", "ping", "-c", "1", "-W", secs, probe.address], timeout=wait + 5)
    except subprocess.TimeoutExpired:
        return False, "no echo reply"
    out = p.stdout.decode(errors="replace")
    for line in out.splitlines():
        if "bytes from" in line:
            return True, line.strip()
    return False, "no echo reply"


def _tcp(probe: Probe, check: Check, wait: float, _extra: dict) -> tuple[bool, str]:
    def connect() -> None:
        with socket.create_connection((probe.address, check.port), timeout=wait):
            pass

    try:
        run_in(probe.network.name, connect)
    except OSError as exc:
        return False, f"connect: {exc.strerror or exc}"
    return True, "port open"


def _http(probe: Probe, check: Check, wait: float, _extra: dict) -> tuple[bool, str]:
    def get() -> tuple[int, str]:
        if check.https:
            # The guest's certificate is its own (often self-signed): the check is about the service answering.
            ctx = ssl._create_unverified_context()  # noqa: S323
            conn = http.client.HTTPSConnection(probe.address, check.port, timeout=wait, context=ctx)
        else:
            conn = http.client.HTTPConnection(probe.address, check.port, timeout=wait)
        try:
            conn.request("GET", check.path, headers={"User-Agent": "bootback-lab"})
            resp = conn.getresponse()
            return resp.status, resp.read(MAX_BODY).decode(errors="replace")
        finally:
            conn.close()

    try:
        status, body = run_in(probe.network.name, get)
    except (OSError, http.client.HTTPException) as exc:
        return False, f"GET: {getattr(exc, 'strerror', None) or exc}"
    seen = f"status {status}, body {body.strip()[:200]!r}"
    if status != check.status:
        return False, f"expected status {check.status}, got {seen}"
    if check.text is not None and check.text not in body:
        return False, f"expected text {check.text!r}, got {seen}"
    return True, seen


def _script(probe: Probe, check: Check, wait: float, _extra: dict) -> tuple[bool, str]:
    env = {"LAB_VM": probe.machine.name, "LAB_ADDRESS": probe.address, "LAB_NETWORK": probe.network.name}
    try:
        p = probe.network.exec([*check.script, probe.address], timeout=wait, env=env)
    except subprocess.TimeoutExpired:
        return False, f"still running after {wait:.0f} s"
    except FileNotFoundError:
        return False, f"{check.script[0]} not found"
    out = (p.stdout + p.stderr).decode(errors="replace").strip()[-MAX_OUTPUT:]
    return p.returncode == 0, f"exit {p.returncode}" + (f": {out[-300:]}" if out else "")


def _agent(probe: Probe, check: Check, wait: float, _extra: dict) -> tuple[bool, str]:
    """qemu-guest-agent answers on its virtio-serial channel: guest-sync with a fresh id (so a reply left over
    from an earlier attempt is not taken for this one's), then guest-ping."""
    try:
        probe.machine.guest_agent_ping(min(wait, AGENT_WAIT))
    except TimeoutError:
        return False, "no answer from the guest agent (org.qemu.guest_agent.0)"
    except MachineError as exc:
        return False, str(exc)
    return True, "guest-ping answered"


def _screenshot(probe: Probe, check: Check, _wait: float, extra: dict) -> tuple[bool, str]:
    """The guest's screen as PNG, kept; it passes when the screen shows something (not one colour)."""
    png = probe.machine.screendump(probe.workdir / f"{probe.machine.name}.png")
    ppm = probe.machine.screendump(probe.workdir / f"{probe.machine.name}.ppm", fmt="ppm")
    try:
        colours = _colours(ppm)
    finally:
        ppm.unlink(missing_ok=True)
    extra["screenshot"] = str(png)
    if colours < 2:
        return False, "the screen is blank"
    return True, f"screen saved ({colours} colours)"


def _colours(ppm: Path) -> int:
    """Distinct colours of a binary PPM (P6, 8 bit) as qemu writes it, counted up to 2."""
    data = ppm.read_bytes()
    header = re.match(rb"P6\s+\d+\s+\d+\s+\d+\s", data)
    if header is None:
        return 0
    pixels = data[header.end() :]
    return 1 if pixels == pixels[:3] * (len(pixels) // 3) else 2


ATTEMPTS = {
    "console": _console,
    "ping": _ping,
    "tcp": _tcp,
    "http": _http,
    "script": _script,
    "screenshot": _screenshot,
    "agent": _agent,
}
