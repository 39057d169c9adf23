"""Prometheus text exposition of the appliance's state (GET /api/v1/metrics)."""

from __future__ import annotations

from collections import Counter


def _labels(**kv: str) -> str:
    if not kv:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in kv.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def render_metrics(status: dict, sessions: list[dict], repositories: list[dict]) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{_labels(**labels)} {_number(value)}" for labels, value in samples)

    by_mode = Counter(s["mode"] for s in sessions)
    metric("bootback_up", "gauge", "1 when the daemon answers.", [({}, 1)])
    metric(
        "bootback_sessions",
        "gauge",
        "Published sessions by mode.",
        [({"mode": m}, by_mode.get(m, 0)) for m in ("instant", "sandbox")],
    )
    metric(
        "bootback_session_cache_bytes",
        "gauge",
        "Bytes a session's write cache uses on disk.",
        [({"session": s["id"], "vm": s["vm"], "mode": s["mode"]}, s["cache_used_bytes"]) for s in sessions],
    )
    metric(
        "bootback_session_changed_bytes",
        "gauge",
        "Bytes of a session's disks changed since publish.",
        [({"session": s["id"], "vm": s["vm"]}, s["changed_bytes"]) for s in sessions],
    )
    cache = status["cache"]
    metric(
        "bootback_cache_free_bytes",
        "gauge",
        "Free space where new write caches go.",
        [({"path": cache["path"]}, cache["free"])],
    )
    metric(
        "bootback_cache_size_bytes",
        "gauge",
        "Size of the file system holding the write caches.",
        [({"path": cache["path"]}, cache["total"])],
    )
    metric(
        "bootback_cache_min_free_bytes",
        "gauge",
        "Free space below which new sessions are refused.",
        [({"path": cache["path"]}, cache["min_free"])],
    )
    metric(
        "bootback_cache_low_space",
        "gauge",
        "1 for a write-cache location short of free space.",
        [({"path": path}, 1) for path in status.get("cache_warnings", {})],
    )
    metric(
        "bootback_repository_restore_points",
        "gauge",
        "Restore points in a repository.",
        [({"repository": r["name"]}, r["points"]) for r in repositories],
    )
    clients = status["clients"]
    metric("bootback_nfs_clients", "gauge", "NFS clients connected or mounted.", [({}, len(clients))])
    metric(
        "bootback_nfs_connections",
        "gauge",
        "Open NFS/MOUNT TCP connections.",
        [({}, sum(c.get("connections", 0) for c in clients))],
    )
    metric(
        "bootback_nfs_calls_total",
        "counter",
        "RPC calls served on open connections, per client.",
        [({"client": c["address"]}, c.get("calls", 0)) for c in clients],
    )
    labs = status.get("labs") or {"running": 0, "groups": {}}
    metric(
        "bootback_labs_running", "gauge", "Virtual labs running (verifications and sandboxes).", [({}, labs["running"])]
    )
    groups = labs["groups"]
    metric(
        "bootback_lab_last_result",
        "gauge",
        "1 when a lab group's last verification passed, 0 when it failed.",
        [({"group": g}, v["passed"]) for g, v in sorted(groups.items())],
    )
    metric(
        "bootback_lab_last_run_timestamp_seconds",
        "gauge",
        "When a lab group's last verification finished (Unix time).",
        [({"group": g}, v["finished"]) for g, v in sorted(groups.items()) if v.get("finished") is not None],
    )
    return "\n".join(lines) + "\n"
