"""The daemon's labs: application groups kept in STATE/lab-groups/, verification jobs and sandbox labs with a
record each in STATE/labs/ID/ (lab.json, consoles, screenshots) so results outlive restarts.

A verification runs its group and closes the lab; a sandbox (``start``) keeps its guests running until ``stop``
or its TTL. At most ``max_running`` labs exist at once, and a lab whose guests' memory would not fit in the
host's available memory is refused before anything starts. A stuck guest never holds the daemon: every check has
a timeout, labs run on their own threads, and stopping one kills its qemu processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from appliance.atomicfile import write_atomic
from appliance.errors import LimitExceededError, SessionNotFoundError, UsageError
from appliance.lab.group import NAME_RE, Group, parse_group
from appliance.lab.network import PREFIX, LabNetwork, namespaces
from appliance.lab.runner import LabRun, Points, Publish, Stop
from appliance.lab.schedule import ScheduleState, next_run

log = logging.getLogger("bootback.lab")
KEEP = 50  # finished labs kept (newest), with their consoles and screenshots
MAX_GROUPS = 200
MAX_TTL = timedelta(days=7)
DEFAULT_TTL = timedelta(hours=4)
MEMORY_MARGIN_MIB = 512  # left for the appliance itself when guests start
QEMU_OVERHEAD_MIB = 64  # a TCG qemu's own memory beside its guest's
LIVE = ("verifying", "starting", "running")
VERDICTS = ("passed", "failed", "error")  # a verification's ends that say something about its group


def parse_ttl(text: object) -> timedelta:
    """'4h', '90m', '1d', '3600' (seconds) -> a duration between a minute and MAX_TTL."""
    m = re.fullmatch(r"\s*(\d{1,7})\s*([smhd]?)\s*", str(text))
    if m is None or isinstance(text, bool):
        raise UsageError(f"ttl: a duration such as 30m, 4h or 2d, got {text!r}")
    ttl = timedelta(seconds=int(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]])
    if not timedelta(minutes=1) <= ttl <= MAX_TTL:
        raise UsageError(f"ttl: from 1m to {MAX_TTL.days}d, got {text!r}")
    return ttl


def save_group(groups_dir: Path, group: dict[str, Any]) -> Group:
    """Keep a group document in ``groups_dir`` under its name (checked first; replaces one of the same name)."""
    parsed = parse_group(group)
    path = Path(groups_dir) / f"{parsed.name}.json"
    if not path.exists() and len(list(path.parent.glob("*.json"))) >= MAX_GROUPS:
        raise LimitExceededError(f"{MAX_GROUPS} lab groups are defined, the most kept: remove one first")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, json.dumps(group, indent=2, default=str))
    return parsed


def available_memory_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Labs:
    def __init__(
        self,
        state_dir: Path,
        publish: Publish,
        stop: Stop,
        points: Points,
        max_running: int = 2,
        nfs_host: str | None = None,
        space: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """``space``: the write cache's ``{path, free, min_free}`` (the session manager's check_space), so a lab
        whose sandboxes may need more than is left above the minimum is refused before it starts."""
        self.dir = Path(state_dir) / "labs"
        self.groups_dir = Path(state_dir) / "lab-groups"
        self.scripts_dir = Path(state_dir) / "lab-scripts"
        for d in (self.dir, self.groups_dir, self.scripts_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._publish, self._stop, self._points = publish, stop, points
        self.max_running, self.nfs_host, self._space = max_running, nfs_host, space
        # Namespaces are named after this state directory too: a second appliance on the host (a test's)
        # never removes this one's labs as stale.
        self.owner = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:6]
        self._lock = threading.Lock()
        self.records: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, LabRun] = {}
        self._closed = threading.Event()
        self._recover()
        self.schedule = ScheduleState(Path(state_dir) / "lab-schedule.json")
        threading.Thread(target=self._expire_loop, daemon=True, name="lab-ttl").start()
        threading.Thread(target=self._schedule_loop, daemon=True, name="lab-schedule").start()

    # --- groups -----------------------------------------------------------------------------------------
    def define(self, group: dict[str, Any]) -> dict[str, Any]:
        """Keep a group (the API's or a file's document) under its name; replaces one of the same name."""
        return save_group(self.groups_dir, group).as_json()

    def groups(self) -> list[dict[str, Any]]:
        """The defined groups; a scheduled one with its ``next_run`` (ISO time)."""
        out = []
        for path in sorted(self.groups_dir.glob("*.json")):
            try:
                doc = parse_group(json.loads(path.read_text())).as_json()
            except (OSError, ValueError, UsageError) as exc:
                out.append({"name": path.stem, "error": str(exc)})
                continue
            if doc["schedule"]:
                since = self.schedule.last.get(doc["name"]) or datetime.now().astimezone()
                doc["next_run"] = next_run(doc["schedule"], since).isoformat(timespec="seconds")
            out.append(doc)
        return out

    def remove_group(self, name: str) -> dict[str, Any]:
        path = self._group_path(name)
        path.unlink()
        return {"name": name, "removed": True}

    def _group_path(self, name: str) -> Path:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise UsageError(f"group name: letters, digits, '.', '_' and '-', got {name!r}")
        path = self.groups_dir / f"{name}.json"
        if not path.exists():
            known = ", ".join(p.stem for p in sorted(self.groups_dir.glob("*.json"))) or "none"
            raise SessionNotFoundError(f"no lab group {name!r} (defined: {known})")
        return path

    def _group(self, group: str | dict[str, Any]) -> tuple[Group, dict[str, Any]]:
        if isinstance(group, dict):
            return parse_group(group), group
        doc = json.loads(self._group_path(group).read_text())
        return parse_group(doc), doc

    def _check_scripts(self, group: Group) -> None:
        """A script check runs a program as the daemon's user (root): only programs the operator put in
        STATE/lab-scripts/ (not through a symlink out of it), never any path a group names."""
        root = self.scripts_dir.resolve()
        for vm in group.vms:
            for check in vm.checks:
                if check.type != "script":
                    continue
                program = Path(check.script[0])
                real = program.resolve()
                if real.parent != root or not real.is_file() or not os.access(real, os.X_OK):
                    raise UsageError(
                        f"vm {vm.vm}: script {str(program)!r} is not an executable file in {root} "
                        "(lab scripts run as the appliance's user, so only from there)"
                    )

    # --- labs -------------------------------------------------------------------------------------------
    def verify(self, group: str | dict[str, Any]) -> dict[str, Any]:
        """Start verifying a group (a defined group's name, or a group document); poll ``get`` for the result."""
        return self._launch(group, kind="verification", ttl=None)

    def start(self, group: str | dict[str, Any], ttl: str | int = "4h") -> dict[str, Any]:
        """Start a sandbox lab of a group that runs until ``stop`` or its TTL."""
        return self._launch(group, kind="sandbox", ttl=parse_ttl(ttl))

    def _launch(
        self, group_ref: str | dict[str, Any], kind: str, ttl: timedelta | None, trigger: str = "request"
    ) -> dict[str, Any]:
        group, doc = self._group(group_ref)
        self._check_scripts(group)
        need = sum(v.memory_mib + QEMU_OVERHEAD_MIB for v in group.vms)
        lab_id = uuid.uuid4().hex[:12]
        with self._lock:
            live = [r for r in self.records.values() if r["state"] in LIVE]
            if len(live) >= self.max_running:
                raise LimitExceededError(
                    f"{len(live)} labs are running, the most this appliance runs at once (--max-verifications): "
                    "stop one or try again when one finishes"
                )
            free = available_memory_mib()
            if need + MEMORY_MARGIN_MIB > free:
                raise LimitExceededError(
                    f"lab {group.name}: its guests need {need} MiB, the host has {free} MiB available "
                    f"(and keeps {MEMORY_MARGIN_MIB} MiB for itself)"
                )
            self._check_cache_space(group, live)
            record = {
                "id": lab_id,
                "group": group.name,
                "kind": kind,
                "trigger": trigger,  # "request" (CLI, API) or "schedule" (the group's own)
                "state": "verifying" if kind == "verification" else "starting",
                "started": _now(),
                "finished": None,
                "expires": (datetime.now(UTC) + ttl).isoformat(timespec="seconds") if ttl else None,
                "definition": doc,
                "cache_mib": sum(v.cache_mib for v in group.vms),  # reserved while the lab is live
                "report": None,
                "error": None,
            }
            workdir = self.dir / lab_id
            workdir.mkdir(mode=0o700)
            run = LabRun(
                f"{self.owner}-{lab_id}",
                group,
                workdir,
                self._publish,
                self._stop,
                self._points,
                self._progress(record),
                self.nfs_host,
            )
            record["report"] = _copy(run.report)
            self.records[lab_id] = record
            self.runs[lab_id] = run
            self._save(record)
            started = _copy(record)
        threading.Thread(target=self._run, args=(record, run), daemon=True, name=f"lab-{lab_id}").start()
        return started

    def _check_cache_space(self, group: Group, live: list[dict[str, Any]]) -> None:
        """Refuse a lab whose sandboxes may write more than the write cache has above its minimum, less what
        the labs already running reserved (their guests may still write it)."""
        if self._space is None:
            return
        cache = self._space()
        reserved = sum(r.get("cache_mib") or 0 for r in live)
        spare = max(0, (cache["free"] - cache["min_free"]) >> 20) - reserved
        want = sum(v.cache_mib for v in group.vms)
        if want > spare:
            raise LimitExceededError(
                f"lab {group.name}: its sandboxes may write {want} MiB (cache_mib), the write cache at "
                f"{cache['path']} has {max(0, spare)} MiB left above its minimum of {cache['min_free'] >> 20} MiB"
                + (f" and {reserved} MiB reserved by running labs" if reserved else "")
            )

    def _progress(self, record: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
        def saved(report: dict[str, Any]) -> None:
            snapshot = _copy(report)  # the runner goes on changing its report; readers get this copy
            with self._lock:
                record["report"] = snapshot
                self._save(record)

        return saved

    def _run(self, record: dict[str, Any], run: LabRun) -> None:
        verification = record["kind"] == "verification"
        fields: dict[str, Any] = {}
        try:
            report = run.run()
            fields["report"] = _copy(report)
            state = ("passed" if report["ok"] else "failed") if verification else "running"
        except Exception as exc:  # noqa: BLE001 - reported on the lab: no qemu, no namespace rights, ...
            log.exception("lab %s failed", record["id"])
            state, fields["error"] = "error", str(exc)
        if verification or state == "error":
            self._finish(record["id"], state, **fields)  # the verdict is published once the lab is gone
        else:
            with self._lock:
                if record["state"] == "starting":  # not stopped meanwhile
                    record.update(state=state, **fields)
                    self._save(record)
        log.info("lab %s (%s, %s): %s", record["id"], record["group"], record["kind"], record["state"])

    def _finish(self, lab_id: str, state: str, **fields: Any) -> None:
        """Close the lab (guests, sandboxes, network), then record its end; a lab already ended keeps its end."""
        with self._lock:
            run = self.runs.pop(lab_id, None)
        if run is None:
            return
        run.close()
        with self._lock:
            record = self.records[lab_id]
            record.update(state=state, finished=_now(), **fields)
            self._save(record)
            self._prune()

    def stop(self, id: str) -> dict[str, Any]:  # noqa: A002 - the API's field name
        record = self.get(id)
        if record["state"] not in LIVE:
            return record
        self._finish(record["id"], "stopped")
        return self.get(id)

    def get(self, id: str) -> dict[str, Any]:  # noqa: A002
        with self._lock:
            record = self.records.get(id) if isinstance(id, str) else None
            if record is None:
                raise SessionNotFoundError(f"no lab {id!r}")
            return _copy(record)

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            records = sorted(self.records.values(), key=lambda r: r["started"], reverse=True)
            return [_copy(r) for r in records]

    def metrics(self) -> dict[str, Any]:
        """What the Prometheus metrics show: labs running, and per group its last finished verification (1
        passed, 0 failed or could not run) and when it finished (Unix time)."""
        groups: dict[str, dict[str, Any]] = {}
        with self._lock:
            running = sum(r["state"] in LIVE for r in self.records.values())
            done = [r for r in self.records.values() if r["kind"] == "verification" and r["state"] in VERDICTS]
        for r in sorted(done, key=lambda r: r["finished"] or ""):
            finished = datetime.fromisoformat(r["finished"]).timestamp() if r["finished"] else None
            groups[r["group"]] = {"passed": int(r["state"] == "passed"), "finished": finished, "lab": r["id"]}
        return {"running": running, "groups": groups}

    def ops(self) -> dict[str, Callable[..., Any]]:
        """The daemon's control operations for labs."""
        return {
            "lab_define": self.define,
            "lab_groups": self.groups,
            "lab_group_remove": self.remove_group,
            "lab_verify": self.verify,
            "lab_start": self.start,
            "lab_stop": self.stop,
            "lab_list": self.list,
            "lab": self.get,
        }

    def close(self) -> None:
        """The daemon stops: every lab's guests, sandboxes and network go (a sandbox keeps nothing)."""
        self._closed.set()
        for lab_id in list(self.runs):
            self._finish(lab_id, "stopped")

    def _schedule_loop(self, every: float = 5.0) -> None:
        """One thread for every group's schedule: a due group's verification is started like a requested one
        (so never more labs than ``max_running``; a due group waits while that limit is reached)."""
        while not self._closed.wait(every):
            try:
                self._run_due(datetime.now().astimezone())
            except Exception:  # noqa: BLE001 - the next tick tries again; the loop must not die
                log.exception("lab schedule")

    def _run_due(self, now: datetime) -> None:
        schedules = {}
        for doc in self.groups():
            if doc.get("schedule"):
                schedules[doc["name"]] = doc["schedule"]
        for name in self.schedule.due(schedules, now):
            with self._lock:
                busy = any(r["group"] == name and r["state"] in LIVE for r in self.records.values())
            if busy:
                log.info("lab group %s: scheduled run skipped, its previous lab still runs", name)
                self.schedule.done(name, now)
                continue
            try:
                record = self._launch(name, kind="verification", ttl=None, trigger="schedule")
            except LimitExceededError as exc:
                log.info("lab group %s: scheduled run waits: %s", name, exc)
                continue  # still due at the next tick
            except Exception as exc:  # noqa: BLE001 - a bad group must not stop the others' schedules
                log.warning("lab group %s: scheduled run not started: %s", name, exc)
            else:
                log.info("lab group %s: scheduled verification %s started", name, record["id"])
            self.schedule.done(name, now)

    def _expire_loop(self, every: float = 5.0) -> None:
        while not self._closed.wait(every):
            now = _now()
            with self._lock:
                expired = [
                    r["id"] for r in self.records.values() if r["state"] in LIVE and (r["expires"] or "~") <= now
                ]
            for lab_id in expired:
                log.info("lab %s reached its TTL", lab_id)
                self._finish(lab_id, "expired")

    # --- records ----------------------------------------------------------------------------------------
    def _save(self, record: dict[str, Any]) -> None:
        write_atomic(self.dir / record["id"] / "lab.json", json.dumps(record, indent=2, default=str))

    def _prune(self) -> None:
        done = sorted((r for r in self.records.values() if r["state"] not in LIVE), key=lambda r: r["started"])
        for record in done[:-KEEP]:
            self.records.pop(record["id"], None)
            shutil.rmtree(self.dir / record["id"], ignore_errors=True)

    def _recover(self) -> None:
        """After a restart: labs that were live are over (their guests were this daemon's children, their
        sandboxes are gone with the restart); kill any qemu of theirs still running and remove their networks."""
        for path in sorted(self.dir.glob("*/lab.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if record.get("state") in LIVE:
                for vm in (record.get("report") or {}).get("vms", []):
                    _kill_stale(vm.get("pid"), path.parent)
                record.update(state="error", error="the appliance restarted while this lab ran", finished=_now())
                self._save(record)
            self.records[record["id"]] = record
        for name in namespaces():
            if name.startswith(f"{PREFIX}{self.owner}-"):
                log.info("removing the stale lab network %s", name)
                LabNetwork(name.removeprefix(PREFIX), "10.0.0.0/30", self.dir).destroy()


def _copy(doc: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(doc, default=str))


def _kill_stale(pid: object, workdir: Path) -> None:
    """Kill ``pid`` only if it is a qemu of this lab (its command line names the lab's directory)."""
    if not isinstance(pid, int):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"qemu-system" in cmdline and str(workdir).encode() in cmdline:
        try:
            os.kill(pid, 9)
            time.sleep(0.1)
        except ProcessLookupError:
            pass
