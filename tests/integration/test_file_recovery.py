"""File-level recovery with real filesystems made by their own tools (mkfs.ext4 -d, mkfs.vfat + mcopy,
mkntfs + ntfscp) inside real partition tables (sfdisk, GPT), backed up, then browsed and extracted straight
from the repository: byte-exact, with clear errors, and the repository never changes."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.daemon_process import bootback, tree_hash

MiB = 1 << 20


def sh(*args: str | Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def backup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("flr")
    rnd = random.Random(5)
    tree = base / "tree"
    files = {
        "etc/hostname": b"fs01\n",
        "home/alice/report.bin": rnd.randbytes(3 * MiB + 123),
        "deep/a/b/c/leaf.txt": b"deep leaf\n",
        "grüße/日本.txt": b"utf-8 names\n",
        "empty.txt": b"",
    }
    for rel, data in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    (tree / "etc" / "link").symlink_to("hostname")

    # data.raw: GPT with an ext4 partition, a FAT32 partition and an unformatted one.
    ext, fat = base / "p1.img", base / "p2.img"
    sh("mkfs.ext4", "-q", "-F", "-d", tree, ext, "40M")
    sh("mkfs.vfat", "-F", "32", "-n", "DATA", "-C", fat, str(40 * 1024))
    fat_src = base / "fat"
    (fat_src / "Documents").mkdir(parents=True)
    fat_files = {"Documents/Long File Name.txt": b"long names on FAT\n", "Documents/big.bin": rnd.randbytes(MiB + 7)}
    for rel, data in fat_files.items():
        (fat_src / rel).write_bytes(data)
    sh("mcopy", "-s", "-i", fat, fat_src / "Documents", "::/")
    data = base / "data.raw"
    with open(data, "wb") as f:
        f.truncate(100 * MiB)
    layout = "label: gpt\nstart=2048, size=81920, type=L\nstart=83968, size=81920, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\nstart=165888, size=20480, type=L\n"  # noqa: E501
    sh("sfdisk", "-q", data, input=layout.encode())
    for img, sector in ((ext, 2048), (fat, 83968)):
        sh("dd", f"if={img}", f"of={data}", "bs=512", f"seek={sector}", "conv=notrunc,sparse", "status=none")

    # ntfs.raw: NTFS straight on the disk, no partition table (as a data disk often is).
    ntfs = base / "ntfs.raw"
    with open(ntfs, "wb") as f:
        f.truncate(48 * MiB)
    sh("mkntfs", "-q", "-F", "-Q", "-L", "WINDATA", ntfs)
    report = rnd.randbytes(200_000)
    (base / "report.docx").write_bytes(report)
    sh("ntfscp", "-q", ntfs, base / "report.docx", "report.docx")

    repo = base / "repo"
    bootback("init", repo, "--chunk-size", "256K")
    bootback("backup", repo, "--vm", "fs01", data, ntfs)
    return {
        "repo": repo,
        "files": files,
        "fat": fat_files,
        "ntfs": {"report.docx": report},
        "base": base,
        "hash": tree_hash(repo),
    }


def files_json(b: dict, *args: str) -> list[dict]:
    return json.loads(bootback("files", b["repo"], "fs01", *args, "--json").stdout)


def extract(b: dict, disk: str, path: str, out: Path) -> bytes:
    bootback("extract", b["repo"], "fs01", path, "--disk", disk, "-o", out)
    return out.read_bytes()


def test_volumes_and_listings_of_a_partitioned_disk(backup: dict) -> None:
    vols = files_json(backup, "--disk", "data.raw")
    assert [(v["id"], v["filesystem"]) for v in vols] == [("p1", "ext"), ("p2", "fat"), ("p3", None)]
    # dissect.volume counts a GPT partition's last sector out (81919 of 81920): within one sector
    assert vols[0]["offset"] == 2048 * 512 and 0 <= 81920 * 512 - vols[0]["size"] <= 512

    root = {e["name"]: e for e in files_json(backup, "/p1", "--disk", "data.raw")}
    assert {"etc", "home", "deep", "grüße", "empty.txt", "lost+found"} <= set(root)
    assert root["home"]["type"] == "directory" and root["empty.txt"] == {**root["empty.txt"], "size": 0}
    etc = {e["name"]: e for e in files_json(backup, "/p1/etc", "--disk", "data.raw")}
    assert etc["hostname"]["type"] == "file" and etc["hostname"]["size"] == 5 and etc["link"]["type"] == "symlink"
    assert etc["hostname"]["mtime"] is not None

    docs = {e["name"]: e for e in files_json(backup, "/p2/Documents", "--disk", "data.raw")}
    assert docs["Long File Name.txt"]["size"] == len(backup["fat"]["Documents/Long File Name.txt"])

    ntfs_vols = files_json(backup, "--disk", "ntfs.raw")
    assert [(v["id"], v["filesystem"]) for v in ntfs_vols] == [("disk", "ntfs")]
    names = [e["name"] for e in files_json(backup, "/disk", "--disk", "ntfs.raw")]
    assert "report.docx" in names and not any(n.startswith("$") for n in names), names


def test_files_extract_byte_exact_from_every_filesystem(backup: dict, tmp_path: Path) -> None:
    for rel, data in backup["files"].items():
        assert extract(backup, "data.raw", f"/p1/{rel}", tmp_path / "out") == data, rel
    for rel, data in backup["fat"].items():
        assert extract(backup, "data.raw", f"/p2/{rel}", tmp_path / "out") == data, rel
    assert extract(backup, "ntfs.raw", "/disk/report.docx", tmp_path / "out") == backup["ntfs"]["report.docx"]
    # to standard output, for pipes
    p = subprocess.run(
        [*bootback_cmd(), "extract", str(backup["repo"]), "fs01", "/p1/etc/hostname", "--disk", "data.raw", "-o", "-"],
        capture_output=True,
        timeout=60,
    )
    assert p.returncode == 0 and p.stdout == b"fs01\n"


def bootback_cmd() -> list[str]:
    import sys

    return [sys.executable, "-m", "appliance"]


def test_a_directory_extracts_as_tar_with_every_file(backup: dict, tmp_path: Path) -> None:
    tar_bytes = extract(backup, "data.raw", "/p1/home", tmp_path / "home.tar")
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert members["home/alice"].isdir()
        assert tar.extractfile("home/alice/report.bin").read() == backup["files"]["home/alice/report.bin"]
    whole = extract(backup, "data.raw", "/p1", tmp_path / "p1.tar")
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        got = {m.name.removeprefix("p1/"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert {k: v for k, v in got.items() if k in backup["files"]} == backup["files"]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/p1/nope.txt", "no such file or directory: /p1/nope.txt"),
        ("/p9/etc", "no volume 'p9' on this disk (volumes: p1, p2, p3)"),
        ("/p3/x", "volume p3 (Linux filesystem data) holds no filesystem bootback can read"),
        ("/p1/etc/../../p2", "'..' is not allowed in paths"),
        ("/p1/etc/hostname/x", "no such file or directory: /p1/etc/hostname/x"),
    ],
)
def test_bad_paths_are_clear_errors_and_leave_no_output(backup: dict, path: str, message: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = bootback("extract", backup["repo"], "fs01", path, "--disk", "data.raw", "-o", out, ok=False)
    assert p.returncode == 60 and message in p.stderr, p.stderr
    assert not out.exists()
    listing = bootback("files", backup["repo"], "fs01", "/p1/etc/hostname", "--disk", "data.raw", ok=False)
    assert listing.returncode == 60 and "not a directory: /p1/etc/hostname" in listing.stderr
    two_disks = bootback("files", backup["repo"], "fs01", ok=False)
    assert two_disks.returncode == 60 and "has 2 disks (data.raw, ntfs.raw)" in two_disks.stderr
    assert tree_hash(backup["repo"]) == backup["hash"], "browsing changed the repository"


def test_a_damaged_chunk_under_a_file_is_an_error_never_wrong_bytes(backup: dict, tmp_path: Path) -> None:
    """Copy the repository, damage the chunks holding the report's data, and extract it from the copy."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(backup["repo"], repo)
    report = backup["files"]["home/alice/report.bin"]
    damaged = 0
    for chunk in (repo / "chunks").rglob("*"):
        if chunk.is_file():
            blob = bytearray(chunk.read_bytes())
            if len(blob) > 200_000:  # the incompressible report's chunks; metadata chunks compress well
                blob[len(blob) // 2] ^= 0xFF
                chunk.write_bytes(bytes(blob))
                damaged += 1
    assert damaged, "no chunk of the report found to damage"
    out = tmp_path / "report.bin"
    p = bootback("extract", repo, "fs01", "/p1/home/alice/report.bin", "--disk", "data.raw", "-o", out, ok=False)
    assert p.returncode == 15 and "chunk" in p.stderr and "fs01" in p.stderr, p.stderr
    assert not out.exists(), "a partial file was left behind"
    good = bootback("extract", backup["repo"], "fs01", "/p1/home/alice/report.bin", "--disk", "data.raw", "-o", out)
    assert good.returncode == 0 and out.read_bytes() == report, "the undamaged repository still gives the file"


def test_the_api_lists_and_downloads_files_and_names_bad_fields(backup: dict, tmp_path: Path) -> None:
    import requests

    from tests.daemon_process import web_appliance

    d, base_url = web_appliance(backup["repo"], tmp_path / "state", "flr-api-password")
    try:
        token = bootback("token", "create", "flr", "--state", d.state).stdout.strip()
        api = requests.Session()
        api.trust_env = False
        api.verify = str(d.state / "web" / "tls.crt")
        url = f"{base_url}/api/v1/repositories/repo/files"
        assert api.get(url, params={"point": "fs01", "disk": "data.raw"}).status_code == 401
        api.headers["Authorization"] = f"Bearer {token}"

        top = api.get(url, params={"point": "fs01", "disk": "data.raw"}).json()
        assert [v["filesystem"] for v in top["volumes"]] == ["ext", "fat", None]
        assert top["point"].startswith("fs01@") and top["disk"] == "data.raw"
        home = api.get(url, params={"point": top["point"], "disk": "data.raw", "path": "/p1/home/alice"}).json()
        assert home["entries"] == [
            {
                **home["entries"][0],
                "name": "report.bin",
                "type": "file",
                "size": len(backup["files"]["home/alice/report.bin"]),
            }
        ]

        got = api.get(
            f"{url}/content", params={"point": "fs01", "disk": "data.raw", "path": "/p1/home/alice/report.bin"}
        )
        assert got.status_code == 200 and got.content == backup["files"]["home/alice/report.bin"]
        assert "report.bin" in got.headers["Content-Disposition"]
        ntfs = api.get(f"{url}/content", params={"point": "fs01", "disk": "ntfs.raw", "path": "/disk/report.docx"})
        assert ntfs.content == backup["ntfs"]["report.docx"]
        tar_resp = api.get(f"{url}/content", params={"point": "fs01", "disk": "data.raw", "path": "/p1/deep"})
        with tarfile.open(fileobj=io.BytesIO(tar_resp.content)) as tar:
            assert tar.extractfile("deep/a/b/c/leaf.txt").read() == b"deep leaf\n"

        cases = [
            ({"point": "fs01", "disk": "data.raw", "path": "/p1/nope"}, 404, "no such file or directory: /p1/nope"),
            ({"point": "fs01", "disk": "data.raw", "path": "/p3/x"}, 400, "holds no filesystem"),
            ({"point": "fs01", "path": "/"}, 400, "has 2 disks"),
            ({"point": "fs01@1999-01-01", "disk": "data.raw"}, 404, "1999-01-01"),
            ({"point": "../etc", "disk": "data.raw"}, 400, "point:"),
            ({"point": "fs01", "disk": "data.raw", "path": "relative"}, 400, "path:"),
        ]
        for params, status, message in cases:
            resp = api.get(url, params=params)
            assert resp.status_code == status and message in resp.json()["error"]["message"], (params, resp.text)
        assert api.get(f"{base_url}/api/v1/repositories/other/files", params={"point": "fs01"}).status_code == 404
    finally:
        d.stop()
    assert tree_hash(backup["repo"]) == backup["hash"]


LVM = "global { activation=0 } devices { obtain_device_list_from_udev=0 } activation { udev_sync=0 udev_rules=0 }"


def _lvm_disk(base: Path, root_img: Path, data_img: Path) -> Path:
    """An MBR disk whose second partition is an LVM2 physical volume with two logical volumes, as Debian's
    and RHEL's installers lay disks out. LVM's own tools write the metadata (activation off: no device-mapper
    here); the filesystems are copied to the extents LVM assigned."""
    pv = base / "pv.img"
    with open(pv, "wb") as f:
        f.truncate(64 * MiB)
    loop = sh("losetup", "-f", "--show", pv).stdout.decode().strip()
    env = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}
    try:
        sh("pvcreate", "-q", "-y", "-ff", "--config", LVM, loop, env=env)
        sh("vgcreate", "-q", "--config", LVM, "vgdata", loop, env=env)
        sh("lvcreate", "-q", "-y", "-an", "-Zn", "--config", LVM, "-L", "20M", "-n", "root", "vgdata", env=env)
        sh("lvcreate", "-q", "-y", "-an", "-Zn", "--config", LVM, "-L", "8M", "-n", "srv", "vgdata", env=env)
        pe_start = int(
            sh(
                "pvs", "--config", LVM, "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start", loop, env=env
            ).stdout.split()[0]
        )
        segs = (
            sh(
                "lvs",
                "--config",
                LVM,
                "--noheadings",
                "--units",
                "b",
                "--nosuffix",
                "--segments",
                "-o",
                "lv_name,seg_pe_ranges,vg_extent_size",
                "vgdata",
                env=env,
            )
            .stdout.decode()
            .split()
        )
    finally:
        sh("losetup", "-d", loop)
    for name, ranges, extent in zip(segs[0::3], segs[1::3], segs[2::3], strict=True):
        first = int(ranges.split(":")[1].split("-")[0])
        img = root_img if name == "root" else data_img
        sh(
            "dd",
            f"if={img}",
            f"of={pv}",
            "bs=1M",
            f"seek={pe_start + first * int(extent)}",
            "oflag=seek_bytes",
            "conv=notrunc",
            "status=none",
        )
    disk = base / "lvm.raw"
    with open(disk, "wb") as f:
        f.truncate(80 * MiB)
    sh("sfdisk", "-q", disk, input=b"start=2048, size=20480, type=83\nstart=22528, size=131072, type=8e\n")
    sh("dd", f"if={pv}", f"of={disk}", "bs=512", "seek=22528", "conv=notrunc,sparse", "status=none")
    return disk


