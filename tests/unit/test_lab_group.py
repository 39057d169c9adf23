"""Application group definitions: what people write is checked once, and a bad value is named in one line."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.errors import RestorePointNotFoundError, UsageError
from appliance.lab.group import load_file, parse_group
from appliance.lab.runner import point_at
from appliance.lab.service import parse_ttl

GOOD = """
name: shop
at: 2026-05-01T03:00:00Z
vms:
  - vm: db
    address: 10.0.0.10
    checks:
      - {type: console, expect: "db ready", timeout: 60}
      - {type: tcp, port: 5432}
  - vm: app
    checks:
      - {type: http, path: /status, text: "db: reachable"}
      - {type: script, script: [/usr/local/bin/check-app, --fast]}
      - {type: screenshot}
"""


def test_a_group_file_in_order_with_addresses_and_checks(tmp_path: Path) -> None:
    path = tmp_path / "shop.yaml"
    path.write_text(GOOD)
    group = parse_group(load_file(path))
    assert [v.vm for v in group.vms] == ["db", "app"]
    assert group.at == datetime(2026, 5, 1, 3, tzinfo=UTC)
    db, app = group.vms
    assert (db.address, app.address) == ("10.0.0.10", "10.0.0.11")  # the next free one from .10
    assert db.mac != app.mac
    assert [c.type for c in app.checks] == ["http", "script", "screenshot"]
    assert (app.checks[0].port, app.checks[0].status, db.checks[1].port) == (80, 200, 5432)
    assert app.checks[1].script == ["/usr/local/bin/check-app", "--fast"]


@pytest.mark.parametrize(
    ("doc", "named"),
    [
        ({"name": "../x", "vms": [{"vm": "a"}]}, "'../x'"),
        ({"name": "g", "vms": []}, "vms"),
        ({"name": "g", "vms": [{"vm": "a", "colour": 1}]}, "'colour'"),
        ({"name": "g", "vms": [{"vm": "a"}, {"vm": "a"}]}, "named twice"),
        ({"name": "g", "network": "10.0.0.0/8", "vms": [{"vm": "a"}]}, "'10.0.0.0/8'"),
        ({"name": "g", "vms": [{"vm": "a", "address": "192.168.1.5"}]}, "10.0.0.0/24"),
        ({"name": "g", "vms": [{"vm": "a", "address": "10.0.0.1"}]}, "other than 10.0.0.1"),
        ({"name": "g", "vms": [{"vm": "a", "memory_mib": 64}]}, "64"),
        ({"name": "g", "vms": [{"vm": "a", "nic": "ne2k"}]}, "'ne2k'"),
        ({"name": "g", "vms": [{"vm": "a", "checks": [{"type": "dns"}]}]}, "'dns'"),
        ({"name": "g", "vms": [{"vm": "a", "checks": [{"type": "tcp"}]}]}, "'port'"),
        ({"name": "g", "vms": [{"vm": "a", "checks": [{"type": "tcp", "port": 70000}]}]}, "70000"),
        ({"name": "g", "vms": [{"vm": "a", "checks": [{"type": "ping", "timeout": 0}]}]}, "timeout"),
        ({"name": "g", "vms": [{"vm": "a", "checks": [{"type": "console", "expect": "(a"}]}]}, "'(a'"),
        ({"name": "g", "vms": [{"vm": "a", "checks": [{"type": "http", "path": "no-slash"}]}]}, "'no-slash'"),
        ({"name": "g", "vms": [{"vm": "a", "checks": [{"type": "script", "script": "rel/x"}]}]}, "'rel/x'"),
        ({"name": "g", "at": "yesterday", "vms": [{"vm": "a"}]}, "'yesterday'"),
        ({"name": "g", "at": "2026-05-01T03:00:00", "vms": [{"vm": "a"}]}, "zone"),
        ({"name": "g", "at": "2026-05-01T03:00:00Z", "vms": [{"vm": "a", "point": "x"}]}, "keep one"),
    ],
)
def test_bad_groups_are_refused_naming_the_value(doc: dict, named: str) -> None:
    with pytest.raises(UsageError) as exc:
        parse_group(doc)
    assert named in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


def test_bad_files_are_one_line(tmp_path: Path) -> None:
    for text, named in (("- a list", "a mapping"), ("name: [unclosed", "not YAML"), ("x" * (300 << 10), "larger")):
        path = tmp_path / "g.yaml"
        path.write_text(text)
        with pytest.raises(UsageError, match=named):
            load_file(path)
    with pytest.raises(UsageError, match="missing.yaml"):
        load_file(tmp_path / "missing.yaml")


def test_the_point_at_a_time_is_the_newest_at_or_before_it() -> None:
    t0 = datetime(2026, 5, 1, tzinfo=UTC)
    points = [
        {"vm": "db", "id": "p1", "time": t0.isoformat()},
        {"vm": "db", "id": "p2", "time": (t0 + timedelta(hours=1)).isoformat()},
        {"vm": "db", "id": "bad", "damaged": True},
        {"vm": "db", "id": "p3", "time": (t0 + timedelta(hours=2)).isoformat()},
    ]
    assert point_at(points, "db", t0 + timedelta(minutes=90)) == "p2"
    assert point_at(points, "db", t0 + timedelta(hours=3)) == "p3"
    with pytest.raises(RestorePointNotFoundError, match="at or before"):
        point_at(points, "db", t0 - timedelta(seconds=1))


def test_ttl() -> None:
    assert parse_ttl("4h") == timedelta(hours=4)
    assert parse_ttl("90m") == timedelta(minutes=90)
    assert parse_ttl(3600) == timedelta(hours=1)
    for bad in ("0", "10s", "8d", "4 hours", "-1h", True):
        with pytest.raises(UsageError, match="ttl"):
            parse_ttl(bad)


def test_the_daemons_lab_operations_refuse_bad_requests_before_anything_starts(tmp_path: Path) -> None:
    from appliance.errors import LimitExceededError, SessionNotFoundError
    from appliance.lab.service import Labs

    def never(**_: object) -> list:
        raise AssertionError("nothing may be published for a refused request")

    labs = Labs(tmp_path, never, never, never)
    try:
        with pytest.raises(UsageError, match="123"):
            labs.verify(123)
        with pytest.raises(UsageError, match="'../etc'"):
            labs.start("../etc")
        with pytest.raises(SessionNotFoundError, match="'nope'.*defined: none"):
            labs.start("nope")
        with pytest.raises(UsageError, match="'forever'"):
            labs.start({"name": "g", "vms": [{"vm": "a"}]}, ttl="forever")
        with pytest.raises(UsageError, match="'../x'"):
            labs.define({"name": "../x", "vms": [{"vm": "a"}]})
        with pytest.raises(SessionNotFoundError):
            labs.get(5)
        huge = {"name": "huge", "vms": [{"vm": f"v{i}", "memory_mib": 8192} for i in range(16)]}
        with pytest.raises(LimitExceededError, match="need 132096 MiB"):
            labs.verify(huge)
        assert labs.list() == [] and list((tmp_path / "labs").iterdir()) == []
        assert labs.define({"name": "g", "vms": [{"vm": "a"}]})["name"] == "g"
        assert [g["name"] for g in labs.groups()] == ["g"]
    finally:
        labs.close()
