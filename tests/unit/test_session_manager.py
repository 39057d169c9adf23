"""SessionManager on a real repository and datastore backend: publish, stop, and restore by a new manager on
the same state directory (what a daemon restart does); slots are never reused; the session cap refuses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.datastore.backend import DatastoreBackend
from appliance.errors import LimitExceededError, SessionNotFoundError
from appliance.repo import Repository
from appliance.sessions.manager import SessionManager
from tests.daemon_process import bootback


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("sm")
    (base / "app01.raw").write_bytes(os.urandom(1 << 20))
    bootback("init", base / "repo")
    bootback("backup", base / "repo", "--vm", "app01", base / "app01.raw")
    return base / "repo"


def manager(repo: Path, state: Path, **kw) -> SessionManager:  # noqa: ANN003
    return SessionManager(
        state, {"repo": Repository.open(repo)}, DatastoreBackend(state / "ds"), min_free_bytes=0, **kw
    )


def test_instant_sessions_survive_a_new_manager_and_sandboxes_do_not(repo: Path, tmp_path: Path) -> None:
    first = manager(repo, tmp_path)
    instant, sandbox = first.publish("app01", mode="instant"), first.publish("app01", mode="sandbox")
    vmx = (Path(instant.cache_dir) / "files" / "app01.vmx").read_text()
    assert 'displayName = "app01 (bootback instant recovery ' in vmx and "app01.vmdk" in vmx
    first.flush()
    second = manager(repo, tmp_path)
    second.restore()
    assert second.get(instant.id).folder == instant.folder and second.get(instant.id).slot == instant.slot
    with pytest.raises(SessionNotFoundError):
        second.get(sandbox.id)
    assert not Path(sandbox.cache_dir).exists()
    again = second.publish("app01", mode="sandbox")
    assert again.slot > max(instant.slot, sandbox.slot)  # a slot is never handed out twice
    second.stop(instant.id)
    assert not Path(instant.cache_dir).exists()
    third = manager(repo, tmp_path)
    third.restore()
    with pytest.raises(SessionNotFoundError):
        third.get(instant.id)


def test_the_session_cap_refuses_and_leaves_nothing_behind(repo: Path, tmp_path: Path) -> None:
    m = manager(repo, tmp_path, max_sessions=1)
    m.publish("app01", mode="sandbox")
    before = sorted(p.name for p in (tmp_path / "cache").iterdir())
    with pytest.raises(LimitExceededError, match="at most 1 run at once"):
        m.publish("app01", mode="sandbox")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == before


def test_a_session_is_named_whole_or_by_a_prefix_long_enough(repo: Path, tmp_path: Path) -> None:
    m = manager(repo, tmp_path)
    only = m.publish("app01", mode="sandbox")
    for short in ("", only.id[:1], only.id[:3]):  # would have matched the only session
        with pytest.raises(SessionNotFoundError, match="at least 4 characters"):
            m.stop(short)
    assert m.get(only.id[:4]).id == only.id and m.get(only.folder).id == only.id
    assert m.stop(only.id[:8]).id == only.id