def test_logical_volumes_of_lvm_are_browsed_like_partitions(tmp_path: Path) -> None:
    root, srv = tmp_path / "root.img", tmp_path / "srv.img"
    (tmp_path / "rt" / "etc").mkdir(parents=True)
    (tmp_path / "rt" / "etc" / "fstab").write_bytes(b"/dev/vgdata/root / ext4 defaults 0 1\n")
    (tmp_path / "sv").mkdir()
    payload = random.Random(9).randbytes(2 * MiB)
    (tmp_path / "sv" / "site.tar").write_bytes(payload)
    sh("mkfs.ext4", "-q", "-F", "-d", tmp_path / "rt", root, "20M")
    sh("mkfs.ext4", "-q", "-F", "-d", tmp_path / "sv", srv, "8M")
    repo = tmp_path / "repo"
    bootback("init", repo)
    bootback("backup", repo, "--vm", "lvm01", _lvm_disk(tmp_path, root, srv))

    vols = json.loads(bootback("files", repo, "lvm01", "--json").stdout)
    assert [(v["id"], v["filesystem"]) for v in vols] == [
        ("p1", None),
        ("p2", None),
        ("vgdata-root", "ext"),
        ("vgdata-srv", "ext"),
    ]
    assert vols[2]["size"] == 20 * MiB and "vgdata/root on p2" in vols[2]["description"]
    out = tmp_path / "out"
    bootback("extract", repo, "lvm01", "/vgdata-root/etc/fstab", "-o", out)
    assert out.read_bytes() == b"/dev/vgdata/root / ext4 defaults 0 1\n"
    bootback("extract", repo, "lvm01", "/vgdata-srv/site.tar", "-o", out)
    assert out.read_bytes() == payload


