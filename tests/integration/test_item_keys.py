"""Item recovery on encrypted repositories: ``bootback items`` takes ``--key-file`` (and ``BOOTBACK_PASSPHRASE``,
``BOOTBACK_KEY_FILE``) like every command that opens a repository, and the key reaches the FUSE process that
serves the copy-on-write view (a mail listing reads through it). A wrong or missing key is the one clear line
of every repository command (exit 17), before any view is made."""

from __future__ import annotations

import json
import mailbox
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.item_space import small_reserve  # noqa: F401 (autouse: a reserve this machine has)
from tests.integration.test_encrypted_repo_cli import run

PASS = "items passphrase"


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    base = tmp_path_factory.mktemp("items-keys")
    tree = base / "tree"
    (tree / "home/ann").mkdir(parents=True)
    md = mailbox.Maildir(tree / "home/ann/Maildir", create=True)
    md.add(b"From: carol@example.org\nSubject: Encrypted hello\n\nsealed at rest\n")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", tree, base / "mail.raw", "8M"], check=True, capture_output=True)
    repo, key = base / "repo", base / "repo.key"
    run("init", repo, "--encryption", "aes-256-gcm", "--chunk-size", "256K", "--key-file", key)
    run("backup", repo, "--vm", "mail01", base / "mail.raw", "--key-file", key)
    other = base / "other"
    run("init", other, "--encryption", "aes-256-gcm", "--key-file", base / "other.key")
    work = Path(tempfile.mkdtemp(prefix="bb-items-keys-", dir="/var/tmp"))
    try:
        yield {"repo": repo, "key": key, "other_key": base / "other.key", "work": work}
        assert os.listdir(work) == [], "a view was left behind"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_items_open_an_encrypted_repository_with_a_key_file_or_the_passphrase(encrypted: dict) -> None:
    repo, key, work = encrypted["repo"], encrypted["key"], encrypted["work"]
    found = json.loads(run("items", repo, "mail01", "--key-file", key, "--json").stdout)
    assert [(i["kind"], i["path"]) for i in found] == [("maildir", "/home/ann/Maildir")]
    listed = run("items", repo, "mail01", "maildir", "--list", "--json", "--key-file", key, "--work-dir", work)
    assert [m["subject"] for m in json.loads(listed.stdout)] == ["Encrypted hello"]  # read through the FUSE view

    run("key", "import", repo, key, BOOTBACK_PASSPHRASE=PASS)  # now also unlocked by a passphrase
    by_env = run("items", repo, "mail01", "maildir", "--list", "--json", "--work-dir", work, BOOTBACK_PASSPHRASE=PASS)
    assert [m["subject"] for m in json.loads(by_env.stdout)] == ["Encrypted hello"]


@pytest.mark.parametrize(
    "how, message",
    [
        ("other key file", "no key file given is for this repository"),
        ("wrong passphrase", "wrong passphrase"),
        ("nothing", "encrypted"),
    ],
)
def test_a_wrong_or_missing_key_is_one_clear_line(encrypted: dict, how: str, message: str) -> None:
    args: list = ["items", encrypted["repo"], "mail01", "maildir", "--list", "--work-dir", encrypted["work"]]
    env = {}
    if how == "other key file":
        args += ["--key-file", encrypted["other_key"]]
    elif how == "wrong passphrase":
        env["BOOTBACK_PASSPHRASE"] = "not it"
    p = run(*args, ok=False, **env)
    assert p.returncode == 17 and message in p.stderr.lower(), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_the_key_reaches_the_fuse_process_of_the_view(encrypted: dict) -> None:
    """``items`` falls back to copying when the FUSE view cannot start: this asks for FUSE only."""
    from appliance.items.cowview import CowView
    from appliance.items.service import Target
    from appliance.repo.keys import KeySource

    target = Target.resolve(encrypted["repo"], "mail01", KeySource((encrypted["key"],)))
    owner = (os.getuid(), os.getgid())
    root = "/disk/home/ann/Maildir"
    with CowView(
        target.repo, target.point, "mail.raw", root, encrypted["work"], owner, mode="fuse", keys=target.keys
    ) as data:
        (message,) = (data / "new").iterdir()
        assert b"Subject: Encrypted hello" in message.read_bytes()
