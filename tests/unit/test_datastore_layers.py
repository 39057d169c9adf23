"""Each layer of the datastore stack on a temporary directory: the session folder (real files plus extents on a
real WriteCache), the root layer (real files plus junctions), the DatastoreBackend that maps slots to layers,
and the descriptors a published folder holds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from appliance.cache.overlay import WriteCache
from appliance.datastore.backend import SLOT_SHIFT, DatastoreBackend
from appliance.datastore.descriptors import disk_names, published_vmx, vmdk_descriptor
from appliance.datastore.folder import EXTENT_BIT, SessionFolder
from appliance.datastore.layer import TAG_BIT, real
from appliance.datastore.rootlayer import RootLayer
from appliance.repo.manifest import DiskEntry
from nfsd.vfs import Backend, CreateMode, Cred, NFSError, ObjectId, SetAttr, StableHow, Status

CRED = Cred(uid=os.geteuid(), gid=os.getegid())
MiB = 1 << 20
BASE = bytes(range(256)) * (MiB // 256)  # the "backup" behind every extent


def refused(status: Status, call, *args) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NFSError) as e:
        call(*args)
    assert e.value.status == status, f"{call.__name__}{args[1:]}: {e.value.status.name}, wanted {status.name}"


def make_folder(directory: Path, *extents: str) -> SessionFolder:
    (directory / "files").mkdir(parents=True, exist_ok=True)
    caches = {
        name: WriteCache(directory / "disks", f"d{i}", lambda o, n: BASE[o : o + n].ljust(n, b"\0"), MiB)
        for i, name in enumerate(extents)
    }
    return SessionFolder(directory, caches)


def names(backend: Backend, directory: ObjectId) -> list[str]:
    return [e.name for e in backend.readdir(directory, 0, 0, 1 << 16).entries]


# --- the session folder --------------------------------------------------------------------------------
def test_folder_serves_extents_from_the_backup_and_writes_to_the_cache(tmp_path: Path) -> None:
    f = make_folder(tmp_path / "s", "vm-flat.vmdk")
    root = f.root()
    ext = f.lookup(root, "vm-flat.vmdk")
    assert ext.fileid & EXTENT_BIT and f.getattr(ext).size == MiB
    assert f.read(ext, MiB - 4, 100) == (BASE[-4:], True)
    f.write(ext, 10, memoryview(b"guest"), StableHow.FILE_SYNC)
    assert f.read(ext, 8, 9)[0] == BASE[8:10] + b"guest" + BASE[15:17]
    assert not (tmp_path / "s" / "files" / "vm-flat.vmdk").exists()  # virtual, over the real files
    vmx = f.create(root, "vm.vmx", CreateMode.GUARDED, SetAttr(), None, CRED)
    assert not vmx.fileid & EXTENT_BIT and f.lookup(root, "vm.vmx") == vmx
    assert names(f, root) == [".", "..", "vm-flat.vmdk", "vm.vmx"]
    assert f.parent(root) == root  # the layer's top; the datastore puts its own root above it
    assert f.fsstat(ext).total_bytes > 0


def test_folder_keeps_extent_names_from_clashing(tmp_path: Path) -> None:
    f = make_folder(tmp_path / "s", "vm-flat.vmdk")
    root, ext = f.root(), f.lookup(f.root(), "vm-flat.vmdk")
    refused(Status.EXIST, f.create, root, "vm-flat.vmdk", CreateMode.UNCHECKED, SetAttr(), None, CRED)
    refused(Status.EXIST, f.mkdir, root, "vm-flat.vmdk", SetAttr(), CRED)
    refused(Status.EXIST, f.symlink, root, "vm-flat.vmdk", "x", SetAttr(), CRED)
    refused(Status.NOTSUPP, f.link, ext, root, "hard")
    refused(Status.INVAL, f.readlink, ext)
    sub = f.mkdir(root, "sub", SetAttr(), CRED)
    f.create(sub, "vm-flat.vmdk", CreateMode.GUARDED, SetAttr(), None, CRED)  # only the top holds extents
    assert not f.lookup(sub, "vm-flat.vmdk").fileid & EXTENT_BIT


def test_extent_rename_moves_the_name_and_survives_a_reopen(tmp_path: Path) -> None:
    f = make_folder(tmp_path / "s", "a-flat.vmdk", "b-flat.vmdk")
    root = f.root()
    a, b = f.lookup(root, "a-flat.vmdk"), f.lookup(root, "b-flat.vmdk")
    f.create(root, "c-flat.vmdk", CreateMode.GUARDED, SetAttr(size=3), None, CRED)

    f.rename(root, "a-flat.vmdk", root, "moved-flat.vmdk")  # what storage vMotion's rename does
    assert f.lookup(root, "moved-flat.vmdk") == a and f.read(a, 0, 4)[0] == BASE[:4]
    refused(Status.NOENT, f.lookup, root, "a-flat.vmdk")

    f.rename(root, "moved-flat.vmdk", root, "c-flat.vmdk")  # over a real file: the file goes
    assert f.lookup(root, "c-flat.vmdk") == a and not (tmp_path / "s" / "files" / "c-flat.vmdk").exists()

    f.rename(root, "c-flat.vmdk", root, "b-flat.vmdk")  # over another extent: that one is hidden
    assert f.lookup(root, "b-flat.vmdk") == a
    refused(Status.STALE, f.getattr, b)
    assert names(f, root) == [".", "..", "b-flat.vmdk"]

    sub = f.mkdir(root, "sub", SetAttr(), CRED)
    refused(Status.XDEV, f.rename, root, "b-flat.vmdk", sub, "x")  # extents stay at the top

    assert json.loads((tmp_path / "s" / "names.json").read_text()) == {
        "a-flat.vmdk": "b-flat.vmdk",
        "b-flat.vmdk": None,
    }
    f.close()
    again = make_folder(tmp_path / "s", "a-flat.vmdk", "b-flat.vmdk")
    assert again.lookup(again.root(), "b-flat.vmdk") == a and names(again, again.root()) == [
        ".",
        "..",
        "b-flat.vmdk",
        "sub",
    ]
    again.close()


def test_a_real_file_renamed_over_an_extent_replaces_its_name(tmp_path: Path) -> None:
    f = make_folder(tmp_path / "s", "vm-flat.vmdk")
    root = f.root()
    ext = f.lookup(root, "vm-flat.vmdk")
    new = f.create(root, "copy", CreateMode.GUARDED, SetAttr(), None, CRED)
    f.rename(root, "copy", root, "vm-flat.vmdk")
    assert f.lookup(root, "vm-flat.vmdk") == new
    refused(Status.STALE, f.read, ext, 0, 1)


def test_extent_remove_hides_it_for_good(tmp_path: Path) -> None:
    f = make_folder(tmp_path / "s", "vm-flat.vmdk")
    root = f.root()
    ext = f.lookup(root, "vm-flat.vmdk")
    f.remove(root, "vm-flat.vmdk")
    refused(Status.NOENT, f.lookup, root, "vm-flat.vmdk")
    refused(Status.STALE, f.getattr, ext)
    assert f.names == {"vm-flat.vmdk": None}


# --- the root layer ------------------------------------------------------------------------------------
def test_root_layer_lays_junctions_over_its_real_files(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "vm01").write_bytes(b"hidden by the folder")
    (tmp_path / "r" / ".vSphere-HA").mkdir()
    top = RootLayer(tmp_path / "r")
    root = top.root()
    top.mount("vm01", 7)
    with pytest.raises(ValueError, match="vm01"):
        top.mount("vm01", 8)
    j = top.lookup(root, "vm01")
    assert top.junction(j) == 7 and j.fileid == TAG_BIT | 7
    ha = top.lookup(root, ".vSphere-HA")
    assert top.junction(ha) is None and top.parent(ha) == root
    assert names(top, root) == [".", "..", ".vSphere-HA", "vm01"] and top.mounted() == ["vm01"]
    f = top.create(ha, "vm01", CreateMode.GUARDED, SetAttr(), None, CRED)  # only the top is shadowed
    assert top.lookup(ha, "vm01") == f and top.junction(f) is None
    assert top.fsstat(root).total_bytes > 0


def test_root_layer_refuses_changes_over_a_published_name(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    top = RootLayer(tmp_path / "r")
    root = top.root()
    top.mount("vm01", 1)
    plain = top.create(root, "plain", CreateMode.GUARDED, SetAttr(), None, CRED)
    refused(Status.EXIST, top.create, root, "vm01", CreateMode.UNCHECKED, SetAttr(), None, CRED)
    refused(Status.EXIST, top.mkdir, root, "vm01", SetAttr(), CRED)
    refused(Status.EXIST, top.symlink, root, "vm01", "x", SetAttr(), CRED)
    refused(Status.EXIST, top.link, plain, root, "vm01")
    refused(Status.EXIST, top.rename, root, "plain", root, "vm01")
    refused(Status.EXIST, top.rename, root, "vm01", root, "other")
    refused(Status.ISDIR, top.remove, root, "vm01")
    refused(Status.ACCES, top.rmdir, root, "vm01")
    assert top.unmount(1) == "vm01" and top.unmount(1) is None
    top.mkdir(root, "vm01", SetAttr(), CRED)  # the name is free again
    assert sorted(os.listdir(tmp_path / "r")) == ["plain", "vm01"]


def test_layers_refuse_inodes_that_would_collide_with_their_own_ids() -> None:
    assert real(ObjectId(TAG_BIT - 1)) == ObjectId(TAG_BIT - 1)
    refused(Status.SERVERFAULT, real, ObjectId(TAG_BIT))


# --- the stack -----------------------------------------------------------------------------------------
def test_datastore_maps_slots_to_layers(tmp_path: Path) -> None:
    ds = DatastoreBackend(tmp_path / "root")
    ds.add_folder(3, "vm01", make_folder(tmp_path / "s", "vm01-flat.vmdk"))
    root = ds.root()
    folder = ds.lookup(root, "vm01")
    ext = ds.lookup(folder, "vm01-flat.vmdk")
    assert folder.fileid >> SLOT_SHIFT == 3 and ext.fileid >> SLOT_SHIFT == 3
    attr = ds.getattr(ext)
    assert attr.fileid == ext.fileid and attr.fsid == ds.fsid and attr.size == MiB
    assert ds.parent(folder) == root and ds.parent(root) == root
    entries = {e.name: e.obj for e in ds.readdir(folder, 0, 0, 4096).entries}
    assert entries == {".": folder, "..": root, "vm01-flat.vmdk": ext}
    assert {e.name: e.obj for e in ds.readdir(root, 0, 0, 4096).entries}["vm01"] == folder
    assert ds.read(ext, 0, 4) == (BASE[:4], False)

    vmx = ds.create(folder, "vm01.vmx", CreateMode.GUARDED, SetAttr(), None, CRED)
    ds.write(vmx, 0, memoryview(b"x = 1\n"), StableHow.FILE_SYNC)
    hit = ds.read_nowait(vmx, 0, 100)  # an open real file in the page cache: answered on the loop
    assert hit is not None and bytes(hit[0]) == b"x = 1\n" and hit[1] and hit[2].fileid == vmx.fileid

    ds.rename(folder, "vm01-flat.vmdk", folder, "renamed-flat.vmdk")  # the extent RENAME through the stack
    assert ds.lookup(folder, "renamed-flat.vmdk") == ext
    refused(Status.NOENT, ds.lookup, folder, "vm01-flat.vmdk")

    mine = ds.create(root, "mine", CreateMode.GUARDED, SetAttr(), None, CRED)
    refused(Status.XDEV, ds.rename, folder, "vm01.vmx", root, "vm01.vmx")
    refused(Status.XDEV, ds.link, mine, folder, "mine")
    refused(Status.EXIST, ds.create, root, "vm01", CreateMode.GUARDED, SetAttr(), None, CRED)

    with pytest.raises(ValueError, match="vm01"):
        ds.add_folder(4, "vm01", make_folder(tmp_path / "t"))
    with pytest.raises(ValueError, match="slot 3"):
        ds.add_folder(3, "vm02", make_folder(tmp_path / "u"))
    assert ds.folder_names() == ["vm01"]

    gone = ds.remove_folder(3)
    assert gone is not None and ds.folder_names() == []
    gone.close()
    for obj in (folder, ext, vmx):
        refused(Status.STALE, ds.getattr, obj)
    refused(Status.NOENT, ds.lookup, root, "vm01")
    assert names(ds, root) == [".", "..", "mine"]
    ds.close()


def test_a_symlink_is_not_a_directory_at_any_level(tmp_path: Path) -> None:
    ds = DatastoreBackend(tmp_path / "root")
    ds.add_folder(1, "vm01", make_folder(tmp_path / "s"))
    for d in (ds.root(), ds.lookup(ds.root(), "vm01")):
        link = ds.symlink(d, "l", "/", SetAttr(), CRED)
        refused(Status.NOTDIR, ds.parent, link)
        refused(Status.NOTDIR, ds.readdir, link, 0, 0, 4096)


# --- what a published folder holds ---------------------------------------------------------------------
def disk(name: str, size: int, **kw: object) -> DiskEntry:
    return DiskEntry(name=name, size=size, chunk_size=MiB, chunks=["ab" * 16], **kw)  # type: ignore[arg-type]


def test_disk_names_are_unique_vmdk_names() -> None:
    got = disk_names([disk("web01-flat.vmdk", 1), disk("web01.qcow2", 1), disk("a b.raw", 1), disk(".vmdk", 1)])
    assert [(d.descriptor_name, d.extent_name) for d in got] == [
        ("web01.vmdk", "web01-flat.vmdk"),
        ("web01_2.vmdk", "web01_2-flat.vmdk"),
        ("a_b.vmdk", "a_b-flat.vmdk"),
        ("disk3.vmdk", "disk3-flat.vmdk"),
    ]
    assert got[0].extent_size == 512  # whole sectors


def test_vmdk_descriptor_points_at_its_extent() -> None:
    (d,) = disk_names([disk("web01.vmdk", 10 * MiB, adapter="pvscsi")])
    text = vmdk_descriptor(d)
    assert f'RW {10 * MiB // 512} FLAT "web01-flat.vmdk" 0' in text
    assert 'createType="monolithicFlat"' in text and 'ddb.adapterType = "pvscsi"' in text
    assert text == vmdk_descriptor(d)  # the CID is stable
    assert 'ddb.geometry.heads = "16"' in vmdk_descriptor(d, "ide")


def test_published_vmx_points_at_the_descriptors() -> None:
    disks = disk_names([disk("web01_1.vmdk", MiB), disk("data.vmdk", MiB)])
    vmx = "\n".join(
        [
            'displayName = "web01"',
            'scsi0:0.fileName = "/vmfs/volumes/ds1/web01/data.vmdk"',
            'scsi0:1.fileName = "web01_1.vmdk"',
            'sched.swap.derivedName = "/vmfs/volumes/ds1/web01/web01.vswp"',
            'memSize = "2048"',
        ]
    )
    out = published_vmx("web01", "p1", vmx, disks, "recovered").splitlines()
    assert 'scsi0:0.fileName = "data.vmdk"' in out and 'scsi0:1.fileName = "web01_1.vmdk"' in out
    assert 'displayName = "web01 (recovered p1)"' in out and 'memSize = "2048"' in out
    assert not any("sched.swap" in line for line in out)

    many = disk_names([disk(f"d{i}.vmdk", MiB) for i in range(8)])
    minimal = published_vmx("vm", "p2", None, many, "sandbox").splitlines()
    assert 'scsi0:6.fileName = "d6.vmdk"' in minimal and 'scsi0:8.fileName = "d7.vmdk"' in minimal
    assert not any(line.startswith("scsi0:7.") for line in minimal)  # the controller's own unit
    assert minimal[-1] == 'displayName = "vm (sandbox p2)"'