def test_xfs_as_rhel_installs_it(tmp_path: Path) -> None:
    """XFS (RHEL's default) populated by mkfs.xfs from a prototype file, on a disk without partitions."""
    payload = random.Random(13).randbytes(3 * MiB + 1)
    (tmp_path / "big.bin").write_bytes(payload)
    (tmp_path / "motd").write_bytes(b"welcome\n")
    proto = tmp_path / "proto"
    proto.write_text(
        f"/dev/null\n0 0\nd--755 0 0\nmotd ---644 0 0 {tmp_path / 'motd'}\n"
        f"var d--755 0 0\nbig.bin ---644 0 0 {tmp_path / 'big.bin'}\n$\n$\n"
    )
    img = tmp_path / "xfs.raw"
    with open(img, "wb") as f:
        f.truncate(320 * MiB)  # mkfs.xfs's minimum is 300 MiB; sparse, and zero chunks are not stored
    sh("mkfs.xfs", "-q", "-p", proto, img)
    repo = tmp_path / "repo"
    bootback("init", repo)
    bootback("backup", repo, "--vm", "rhel01", img)
    vols = json.loads(bootback("files", repo, "rhel01", "--json").stdout)
    assert [(v["id"], v["filesystem"]) for v in vols] == [("disk", "xfs")]
    var = json.loads(bootback("files", repo, "rhel01", "/disk/var", "--json").stdout)
    assert [(e["name"], e["size"]) for e in var] == [("big.bin", len(payload))]
    out = tmp_path / "out"
    bootback("extract", repo, "rhel01", "/disk/var/big.bin", "-o", out)
    assert out.read_bytes() == payload
