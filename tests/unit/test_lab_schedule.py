"""Lab schedules: five cron fields checked once with the value named; due times across a daemon's downtime run
once, not once per missed time; a group just defined waits for its next time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.errors import UsageError
from appliance.lab.group import parse_group
from appliance.lab.schedule import ScheduleState, next_run

GROUP = {"name": "nightly", "schedule": "0 3 * * *", "vms": [{"vm": "db"}]}


def test_a_schedule_is_kept_in_the_group_and_steps_to_its_next_time() -> None:
    group = parse_group(GROUP)
    assert group.schedule == "0 3 * * *" and group.as_json()["schedule"] == "0 3 * * *"
    assert parse_group({**GROUP, "schedule": None}).schedule is None
    t = datetime(2026, 5, 1, 3, 0, tzinfo=UTC)
    assert next_run("0 3 * * *", t) == t + timedelta(days=1)  # strictly after
    assert next_run("*/15 * * * 1-5", datetime(2026, 5, 2, 12, 1, tzinfo=UTC)) == datetime(2026, 5, 4, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize("bad", ["0 3 * *", "0 3 * * * *", "61 * * * *", "@daily", "0 3 * * mon-funday", "", 5, True])
def test_a_bad_schedule_is_one_error_naming_it(bad: object) -> None:
    with pytest.raises(UsageError) as err:
        parse_group({**GROUP, "schedule": bad})
    assert str(err.value).count("\n") == 0 and repr(bad) in str(err.value), err.value
    assert "five cron fields" in str(err.value)


def test_missed_runs_while_down_run_once_and_a_new_group_waits(tmp_path: Path) -> None:
    path = tmp_path / "lab-schedule.json"
    monday = datetime(2026, 5, 4, 2, 0, tzinfo=UTC)
    state = ScheduleState(path)
    assert state.due({"nightly": "0 3 * * *"}, monday) == []  # first seen: no catching up on earlier times
    assert state.due({"nightly": "0 3 * * *"}, monday + timedelta(minutes=59)) == []
    at_three = monday + timedelta(hours=1)
    assert state.due({"nightly": "0 3 * * *"}, at_three) == ["nightly"]
    state.done("nightly", at_three)
    assert state.due({"nightly": "0 3 * * *"}, at_three + timedelta(minutes=5)) == []
    # the daemon is down for three days (three 03:00 times missed); a new process reads the kept state
    later = at_three + timedelta(days=3, hours=2)
    restarted = ScheduleState(path)
    assert restarted.due({"nightly": "0 3 * * *"}, later) == ["nightly"]
    restarted.done("nightly", later)
    assert restarted.due({"nightly": "0 3 * * *"}, later + timedelta(seconds=5)) == []
    assert ScheduleState(path).due({"nightly": "0 3 * * *"}, later + timedelta(hours=20)) == []
    assert ScheduleState(path).due({"nightly": "0 3 * * *"}, later + timedelta(hours=22)) == ["nightly"]
    # a group no longer scheduled is forgotten: scheduled again, it waits for its next time
    assert restarted.due({}, later) == []
    assert restarted.due({"nightly": "0 3 * * *"}, later + timedelta(days=9)) == []


def test_an_unreadable_state_file_means_waiting_not_a_burst(tmp_path: Path) -> None:
    path = tmp_path / "lab-schedule.json"
    path.write_text("{not json")
    assert ScheduleState(path).due({"nightly": "* * * * *"}, datetime(2026, 5, 4, tzinfo=UTC)) == []
