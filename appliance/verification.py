"""Automated backup verification: publish a restore point as a sandbox, boot it in isolation (no network)
from the datastore exactly as a hypervisor would, check that it really runs, throw the sandbox away.

"Really runs" is the guest printing on its serial console within the timeout and, when the caller knows what a
healthy boot prints (``expect``, a regular expression), printing that. Veeam calls this SureBackup.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import re2

from appliance.atomicfile import write_atomic
from appliance.demo.qemu import boot
from appliance.errors import LimitExceededError, UsageError, VerificationFailedError
from appliance.sessions.control import ControlClient

log = logging.getLogger("bootback.verification")
KEEP = 50  # finished verifications kept (newest), in STATE/verifications/
MAX_EXPECT = 1000  # characters of an ``expect`` pattern
PATTERN_MEMORY = 8 << 20  # bytes RE2 may use for one compiled pattern
MAX_CONSOLE = 1 << 20  # console bytes a verification keeps; a guest printing more is stopped there
MAX_RUNNING = 2  # verifications booting at once (each is a qemu process with its guest's RAM)
MAX_MEMORY_MIB = 4096  # guest RAM a verification may ask for
# qemu's nfs:// driver sends its process's uid in AUTH_SYS; a hypervisor mounts as root and the datastore's disks
# are root's (0600), so a verifier running as the container's bootback user says uid 0 as a hypervisor would.
AS_HYPERVISOR = "?uid=0&gid=0"


def compile_expect(expect: str | None) -> re2._Regexp | None:
    """The one place ``expect`` patterns are compiled. They come from API callers and are matched inside the
    daemon, so the engine is RE2 (linear time in the text, bounded memory): a backtracking engine lets one
    pattern like ``(.|.)*XYZ`` hold the daemon for minutes. RE2 has no backreferences or lookaround."""
    if expect is None or expect == "":
        return None
    if not isinstance(expect, str):
        raise UsageError(f"expect: a string, got {type(expect).__name__}")
    if len(expect) > MAX_EXPECT:
        raise UsageError(f"expect: at most {MAX_EXPECT} characters, got {len(expect)}")
    options = re2.Options()
    options.log_errors = False
    options.max_mem = PATTERN_MEMORY
    try:
        return re2.compile(expect, options)
    except re2.error as exc:
        why = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise UsageError(
            f"expect: not a regular expression RE2 accepts (no backreferences or lookaround) in {expect!r}: {why}"
        ) from None


def verify_boot(
    client: ControlClient,
    vm: str,
    timeout: float = 300,
    expect: str | None = None,
    console_log: Path | None = None,
    memory_mib: int = 1024,
    repo: str | None = None,
) -> dict[str, Any]:
    """Verify through a running daemon's control socket (the CLI's way). The control socket is a Unix socket,
    so the CLI runs on the daemon's host and mounts from there, as the daemon's own jobs do."""

    def publish() -> dict:
        (doc,) = client.call("publish", vm=vm, mode="sandbox", repo=repo)
        return doc

    nfs_host = client.call("status").get("local_nfs_host")
    return run_verification(
        publish, lambda sid: client.call("stop", id=sid), timeout, expect, console_log, memory_mib, nfs_host
    )


def local_nfs_host(bind: str) -> str:
    """Where a verifier on the daemon's own host reaches its NFS server: the bound address, or loopback when it
    listens on every address. Not the advertised name: that is how hypervisors reach the appliance, and inside
    a container (or behind NAT) it may not resolve, or lead to published ports other than the daemon's own."""
    return "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind


def run_verification(
    publish: Callable[[], dict],
    stop: Callable[[str], object],
    timeout: float = 300,
    expect: str | None = None,
    console_log: Path | None = None,
    memory_mib: int = 1024,
    nfs_host: str | None = None,
) -> dict[str, Any]:
    """Publish a sandbox, boot it without network, judge the console, stop the sandbox; returns the report.
    ``nfs_host``: the host qemu mounts the sandbox from (default: the published nfs:// URL's)."""
    pattern = compile_expect(expect)
    started = time.monotonic()
    doc = publish()
    try:
        base = f"nfs://{nfs_host}{doc['path']}" if nfs_host else doc["nfs_url"]
        drives = [f"{base}/{d['extent']}{AS_HYPERVISOR}" for d in doc["disks"]]
        result = boot(
            drives,
            timeout=timeout,
            console_log=console_log,
            memory_mib=memory_mib,
            stop_when=pattern,
            max_console_bytes=MAX_CONSOLE,
        )
    finally:
        stop(doc["id"])
    matched = bool(pattern.search(result.console)) if pattern else None
    ok = result.first_line_seconds is not None and matched is not False
    report = {
        "vm": doc["vm"],
        "point": doc["point"],
        "verified": ok,
        "session": doc["id"],
        "first_console_line_seconds": round(result.first_line_seconds, 1) if result.first_line_seconds else None,
        "expected": expect,
        "matched": matched,
        "accelerator": result.accel,
        "seconds": round(time.monotonic() - started, 1),
        "console_tail": result.console[-2000:],
    }
    return report


