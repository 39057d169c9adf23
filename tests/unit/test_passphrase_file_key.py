"""``BOOTBACK_PASSPHRASE_FILE``: the passphrase from a secret file (a container's secret mount), so it never sits
in the environment that ``docker inspect`` shows; refused in one line when others may read it, empty or missing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from appliance.errors import RepositoryKeyError
from appliance.repo import Repository
from appliance.repo.keys import AES_256_GCM, KeySource


def secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_passphrase_file_opens_the_repository_it_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BOOTBACK_PASSPHRASE", raising=False)
    monkeypatch.setenv("BOOTBACK_PASSPHRASE_FILE", str(secret(tmp_path / "pass", "correct horse\n")))
    source = KeySource.from_env()
    assert source.passphrase == "correct horse"  # the file's final newline is not part of it
    Repository.init(tmp_path / "repo", encryption=AES_256_GCM, key_source=source)
    assert Repository.open(tmp_path / "repo", KeySource.from_env()).key is not None

    monkeypatch.setenv("BOOTBACK_PASSPHRASE_FILE", str(secret(tmp_path / "wrong", "battery staple\n")))
    with pytest.raises(RepositoryKeyError):
        Repository.open(tmp_path / "repo", KeySource.from_env())


@pytest.mark.parametrize(
    ("text", "mode", "message"),
    [
        ("pw\n", 0o644, "is open to other users (mode 0644)"),
        ("\n", 0o600, "is empty"),
        (None, 0o600, "does not exist"),
    ],
    ids=["world-readable", "empty", "missing"],
)
def test_bad_passphrase_file_is_one_clear_error(
    text: str | None, mode: int, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "pass"
    if text is not None:
        secret(path, text, mode)
    monkeypatch.delenv("BOOTBACK_PASSPHRASE", raising=False)
    monkeypatch.setenv("BOOTBACK_PASSPHRASE_FILE", str(path))
    with pytest.raises(RepositoryKeyError, match=rf"passphrase file {re.escape(str(path))} .*{re.escape(message)}"):
        KeySource.from_env()
