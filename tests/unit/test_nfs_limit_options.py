"""`bootback serve --nfs-limit NAME=VALUE`: parsed in one place, a bad name or value refused naming it."""

from __future__ import annotations

import pytest

from nfsd.limits import DEFAULT, parse_limits


def test_settings_apply_over_the_defaults() -> None:
    limits = parse_limits(["max_connections_per_client=4", "idle-timeout=30.5", " total_bytes = 268435456 "])
    assert limits.max_connections_per_client == 4
    assert limits.idle_timeout == 30.5
    assert limits.total_bytes == 256 << 20
    assert limits.max_connections == DEFAULT.max_connections
    assert parse_limits([]) == DEFAULT


@pytest.mark.parametrize(
    ("pair", "named"),
    [
        ("bogus=1", "'bogus=1'"),
        ("max_connections", "'max_connections'"),
        ("max_connections=many", "'many'"),
        ("idle_timeout=-1", "idle_timeout"),
        ("max_connections_per_client=9999", "max_connections_per_client"),
        ("total_bytes=1024", "total_bytes"),
    ],
)
def test_a_bad_setting_is_refused_naming_it(pair: str, named: str) -> None:
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        parse_limits([pair])
