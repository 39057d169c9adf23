"""The Ansible roles on a real Docker engine: each role's molecule scenario (converge, idempotence, verify of
the real state), then bad input — every mistake an operator can make in the variables fails early with a
message that names it, before anything on the host changes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.daemon_process import ROOT, bootback, free_port
from tests.integration.firewall_lab import delete_nft_table, firewall_lab

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def ansible_env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "PY_COLORS": "0",
        "ANSIBLE_FORCE_COLOR": "0",
        "NO_COLOR": "1",
        **extra,
    }
    return env


@pytest.fixture(scope="module")
def vcenter(build_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """govmomi's vSphere simulator (a vCenter with three ESXi hosts) on loopback; yields its HTTPS port.
    Built once per source version and kept in the build cache."""
    source = ROOT / "tests" / "vcsim" / "main.go"
    binary = build_cache / f"vcsim-{hashlib.sha256(source.read_bytes()).hexdigest()[:12]}"
    if not binary.exists():
        env = {**os.environ, "GO111MODULE": "off", "GOPATH": "/usr/share/gocode", "GOCACHE": str(build_cache / "go")}
        subprocess.run(["go", "build", "-o", f"{binary}.tmp", str(source)], check=True, env=env, timeout=600)
        os.replace(f"{binary}.tmp", binary)
    cwd = tmp_path_factory.mktemp("vcsim")
    # The simulator wants a NAS datastore's local path to exist in its working directory.
    for name in ("bootback-appliance1", "bootback-failtest"):
        (cwd / name).mkdir()
    proc = subprocess.Popen([str(binary)], cwd=cwd, stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("https://"), f"vcsim did not start: {url!r}"
        yield int(url.rsplit(":", 1)[1].split("/")[0])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def molecule(role: str, artifacts_dir: Path, **env: str) -> None:
    p = subprocess.run(
        [str(BIN / "molecule"), "test"],
        cwd=ROOT / "roles" / role,
        env=ansible_env(**env),
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = p.stdout + p.stderr
    (artifacts_dir / f"molecule-{role}.log").write_text(log)
    assert p.returncode == 0, log[-6000:]
    for step in ("converge", "idempotence", "verify"):
        assert f"{step}: Executed: Successful" in log, f"molecule did not run {step}:\n{log[-3000:]}"


@pytest.mark.parametrize("role", ["bootback_repository", "bootback_appliance"])
def test_molecule_scenario(role: str, appliance_image: str, artifacts_dir: Path, tmp_path: Path) -> None:
    """The appliance's verify also probes its firewall from an allowed and a refused network namespace."""
    table = f"bbmolecule{os.urandom(3).hex()}"
    with firewall_lab() as lab:
        try:
            molecule(
                role,
                artifacts_dir,
                BOOTBACK_MOLECULE_BASE=str(tmp_path),
                BOOTBACK_MOLECULE_IMAGE=appliance_image,
                BOOTBACK_MOLECULE_WEB_PORT=str(free_port()),
                BOOTBACK_MOLECULE_NFS_PORT=str(free_port()),
                BOOTBACK_MOLECULE_MOUNT_PORT=str(free_port()),
                BOOTBACK_MOLECULE_PORTMAP_PORT=str(free_port()),
                BOOTBACK_MOLECULE_FW_TABLE=table,
                **lab.env(),
            )
        finally:
            delete_nft_table(table)


def test_molecule_scenario_esxi_datastore(vcenter: int, artifacts_dir: Path) -> None:
    molecule("bootback_esxi_datastore", artifacts_dir, BOOTBACK_MOLECULE_VCSIM_PORT=str(vcenter))


def run_role(
    tmp_path: Path, role: str, variables: dict, host: str = "localhost", check: bool = False
) -> subprocess.CompletedProcess:
    """Apply ROLE to HOST (this machine) with VARIABLES (as an inventory would give them)."""
    play = [{"name": "Apply the role", "hosts": "all", "gather_facts": False, "roles": [{"role": role}]}]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    (tmp_path / "vars.json").write_text(json.dumps(variables))
    return subprocess.run(
        [
            str(BIN / "ansible-playbook"),
            "-i",
            f"{host},",
            "-c",
            "local",
            "-e",
            f"@{tmp_path / 'vars.json'}",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            str(tmp_path / "play.yml"),
            *(["--check"] * check),
        ],
        cwd=ROOT,
        env=ansible_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


APPLIANCE_OK = {
    "bootback_appliance_admin_password": "long-enough-password",
    "bootback_appliance_min_free": "1M",
    "bootback_appliance_network_mode": "bridge",
    "bootback_appliance_bind_address": "127.0.0.1",
    "bootback_appliance_nfs_client_networks": ["10.1.0.0/16"],
    "bootback_appliance_admin_networks": ["10.9.0.0/24"],
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bootback_appliance_network_mode": "nat"}, "bootback_appliance_network_mode must be one of: host, bridge"),
        ({"bootback_appliance_admin_password": "tiny-pw"}, "must have 8 to 1024 characters"),
        ({"bootback_appliance_admin_password": None}, "missing required arguments: bootback_appliance_admin_password"),
        ({"bootback_appliance_published_ports": {"nfs": "two"}}, "bootback_appliance_published_ports"),
        ({"bootback_appliance_tls_cert": "/nonexistent.crt"}, "set both bootback_appliance_tls_cert"),
        ({"bootback_appliance_min_free": "900T"}, "less than bootback_appliance_min_free (900T)"),
        ({"bootback_appliance_image": "bootback:no-such-tag"}, "the image bootback:no-such-tag is not on"),
    ],
    ids=[
        "network-mode",
        "short-password",
        "no-password",
        "port-not-a-number",
        "cert-without-key",
        "cache-too-small",
        "image-missing",
    ],
)
def test_appliance_role_refuses_bad_variables(change: dict, message: str, appliance_image: str, tmp_path: Path) -> None:
    variables = {
        **APPLIANCE_OK,
        "bootback_appliance_image": appliance_image,
        "bootback_appliance_base_dir": str(tmp_path / "srv"),
        "bootback_appliance_container_name": f"bootback-bad-{tmp_path.name[-12:]}",
        **change,
    }
    variables = {k: v for k, v in variables.items() if v is not None}
    p = run_role(tmp_path, "bootback_appliance", variables)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    assert message in " ".join(out.split()), out[-3000:]
    assert variables.get("bootback_appliance_admin_password", "no password") not in out, "the password leaked"
    assert not (tmp_path / "srv" / "secrets" / "admin-password").exists(), "changed the host before refusing"