def require_verified(report: dict[str, Any]) -> None:
    if report["verified"]:
        return
    if report["first_console_line_seconds"] is None:
        why = "the guest printed nothing on its console"
    else:
        why = f"the console never matched {report['expected']!r}"
    raise VerificationFailedError(f"{report['vm']}@{report['point']} did not verify: {why}")


class Verifications:
    """Verification jobs the daemon runs for the API and the page: one thread each, a record per job in
    STATE/verifications/ so results outlive restarts (a job cut off by a restart says so)."""

    def __init__(
        self,
        state_dir: Path,
        publish: Callable[..., list[dict]],
        stop: Callable[..., object],
        max_running: int = MAX_RUNNING,
        max_memory_mib: int = MAX_MEMORY_MIB,
        nfs_host: str = "127.0.0.1",
        check_point: Callable[[str, str, str | None], object] = lambda vm, point, repo: None,
    ) -> None:
        """``check_point(vm, point, repo)`` raises when the restore point does not exist."""
        self._check_point = check_point
        self.max_running, self.max_memory_mib = max_running, max_memory_mib
        self.nfs_host = nfs_host  # see local_nfs_host
        self.dir = Path(state_dir) / "verifications"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._publish, self._stop = publish, stop
        self._lock = threading.Lock()
        self.jobs: dict[str, dict[str, Any]] = {}
        for path in sorted(self.dir.glob("*.json")):
            try:
                job = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if job.get("state") == "running":
                job.update(state="error", error="the appliance restarted while this verification ran")
            self.jobs[job["id"]] = job

    def start(
        self,
        vm: str,
        point: str = "latest",
        repo: str | None = None,
        expect: str | None = None,
        timeout: float = 300,
        memory_mib: int = 1024,
    ) -> dict[str, Any]:
        """Start a backup verification (boot in isolation, check the console); poll ``get`` for it."""
        name, _, p = vm.partition("@")
        self._check_point(name, p or point, repo)  # an unknown VM or point is the caller's error, now
        compile_expect(expect)  # a bad pattern is the caller's error now, not the job's later
        for param, value in (("timeout", timeout), ("memory_mib", memory_mib)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise UsageError(f"{param}: a number, got {value!r}")
        if not 10 <= timeout <= 3600:
            raise UsageError(f"timeout: between 10 and 3600 seconds, got {timeout}")
        if not 128 <= memory_mib <= self.max_memory_mib:
            raise UsageError(f"memory_mib: between 128 and {self.max_memory_mib}, got {memory_mib}")
        job = {
            "id": uuid.uuid4().hex[:12],
            "vm": name,
            "point": p or point,
            "repository": repo,
            "expect": expect,
            "timeout": timeout,
            "state": "running",
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "finished": None,
            "report": None,
            "error": None,
        }
        with self._lock:
            running = sum(1 for j in self.jobs.values() if j["state"] == "running")
            if running >= self.max_running:
                raise LimitExceededError(
                    f"{running} verifications are running, the most this appliance runs at "
                    "once (--max-verifications): try again when one finishes"
                )
            self.jobs[job["id"]] = job
            self._save(job)
            started = dict(job)  # as it starts: the thread may finish before we return
        threading.Thread(target=self._run, args=(job, memory_mib), daemon=True, name=f"verify-{job['id']}").start()
        return started

    def _run(self, job: dict[str, Any], memory_mib: int) -> None:
        def publish() -> dict:
            (doc,) = self._publish(vm=job["vm"], point=job["point"], mode="sandbox", repo=job["repository"])
            job["point"] = doc["point"]  # "latest" becomes the point actually booted
            return doc

        try:
            report = run_verification(
                publish,
                lambda sid: self._stop(id=sid),
                job["timeout"],
                job["expect"],
                self.dir / f"{job['id']}.console",
                memory_mib,
                self.nfs_host,
            )
            job.update(state="verified" if report["verified"] else "failed", report=report)
        except Exception as exc:  # noqa: BLE001 - reported on the job: no qemu, unknown VM, ...
            job.update(
                state="error",
                error=str(exc)
                if not isinstance(exc, FileNotFoundError)
                else f"cannot boot here: {exc.filename or exc} is not installed",
            )
        job["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        log.info("verification %s of %s@%s: %s", job["id"], job["vm"], job["point"], job["state"])
        with self._lock:
            self._save(job)
            self._prune()

    def _save(self, job: dict[str, Any]) -> None:
        write_atomic(self.dir / f"{job['id']}.json", json.dumps(job, indent=2))

    def _prune(self) -> None:
        done = sorted((j for j in self.jobs.values() if j["state"] != "running"), key=lambda j: j["started"])
        for job in done[:-KEEP]:
            self.jobs.pop(job["id"], None)
            for suffix in (".json", ".console"):
                (self.dir / f"{job['id']}{suffix}").unlink(missing_ok=True)

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(j) for j in sorted(self.jobs.values(), key=lambda j: j["started"], reverse=True)]

    def get(self, id: str) -> dict[str, Any]:  # noqa: A002 - the API's field name
        from appliance.errors import SessionNotFoundError

        with self._lock:
            job = self.jobs.get(id)
        if job is None:
            raise SessionNotFoundError(f"no verification {id!r}")
        return dict(job)
