"""When a group's scheduled verification is due: its ``schedule`` is five cron fields (minute hour day month
weekday, in the appliance's time zone), parsed and stepped by croniter rather than a parser of our own (ranges,
steps, names and the day-of-month/weekday rule are easy to get subtly wrong).

What has been considered is kept in STATE/lab-schedule.json (group -> the time it was last looked at), so after
the daemon was down, a group whose run fell in the gap runs once, not once per missed time; a group seen for the
first time (just defined) waits for its next time rather than catching up on earlier ones.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path

from croniter import croniter

from appliance.atomicfile import write_atomic
from appliance.errors import UsageError

log = logging.getLogger("bootback.lab")


def check_schedule(value: object) -> str:
    """A valid five-field cron expression, or a UsageError naming the value."""
    if not isinstance(value, str) or len(value.split()) != 5 or not croniter.is_valid(value):
        raise UsageError(
            f"group schedule: five cron fields (minute hour day month weekday) such as '0 3 * * *', got {value!r}"
        )
    return " ".join(value.split())


def next_run(schedule: str, after: datetime) -> datetime:
    """The first time strictly after ``after`` that ``schedule`` names."""
    return croniter(schedule, after).get_next(datetime)


class ScheduleState:
    """The last time each scheduled group was considered, kept in a file across restarts."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.last: dict[str, datetime] = {}
        try:
            for name, when in json.loads(self.path.read_text()).items():
                self.last[name] = datetime.fromisoformat(when)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("lab schedule state %s unreadable (%s): scheduled groups wait for their next time", path, exc)

    def due(self, schedules: dict[str, str], now: datetime) -> list[str]:
        """The groups whose next time since they were last considered has come. A group first seen starts
        counting from ``now``; groups no longer scheduled are forgotten."""
        changed = False
        for name in list(self.last):
            if name not in schedules:
                del self.last[name]
                changed = True
        due = []
        for name, schedule in sorted(schedules.items()):
            if name not in self.last:
                self.last[name] = now
                changed = True
            elif next_run(schedule, self.last[name]) <= now:
                due.append(name)
        if changed:
            self._save()
        return due

    def done(self, name: str, now: datetime) -> None:
        """``name`` was run (or deliberately skipped) at ``now``: its missed times up to now are spent."""
        self.last[name] = now
        self._save()

    def _save(self) -> None:
        write_atomic(self.path, json.dumps({k: v.isoformat() for k, v in self.last.items()}, indent=2))