def test_repository_role_refuses_bad_names_sizes_and_changed_chunk_sizes(appliance_image: str, tmp_path: Path) -> None:
    repos = tmp_path / "repositories"
    base = {"bootback_repository_dir": str(repos), "bootback_repository_image": appliance_image}
    p = run_role(tmp_path, "bootback_repository", {**base, "bootback_repository_list": [{"name": "../etc"}]})
    assert p.returncode != 0 and "must be letters, digits" in p.stdout, p.stdout[-3000:]
    assert not repos.exists(), "nothing may change before the names are checked"

    p = run_role(
        tmp_path, "bootback_repository", {**base, "bootback_repository_list": [{"name": "main", "chunk_size": "3M"}]}
    )
    assert p.returncode != 0 and "chunk_size must be one of" in " ".join(p.stdout.split()), p.stdout[-3000:]

    bootback("init", repos / "main", "--chunk-size", "256K")
    before = (repos / "main" / "config.json").read_bytes()
    p = run_role(tmp_path, "bootback_repository", {**base, "bootback_repository_list": [{"name": "main"}]})
    flat = " ".join(p.stdout.split())
    assert p.returncode != 0 and "exists with chunk size 256.00 KB, not 1M" in flat, p.stdout[-3000:]
    assert (repos / "main" / "config.json").read_bytes() == before, "an existing repository must not change"
    shutil.rmtree(repos, ignore_errors=True)


def test_esxi_datastore_role_mounts_unmounts_and_never_replaces_a_foreign_mount(vcenter: int, tmp_path: Path) -> None:
    base = {
        "bootback_esxi_datastore_vcenter": "127.0.0.1",
        "bootback_esxi_datastore_port": vcenter,
        "bootback_esxi_datastore_username": "bootback",
        "bootback_esxi_datastore_password": "vcsim-pass",
        "bootback_esxi_datastore_validate_certs": False,
        "bootback_esxi_datastore_appliance": "failtest",
        "ansible_python_interpreter": sys.executable,
    }

    def role(host: str = "DC0_C0_H1", **change: object) -> str:
        variables = {k: v for k, v in {**base, **change}.items() if v is not None}
        p = run_role(tmp_path, "bootback_esxi_datastore", variables, host=host)
        out = " ".join((p.stdout + p.stderr).split())
        return ("ok " if p.returncode == 0 else "failed ") + out

    first = role()
    assert first.startswith("ok ") and "changed=1" in first, first[-2000:]
    again = role()
    assert again.startswith("ok ") and "changed=0" in again, again[-2000:]

    foreign = role(
        bootback_esxi_datastore_appliance="other.example.com", bootback_esxi_datastore_name="bootback-failtest"
    )
    expected = "is mounted from failtest:/bootback-failtest, not other.example.com:/bootback-other"
    assert foreign.startswith("failed ") and expected in foreign, foreign[-2000:]

    unknown = role(host="esx-nowhere")
    assert unknown.startswith("failed ") and "no ESXi host named 'esx-nowhere'" in unknown, unknown[-2000:]
    wrong_password = role(bootback_esxi_datastore_password="wrong")
    assert wrong_password.startswith("failed ") and "cannot log in to 127.0.0.1 as bootback" in wrong_password
    assert "wrong" not in wrong_password.replace("wrong user name", ""), "the password leaked"
    relative = role(bootback_esxi_datastore_export="bootback-failtest")
    assert relative.startswith("failed ") and "must be an absolute path" in relative, relative[-2000:]
    missing = role(bootback_esxi_datastore_appliance=None)
    assert missing.startswith("failed ") and "missing required arguments: bootback_esxi_datastore_appliance" in missing

    # Unmounting: the simulator does not implement RemoveDatastore, so a mounted host is asked in check mode
    # (it would change) and a host without the datastore must report nothing to do.
    p = run_role(
        tmp_path,
        "bootback_esxi_datastore",
        {**base, "bootback_esxi_datastore_state": "absent"},
        host="DC0_C0_H1",
        check=True,
    )
    assert p.returncode == 0 and "changed=1" in p.stdout, p.stdout[-2000:]
    absent = role(host="DC0_H0", bootback_esxi_datastore_state="absent")
    assert absent.startswith("ok ") and "changed=0" in absent, absent[-2000:]


def test_site_playbook_and_roles_pass_the_syntax_check() -> None:
    p = subprocess.run(
        [str(BIN / "ansible-playbook"), "--syntax-check", "-i", "inventory/example.yml", "playbooks/site.yml"],
        cwd=ROOT,
        env=ansible_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
