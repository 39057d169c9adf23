"""A lab group's VM names follow the repository's rule (appliance.repo.manifest.check_vm_name), checked where the
group is parsed: one line naming the field, not a refusal from the daemon later."""

from __future__ import annotations

import pytest

from appliance.errors import UsageError
from appliance.lab.group import parse_group


@pytest.mark.parametrize("name", ["../etc", "a b", "-db", "db/01", "x" * 129, ".hidden", "db\n01"])
def test_a_vm_name_the_repository_would_refuse_is_refused_naming_the_field(name: str) -> None:
    doc = {"name": "shop", "vms": [{"vm": "db"}, {"vm": name}]}
    with pytest.raises(UsageError) as info:
        parse_group(doc)
    message = str(info.value)
    assert message.startswith("vms[1].vm: invalid VM name ") and repr(name) in message, message
    assert "\n" not in message.replace(repr(name), "")


def test_names_the_repository_accepts_are_kept() -> None:
    group = parse_group({"name": "shop", "vms": [{"vm": "db01.example_x-1"}, {"vm": "9app"}]})
    assert [v.vm for v in group.vms] == ["db01.example_x-1", "9app"]
