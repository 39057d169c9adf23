"""Automated backup verification: publish a restore point as a sandbox, boot it in isolation (no network)
from the datastore exactly as a hypervisor would, check that it really runs, throw the sandbox away.

"Really runs" is the guest printing on its serial console within the timeout and, when the caller knows what a
healthy boot prints (``expect``, a regular expression), printing that. Veeam calls this SureBackup.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from appliance.demo.qemu import boot
from appliance.errors import UsageError, VerificationFailedError
from appliance.sessions.control import ControlClient


def verify_boot(client: ControlClient, vm: str, timeout: float = 300, expect: str | None = None,
                console_log: Path | None = None, memory_mib: int = 1024) -> dict[str, Any]:  # fmt: skip
    try:
        pattern = re.compile(expect) if expect else None
    except re.error as exc:
        raise UsageError(f"--expect: not a regular expression: {exc}") from None
    started = time.monotonic()
    (doc,) = client.call("publish", vm=vm, mode="sandbox")
    try:
        drives = [f"{doc['nfs_url']}/{d['extent']}" for d in doc["disks"]]
        result = boot(drives, timeout=timeout, console_log=console_log, memory_mib=memory_mib, stop_when=pattern)
    finally:
        client.call("stop", id=doc["id"])
    matched = bool(pattern.search(result.console)) if pattern else None
    ok = result.first_line_seconds is not None and matched is not False
    report = {
        "vm": doc["vm"], "point": doc["point"], "verified": ok, "session": doc["id"],
        "first_console_line_seconds": round(result.first_line_seconds, 1) if result.first_line_seconds else None,
        "expected": expect, "matched": matched, "seconds": round(time.monotonic() - started, 1),
        "console_tail": result.console[-2000:],
    }  # fmt: skip
    return report


def require_verified(report: dict[str, Any]) -> None:
    if report["verified"]:
        return
    if report["first_console_line_seconds"] is None:
        why = "the guest printed nothing on its console"
    else:
        why = f"the console never matched {report['expected']!r}"
    raise VerificationFailedError(f"{report['vm']}@{report['point']} did not verify: {why}")
