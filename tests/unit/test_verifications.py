"""Verification jobs without a guest: their records, their errors, and what a restart leaves of them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from appliance.errors import SessionNotFoundError, UsageError
from appliance.verification import Verifications


def wait_done(v: Verifications, job_id: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = v.get(job_id)
        if job["state"] != "running":
            return job
        time.sleep(0.05)
    raise AssertionError("the job did not finish")


def test_a_failed_publish_is_the_jobs_error_and_the_record_survives_a_restart(tmp_path: Path) -> None:
    stopped: list[str] = []

    def publish(**kw: object) -> list[dict]:
        raise UsageError(f"no restore point of {kw['vm']}")

    v = Verifications(tmp_path, publish, lambda **kw: stopped.append(kw["id"]))
    job = v.start("web01@2026-01-01", expect="login:")
    assert job["state"] == "running" and job["point"] == "2026-01-01"
    done = wait_done(v, job["id"])
    assert done["state"] == "error" and "no restore point of web01" in done["error"] and done["finished"]
    assert stopped == [], "nothing was published, so nothing is stopped"

    again = Verifications(tmp_path, publish, lambda **kw: None)
    assert again.get(job["id"])["error"] == done["error"]


def test_a_job_cut_off_by_a_restart_says_so(tmp_path: Path) -> None:
    (tmp_path / "verifications").mkdir()
    record = {"id": "abc123", "vm": "db01", "point": "latest", "state": "running", "started": "2026-11-25T10:00:00"}
    (tmp_path / "verifications" / "abc123.json").write_text(json.dumps(record))
    (tmp_path / "verifications" / "broken.json").write_text("{not json")
    v = Verifications(tmp_path, lambda **kw: [], lambda **kw: None)
    job = v.get("abc123")
    assert job["state"] == "error" and "restarted" in job["error"]
    assert [j["id"] for j in v.list()] == ["abc123"]
    with pytest.raises(SessionNotFoundError, match="no verification 'zzz'"):
        v.get("zzz")


def test_bad_requests_are_refused_before_a_job_starts(tmp_path: Path) -> None:
    v = Verifications(tmp_path, lambda **kw: [], lambda **kw: None)
    for kwargs, message in [
        ({"expect": "(open"}, "not a regular expression"),
        ({"timeout": 1}, "timeout"),
        ({"memory_mib": 16}, "memory_mib"),
    ]:
        with pytest.raises(UsageError, match=message):
            v.start("web01", **kwargs)
    assert v.list() == []
