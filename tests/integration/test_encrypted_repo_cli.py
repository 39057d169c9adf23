"""Encrypted repositories through the real CLI and daemon (issue 11): init, backup, restore, verify, tampering,
key export/import, a wrong passphrase, and an encrypted restore point published and read over NFS (nfs-cp)."""

from __future__ import annotations

import json
import os
import pty
import random
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard

from appliance.access.credentials import Credentials
from appliance.sessions.control import ControlClient
from tests.daemon_process import ROOT, DaemonProcess
from tests.nfsd_process import PRIVATE_PORTS
from tests.unit.test_web_app import BASE, login
from web import create_app

MARKER = b"bootback-encryption-marker-c41b"
CS = 256 * 1024
PASS = "integration passphrase"


def run(*args: str | Path, ok: bool = True, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("BOOTBACK_PASSPHRASE", "BOOTBACK_KEY_FILE")}
    p = subprocess.run(
        [sys.executable, "-m", "appliance", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**environ, **env},
    )
    if ok and p.returncode != 0:
        raise AssertionError(f"bootback {args} failed ({p.returncode}): {p.stderr}")
    return p


def marked_disk(path: Path) -> bytes:
    """Random chunks, some holding the marker in the clear, and compressible marker runs (zstd would keep one
    copy of the marker)."""
    rnd = random.Random(11)
    data = bytearray(rnd.randbytes(6 * CS + 12345))
    for i in range(0, len(data) - CS, CS):
        data[i + 100 : i + 100 + len(MARKER)] = MARKER
    data[2 * CS : 3 * CS] = (MARKER * (CS // len(MARKER) + 1))[:CS]
    path.write_bytes(bytes(data))
    return bytes(data)


def leaks(root: Path) -> list[str]:
    """Files under ``root`` holding the marker, plainly or in any zstd frame they contain."""
    found = []
    dctx = zstandard.ZstdDecompressor()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        blob = path.read_bytes()
        plain = [blob]
        start = blob.find(b"\x28\xb5\x2f\xfd")
        while start != -1:
            try:
                plain.append(dctx.decompress(blob[start:], max_output_size=4 << 20))
            except zstandard.ZstdError:
                pass
            start = blob.find(b"\x28\xb5\x2f\xfd", start + 1)
        if any(MARKER in p for p in plain):
            found.append(str(path.relative_to(root)))
    return found


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("enc")
    repo = base / "repo"
    p = run("init", repo, "--encryption", "aes-256-gcm", "--chunk-size", "256K", BOOTBACK_PASSPHRASE=PASS)
    assert "encryption aes-256-gcm" in p.stdout
    data = marked_disk(base / "disk.raw")
    run("backup", repo, "--vm", "vm01", base / "disk.raw", BOOTBACK_PASSPHRASE=PASS)
    return {"base": base, "repo": repo, "data": data}


def test_backup_hides_the_disk_and_restores_bit_exact(encrypted: dict, tmp_path: Path) -> None:
    repo, data = encrypted["repo"], encrypted["data"]
    # the check itself works: the same backup into an unencrypted repository shows the marker
    plain = tmp_path / "plain"
    run("init", plain, "--encryption", "none", "--chunk-size", "256K")
    run("backup", plain, "--vm", "vm01", encrypted["base"] / "disk.raw")
    assert leaks(plain)
    assert leaks(repo) == []
    run("restore", repo, "vm01", "-o", tmp_path / "out.raw", BOOTBACK_PASSPHRASE=PASS)
    assert (tmp_path / "out.raw").read_bytes() == data
    p = run("verify", repo, BOOTBACK_PASSPHRASE=PASS)
    assert "repository OK" in p.stdout
    p = run("points", repo, BOOTBACK_PASSPHRASE=PASS)
    assert "encryption aes-256-gcm" in p.stderr and p.stdout.startswith("vm01@")
    assert "encryption none" in run("points", plain).stderr


def test_wrong_or_missing_passphrase_is_one_line(encrypted: dict) -> None:
    repo = encrypted["repo"]
    for command in (("points", repo), ("restore", repo, "vm01", "-o", "/dev/null")):
        p = run(*command, ok=False, BOOTBACK_PASSPHRASE="not it")
        assert (
            p.returncode == 17
            and p.stderr == f"bootback: error: repository {repo}: wrong passphrase (BOOTBACK_PASSPHRASE)\n"
        )
        p = run(*command, ok=False)
        assert p.returncode == 17 and p.stderr.count("\n") == 1 and "is encrypted: set BOOTBACK_PASSPHRASE" in p.stderr
    p = run("init", encrypted["base"] / "unchosen", ok=False, BOOTBACK_ENCRYPTION="")
    assert p.returncode == 2 and "choose the repository's encryption" in p.stderr and p.stderr.count("\n") == 1


def test_tampered_byte_is_detected(encrypted: dict, tmp_path: Path) -> None:
    repo = tmp_path / "copy"
    subprocess.run(["cp", "-a", encrypted["repo"], repo], check=True)
    chunk = sorted((repo / "chunks").rglob("*"))[-1]
    blob = bytearray(chunk.read_bytes())
    blob[len(blob) // 2] ^= 0x04
    chunk.write_bytes(bytes(blob))
    p = run("verify", repo, ok=False, BOOTBACK_PASSPHRASE=PASS)
    assert p.returncode == 1 and "repository DAMAGED" in p.stdout and chunk.name in p.stdout
    p = run("restore", repo, "vm01", "-o", tmp_path / "out.raw", ok=False, BOOTBACK_PASSPHRASE=PASS)
    assert p.returncode == 15 and f"chunk {chunk.name}" in p.stderr and "authentication failed" in p.stderr
    assert not (tmp_path / "out.raw").exists()


def test_key_export_and_import(encrypted: dict, tmp_path: Path) -> None:
    repo = tmp_path / "copy"
    subprocess.run(["cp", "-a", encrypted["repo"], repo], check=True)
    key = tmp_path / "repo.key"
    run("key", "export", repo, key, BOOTBACK_PASSPHRASE=PASS)
    assert key.stat().st_mode & 0o777 == 0o600
    p = run("key", "export", repo, key, ok=False, BOOTBACK_PASSPHRASE=PASS)
    assert p.returncode == 2 and "already exists" in p.stderr
    for command in (("key", "export", repo, repo / "k"), ("init", tmp_path / "new", "--key-file", tmp_path / "new/k")):
        p = run(*command, ok=False, BOOTBACK_PASSPHRASE=PASS)
        assert p.returncode == 2 and "would sit inside the repository it unlocks" in p.stderr, command
    assert not (repo / "k").exists() and not (tmp_path / "new").exists()
    # the key file alone opens the repository
    run("restore", repo, "vm01", "-o", tmp_path / "a.raw", "--key-file", key)
    assert (tmp_path / "a.raw").read_bytes() == encrypted["data"]
    # a lost wrapped key (config.json's "key" damaged) comes back from the key file, with a new passphrase
    config = json.loads((repo / "config.json").read_text())
    config["encryption"]["key"]["wrapped"] = config["encryption"]["key"]["wrapped"][::-1]
    (repo / "config.json").write_text(json.dumps(config))
    assert run("points", repo, ok=False, BOOTBACK_PASSPHRASE=PASS).returncode == 17
    run("key", "import", repo, key, BOOTBACK_PASSPHRASE="a new passphrase")
    assert run("points", repo, ok=False, BOOTBACK_PASSPHRASE=PASS).returncode == 17
    run("restore", repo, "vm01", "-o", tmp_path / "b.raw", BOOTBACK_PASSPHRASE="a new passphrase")
    assert (tmp_path / "b.raw").read_bytes() == encrypted["data"]
    # a key file of another repository is refused by name
    other = tmp_path / "other"
    run("init", other, "--encryption", "aes-256-gcm", "--key-file", tmp_path / "other.key")
    p = run("key", "import", repo, tmp_path / "other.key", ok=False, BOOTBACK_PASSPHRASE="x")
    assert p.returncode == 17 and "no key file given is for this repository" in p.stderr


@pytest.mark.skipif(subprocess.run(["which", "nfs-cp"], capture_output=True).returncode, reason="needs libnfs-utils")
def test_published_encrypted_disk_reads_bit_exact_over_nfs(
    encrypted: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, base = encrypted["repo"], encrypted["base"]
    key = base / "served.key"
    if not key.exists():
        run("key", "export", repo, key, BOOTBACK_PASSPHRASE=PASS)
    daemon = DaemonProcess(repo, tmp_path / "state", *PRIVATE_PORTS, "--key-file", str(key))  # no passphrase
    try:
        daemon.start()
        doc = daemon.publish("vm01", mode="sandbox")
        control = ControlClient(tmp_path / "state")
        status, repos = control.call("status"), control.call("repositories")
        assert [r["encryption"] for r in repos] == ["aes-256-gcm"]
        # the page and the API say so (the web app, as serve's child would, gets the key files by environment)
        monkeypatch.setenv("BOOTBACK_KEY_FILE", str(key))
        Credentials(daemon.state).set_password("admin", "encryption page")
        client = create_app({"STATE_DIR": daemon.state, "TESTING": True}).test_client()
        assert login(client, "encryption page").status_code == 302
        assert "encrypted (aes-256-gcm)" in client.get(f"{BASE}/").get_data(as_text=True)
        assert client.get(f"{BASE}/api/v1/repositories").json[0]["encryption"] == "aes-256-gcm"
        ports = status["ports"]
        extent = next(f for f in doc["files"] if f.endswith("-flat.vmdk"))
        url = f"{doc['nfs_url']}/{extent}?nfsport={ports['nfs']}&mountport={ports['mount']}"
        subprocess.run(["nfs-cp", url, str(tmp_path / "nfs.raw")], check=True, capture_output=True, timeout=120)
        got, data = (tmp_path / "nfs.raw").read_bytes(), encrypted["data"]
        assert got[: len(data)] == data and got[len(data) :] == bytes(-len(data) % 512)  # whole sectors
    finally:
        daemon.stop()
    # without the key, serve stops at start with the one line
    p = run("serve", "--repo", repo, "--state", tmp_path / "s2", *PRIVATE_PORTS, "--no-web", ok=False)
    assert p.returncode == 17 and f"repository {repo} is encrypted" in p.stderr


def on_terminal(args: list[str | Path], answers: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run bootback on a pseudo-terminal, typing each answer after the next 'passphrase' prompt appears (getpass
    flushes what was typed before it asks); returns (exit status, everything the terminal showed)."""
    unset = ("BOOTBACK_PASSPHRASE", "BOOTBACK_KEY_FILE", "BOOTBACK_ENCRYPTION")  # the operator's choice: none made
    env = {k: v for k, v in os.environ.items() if k not in unset}
    pid, fd = pty.fork()
    if pid == 0:  # the child: bootback with the pty as its terminal
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, "-m", "appliance", *map(str, args)], env)
    shown, pending, deadline = b"", list(answers), time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            shown += data
            if pending and shown.rstrip().endswith(b":") and b"passphrase" in shown.rsplit(b"\n", 1)[-1]:
                os.write(fd, pending.pop(0).encode() + b"\n")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), shown.decode(errors="replace")


def test_passphrase_typed_on_a_terminal(tmp_path: Path) -> None:
    repo = tmp_path / "typed"
    status, shown = on_terminal(["init", repo], ["typed secret", "typed secret"])
    assert status == 0 and "encrypting with aes-256-gcm (the default)" in shown, shown
    assert "typed secret" not in shown  # not echoed
    status, shown = on_terminal(["points", repo], ["typed secret"])
    assert status == 0 and "no restore points" in shown, shown
    status, shown = on_terminal(["points", repo], ["not the one"])
    assert status == 17 and "wrong passphrase (as typed)" in shown, shown
    status, shown = on_terminal(["init", tmp_path / "differ"], ["one", "two"])
    assert status == 2 and "the two passphrases differ" in shown and not (tmp_path / "differ").exists(), shown
