"""The NFSv3 and MOUNT argument decoders, fuzzed through the real dispatcher.

A real ``Dispatcher`` with the real ``NFSv3`` and ``MountV3`` programs serves three exports: a ``LocalFS`` over a
temp directory (with a symlink pointing out of it), a read-only ``LocalFS``, and the appliance's
``DatastoreBackend`` with one published VM folder whose disk extent sits on a real ``WriteCache``. Hypothesis
sends (a) structurally valid calls with hostile values and (b) byte mutations of valid calls. Every reply must
be well formed (parsed here per RFC 1813 for its procedure), never SYSTEM_ERR or an unexpected backend error,
allocate a bounded amount of memory, and change nothing outside the export directories (a sibling canary).
"""

from __future__ import annotations

import asyncio
import logging
import os
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.cache.overlay import WriteCache
from appliance.daemon import NFS_STATUS_OF  # the appliance's domain errors, as the daemon maps them
from appliance.datastore.backend import DatastoreBackend
from appliance.datastore.folder import SessionFolder
from nfsd.exports import Export, ExportTable
from nfsd.handles import HandleCodec
from nfsd.localfs import LocalFS
from nfsd.mount import MOUNT_PROGRAM, MountV3
from nfsd.nfs3 import NFS_PROGRAM, NFSv3
from nfsd.rpc import GARBAGE_ARGS, SUCCESS, Dispatcher
from nfsd.vfs import ObjectId, Status
from nfsd.xdr import Packer, Unpacker
from tests.rpcclient import auth_sys, call_bytes

MiB = 1 << 20
RTMAX = 1 << 20  # what FSINFO advertises (checked in test_read_count_is_clamped_to_rtmax)
ALLOC_LIMIT = 8 * MiB  # per call: a full 1 MiB READ plus its copies fits; a length believed from the wire does not
PROFILE = dict(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
MOUNTSTATS = {0, 1, 2, 5, 13, 20, 22, 63, 10004, 10006}
U32_EDGES = [0, 1, 2, 3, 7, 255, 4096, 65536, 2**31 - 1, 2**31, 2**32 - 1]
U64_EDGES = [0, 1, 4095, 2**32 - 1, 2**32, 2**40, 2**44, 2**62, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]
ANY_U32 = st.integers(0, 2**32 - 1)
U32 = st.sampled_from(U32_EDGES) | ANY_U32
U64 = st.sampled_from(U64_EDGES) | st.integers(0, 2**64 - 1)
ONE_IN_TEN = st.integers(0, 9).map(lambda n: n == 0)
FH_KINDS = st.sampled_from(["real"] * 6 + ["forged", "truncated", "random", "empty"])


# --- the server under test ---------------------------------------------------------------------------------
@dataclass
class World:
    tmp: Path
    loop: asyncio.AbstractEventLoop
    dispatcher: Dispatcher
    table: ExportTable
    codec: HandleCodec
    programs: list = field(default_factory=list)
    errors: list[logging.LogRecord] = field(default_factory=list)
    xid: int = 0

    def run(self, record: bytes) -> list | None:
        return self.loop.run_until_complete(self.dispatcher.handle(record, ("127.0.0.1", 700), "tcp"))

    def handles(self) -> dict[str, bytes]:
        """Handles of the fixture objects, re-made first if a fuzzed call removed or renamed them. The keys never
        change (hypothesis draws from them); what cannot be found gets a handle to no object."""
        make_tree(self.tmp)
        out: dict[str, bytes] = {}
        for key in OBJECTS:
            export = self.table.by_path("/" + key.split("/")[1])
            assert export is not None
            obj = export.backend.root()
            try:
                for name in key.split("/")[2:]:
                    obj = export.backend.lookup(obj, name)
            except Exception:  # noqa: BLE001 - removed by a fuzzed call, or (rightly) not reachable through a symlink
                obj = ObjectId(0)
            out[key] = self.table.handle(export, obj)
        return out


OBJECTS = [
    "/export",
    "/export/file",
    "/export/dir",
    "/export/dir/inner",
    "/export/link",
    "/export/escape",
    "/export/escape/secret",
    "/export/sub",
    "/ro",
    "/ro/file",
    "/ro/dir",
    "/ds",
    "/ds/vm",
    "/ds/vm/vm.vmx",
    "/ds/vm/vm-flat.vmdk",
]


def make_tree(tmp: Path) -> None:
    export = tmp / "export"
    (export / "dir").mkdir(parents=True, exist_ok=True)
    (export / "sub").mkdir(exist_ok=True)
    if not (export / "file").is_file():
        (export / "file").write_bytes(os.urandom(3 * MiB))
    if not (export / "dir" / "inner").exists():
        (export / "dir" / "inner").write_bytes(b"inner")
    for name, target in (("link", "file"), ("escape", "../canary")):
        if not os.path.lexists(export / name):
            os.symlink(target, export / name)
    (tmp / "ro" / "dir").mkdir(parents=True, exist_ok=True)
    if not (tmp / "ro" / "file").exists():
        (tmp / "ro" / "file").write_bytes(b"read only")
    vmx = tmp / "ds-vm" / "files" / "vm.vmx"
    vmx.parent.mkdir(parents=True, exist_ok=True)
    if not vmx.exists():
        vmx.write_text('displayName = "vm"\n')


def snapshot(path: Path) -> dict[str, tuple]:
    """Everything about a directory tree a change could touch (symlinks not followed)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            content = Path(p).read_bytes() if os.path.isfile(p) and not os.path.islink(p) else b""
            out[os.path.relpath(p, path)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, content)
    st = os.lstat(path)
    out["."] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
    return out


class _Errors(logging.Handler):
    def __init__(self, sink: list) -> None:
        super().__init__(logging.ERROR)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The server the fuzz tests share (they change its files)."""
    yield from serve(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The server of the deterministic tests, untouched by the fuzz tests."""
    yield from serve(tmp_path_factory.mktemp("golden"))


def serve(tmp: Path) -> Iterator[World]:
    make_tree(tmp)
    (tmp / "canary" / "deep").mkdir(parents=True)
    (tmp / "canary" / "secret").write_bytes(b"outside the export")
    (tmp / "canary" / "deep" / "x").write_bytes(b"x")
    codec = HandleCodec(b"k" * 32)
    table = ExportTable(codec)
    table.add(Export("/export", LocalFS(tmp / "export")))
    table.add(Export("/ro", LocalFS(tmp / "ro"), read_only=True))
    datastore = DatastoreBackend(tmp / "ds-root")
    base = os.urandom(2 * MiB)
    cache = WriteCache(tmp / "ds-cache", "d0", lambda o, n: base[o : o + n].ljust(n, b"\0"), 2 * MiB)
    datastore.add_folder(1, "vm", SessionFolder(tmp / "ds-vm", {"vm-flat.vmdk": cache}))
    table.add(Export("/ds", datastore))
    loop = asyncio.new_event_loop()
    dispatcher = Dispatcher()
    nfs, mount = NFSv3(table, error_statuses=NFS_STATUS_OF), MountV3(table)
    dispatcher.register(nfs)
    dispatcher.register(mount)
    w = World(tmp, loop, dispatcher, table, codec, [nfs, mount])
    handler = _Errors(w.errors)
    logging.getLogger("nfsd").addHandler(handler)
    outside = {p.name for p in tmp.iterdir()}
    before = snapshot(tmp / "canary")
    try:
        yield w
    finally:
        logging.getLogger("nfsd").removeHandler(handler)
        nfs.close()
        loop.close()
    assert {p.name for p in tmp.iterdir()} == outside
    assert snapshot(tmp / "canary") == before


# --- reply parsing (RFC 1813) ------------------------------------------------------------------------------
def fattr3(u: Unpacker) -> None:
    ftype = u.u32("ftype")
    assert 1 <= ftype <= 7, f"fattr3 type {ftype}"
    u.fixed(80, "fattr3")


def post_op_attr(u: Unpacker) -> None:
    if u.bool("attributes_follow"):
        fattr3(u)


def wcc_data(u: Unpacker) -> None:
    if u.bool("pre_op_attr"):
        u.fixed(24, "wcc_attr")
    post_op_attr(u)


def post_op_fh3(u: Unpacker) -> None:
    if u.bool("handle_follows"):
        u.opaque(64, "nfs_fh3")


def entries(u: Unpacker, plus: bool) -> None:
    while u.bool("value_follows"):
        u.u64("fileid"), u.string(255, "filename3"), u.u64("cookie")
        if plus:
            post_op_attr(u)
            post_op_fh3(u)
    u.bool("eof")


def read_ok(u: Unpacker) -> None:
    count, _eof = u.u32("count"), u.bool("eof")
    data = u.opaque(RTMAX, "data")
    assert count == len(data) <= RTMAX


def write_ok(u: Unpacker) -> None:
    u.u32("count")
    assert u.u32("committed") <= 2
    u.fixed(8, "writeverf3")


Parse = Callable[[Unpacker], object]
_nothing: Parse = lambda u: None  # noqa: E731
_two_wcc: Parse = lambda u: (wcc_data(u), wcc_data(u))  # noqa: E731
_created: Parse = lambda u: (post_op_fh3(u), post_op_attr(u), wcc_data(u))  # noqa: E731
# proc -> (the rest of an NFS3_OK reply, the rest of a failed one): XXX3resok and XXX3resfail
NFS_REPLIES: dict[int, tuple[Parse, Parse]] = {
    1: (fattr3, _nothing),
    2: (wcc_data, wcc_data),
    3: (lambda u: (u.opaque(64), post_op_attr(u), post_op_attr(u)), post_op_attr),
    4: (lambda u: (post_op_attr(u), u.u32("access")), post_op_attr),
    5: (lambda u: (post_op_attr(u), u.string(4096, "nfspath3")), post_op_attr),
    6: (lambda u: (post_op_attr(u), read_ok(u)), post_op_attr),
    7: (lambda u: (wcc_data(u), write_ok(u)), wcc_data),
    8: (_created, wcc_data),
    9: (_created, wcc_data),
    10: (_created, wcc_data),
    11: (_created, wcc_data),
    12: (wcc_data, wcc_data),
    13: (wcc_data, wcc_data),
    14: (_two_wcc, _two_wcc),
    15: (lambda u: (post_op_attr(u), wcc_data(u)), lambda u: (post_op_attr(u), wcc_data(u))),
    16: (lambda u: (post_op_attr(u), u.fixed(8), entries(u, plus=False)), post_op_attr),
    17: (lambda u: (post_op_attr(u), u.fixed(8), entries(u, plus=True)), post_op_attr),
    18: (lambda u: (post_op_attr(u), u.fixed(48), u.u32("invarsec")), post_op_attr),
    19: (lambda u: (post_op_attr(u), u.fixed(48)), post_op_attr),
    20: (lambda u: (post_op_attr(u), u.u32x2(), [u.bool() for _ in range(4)]), post_op_attr),
    21: (lambda u: (wcc_data(u), u.fixed(8)), wcc_data),
}


def nfs_body(proc: int, u: Unpacker) -> int:
    if proc == 0:
        return 0
    status = u.u32("nfsstat3")
    assert status in set(Status), f"nfsstat3 {status} is not an RFC 1813 value"
    ok, fail = NFS_REPLIES[proc]
    (ok if status == 0 else fail)(u)
    return status


def mount_body(proc: int, u: Unpacker) -> int:
    if proc == 1:
        status = u.u32("mountstat3")
        assert status in MOUNTSTATS, f"mountstat3 {status}"
        if status == 0:
            u.opaque(64, "fhandle3")
            flavors = u.u32("auth_flavors count")
            assert flavors <= 16
            [u.u32() for _ in range(flavors)]
        return status
    if proc == 2:
        while u.bool():
            u.string(255), u.string(1024)
    if proc == 5:
        while u.bool():
            u.string(1024)
            while u.bool():
                u.string(255)
    return 0


@dataclass
class Outcome:
    accept: int
    status: int | None  # nfsstat3 / mountstat3 of a SUCCESS reply
    body: bytes  # what follows accept_stat
    peak: int  # bytes allocated at the worst moment of the call

    def results(self) -> Unpacker:
        """The reply body after its status."""
        return Unpacker(self.body, 4)


def call(w: World, prog: int, proc: int, args: bytes, cred: tuple[int, bytes] | None = None) -> Outcome:
    """One call through the dispatcher; checks every property that holds for any call."""
    w.xid = (w.xid + 1) & 0xFFFFFFFF
    record = call_bytes(w.xid, prog, 3, proc, args, cred or auth_sys())
    w.errors.clear()
    tracemalloc.start()  # only around the call: tracing hypothesis itself would slow it tenfold
    try:
        parts = w.run(record)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < ALLOC_LIMIT + 2 * len(args), f"proc {proc} allocated {peak} bytes for {len(args)} bytes of arguments"
    assert parts is not None
    reply = b"".join(bytes(p) for p in parts)
    u = Unpacker(reply)
    assert u.u32("xid") == w.xid
    assert u.u32("msg_type") == 1
    assert u.u32("reply_stat") == 0, "call denied"
    u.u32("verf flavor"), u.opaque(400, "verf")
    accept = u.u32("accept_stat")
    body = reply[u.pos :]
    assert accept in (SUCCESS, GARBAGE_ARGS), f"accept_stat {accept} for prog {prog} proc {proc}"
    status = None
    if accept == SUCCESS:
        status = (nfs_body if prog == NFS_PROGRAM else mount_body)(proc, u)
        u.done("reply")
    assert not w.errors, f"prog {prog} proc {proc} logged: {[r.getMessage() for r in w.errors]}"
    assert status != Status.SERVERFAULT, f"NFS3ERR_SERVERFAULT for prog {prog} proc {proc}"
    assert not (prog == MOUNT_PROGRAM and status == 10006), f"MNT3ERR_SERVERFAULT for {args!r}"
    return Outcome(accept, status, body, peak)


# --- argument generation ---------------------------------------------------------------------------------
NAMES = [
    b"file",
    b"dir",
    b"inner",
    b"link",
    b"escape",
    b"sub",
    b"vm",
    b"vm.vmx",
    b"vm-flat.vmdk",
    b"new",
    b"new2",
    b"secret",
]
HOSTILE_NAMES = [
    b"",
    b".",
    b"..",
    b"a/b",
    b"/",
    b"../canary",
    b"a\0b",
    b"\0",
    b"x" * 255,
    b"x" * 256,
    b"y" * 1000,
    "é".encode() * 128,
    b"\xff\xfe\xfd",
    b"\xed\xa0\x80",
    b"\xc3",
]
PATHS = [
    b"file",
    b"../canary",
    b"../../../../etc/passwd",
    b"/",
    b"",
    b"a\0b",
    b"x" * 4096,
    b"x" * 4097,
    b"\xff",
    b"escape/secret",
]


class Args:
    """Draws one procedure's arguments field by field. ``valid`` stays True while every choice is valid XDR
    (the server must then answer SUCCESS with an nfsstat3, never GARBAGE_ARGS); ``only_valid`` draws no
    invalid choice at all (the seeds that mutations start from)."""

    def __init__(self, data: st.DataObject, handles: dict[str, bytes], codec: HandleCodec, only_valid: bool) -> None:
        self.data, self.handles, self.codec, self.only_valid = data, handles, codec, only_valid
        self.p = Packer()
        self.valid = True
        self.first_invalid = False  # the very first field is invalid: nothing can fail before it is decoded
        self.cut_at: int | None = None  # where the call ends when a length claims more than is sent

    @property
    def cut(self) -> bool:
        return self.cut_at is not None

    def bytes(self) -> bytes:
        return bytes(self.p.buf[: self.cut_at])

    def draw(self, strategy: st.SearchStrategy):
        return self.data.draw(strategy)

    def invalid(self, chance: bool = True) -> bool:
        """Whether to make this field invalid XDR (never in only_valid mode)."""
        if self.only_valid or self.cut or not chance:
            return False
        if self.draw(ONE_IN_TEN):
            self.first_invalid = self.valid and not self.p.buf
            self.valid = False
            return True
        return False

    def u32(self, edges: list[int] | None = None) -> int:
        v = self.draw(st.sampled_from(edges) | ANY_U32 if edges else U32)
        self.p.u32(v)
        return v

    def u64(self) -> int:
        v = self.draw(U64)
        self.p.u64(v)
        return v

    def enum(self, valid: range) -> int:
        if self.invalid():
            v = self.draw(st.sampled_from([valid.stop, valid.stop + 1, 2**31, 2**32 - 1]))
        else:
            v = self.draw(st.sampled_from(list(valid)))
        self.p.u32(v)
        return v

    def bool(self) -> bool:
        if self.invalid():
            self.p.u32(self.draw(st.sampled_from([2, 2**32 - 1])))
            return False
        v = self.draw(st.booleans())
        self.p.bool(v)
        return v

    def opaque(self, choices: list[bytes], maximum: int | None) -> None:
        """An opaque field: a listed or random value, or (invalid) over ``maximum`` or claiming more than sent."""
        if self.invalid():
            self.bad_opaque(maximum)
        else:
            self.p.opaque(self.draw(st.sampled_from(choices) | st.binary(max_size=maximum or 300)))

    def bad_opaque(self, maximum: int | None) -> None:
        kind = self.draw(st.sampled_from(["claims more", "huge claim"] + (["too long"] if maximum else [])))
        if kind == "too long":
            self.p.opaque(b"h" * self.draw(st.integers(maximum + 1, maximum + 40)))
            return
        sent = self.draw(st.binary(max_size=12))
        self.p.u32(len(sent) + 1 + self.draw(st.integers(0, 100)) if kind == "claims more" else 0xFFFFFFFF)
        self.p.buf += sent  # unpadded: the claim is more than every byte that follows
        self.cut_at = len(self.p.buf)

    def fh(self) -> None:
        keys = sorted(self.handles)
        if self.invalid():
            self.bad_opaque(64)
            return
        kind = self.draw(FH_KINDS)
        if kind == "real":
            fh = self.handles[self.draw(st.sampled_from(keys))]
        elif kind == "forged":  # a good MAC over a fileid/export that does not exist (a leaked secret)
            fh = self.codec.encode(
                self.draw(st.sampled_from([1, 2, 3, 99, 255])),
                ObjectId(self.draw(U64), self.draw(st.integers(0, 3))),
            )
        elif kind == "truncated":
            real = self.handles[self.draw(st.sampled_from(keys))]
            fh = real[: self.draw(st.integers(0, len(real) - 1))]
        elif kind == "random":
            fh = self.draw(st.binary(min_size=1, max_size=64))
        else:
            fh = b""
        self.p.opaque(fh)

    def name(self) -> None:
        if self.invalid():
            self.bad_opaque(None)
        else:
            self.p.opaque(self.draw(NAME))

    def path(self) -> None:
        self.opaque(PATHS, None)

    def time(self) -> None:
        how = self.enum(range(3))
        if how == 2:
            self.u32(), self.u32([0, 999_999_999, 10**9, 2**32 - 1])

    def sattr(self) -> None:
        for field_ in (self.u32, self.u32, self.u32, self.u64):  # mode, uid, gid, size
            if self.bool():
                field_()
        self.time()
        self.time()


def nfs_args(a: Args, proc: int) -> None:
    """RFC 1813's XXX3args for ``proc``, every field drawn hostile."""
    if proc == 0:
        return
    a.fh()
    if proc in (1, 5, 18, 19, 20):  # GETATTR READLINK FSSTAT FSINFO PATHCONF
        return
    if proc == 2:  # SETATTR: sattr3, sattrguard3
        a.sattr()
        if a.bool():
            a.u32(), a.u32()
    elif proc == 3:
        a.name()
    elif proc == 4:
        a.u32([0, 1, 0x3F, 0xFF, 2**32 - 1])
    elif proc == 6:
        a.u64(), a.u32([0, 1, 4096, RTMAX, RTMAX + 1, 2**31, 2**32 - 1])
    elif proc == 7:  # WRITE: offset, count, stable, data
        a.u64()
        data = a.draw(st.binary(max_size=64) | st.sampled_from([b"", b"z" * 8192]))
        a.p.u32(a.draw(st.sampled_from([len(data), len(data) + 1, 2**32 - 1]) | st.integers(0, 2**32 - 1)))
        a.enum(range(3))
        if a.invalid():
            a.p.u32(len(data) + a.draw(st.integers(1, 2**32 - 1 - len(data))))
            a.p.buf += data
            a.cut_at = len(a.p.buf)
        else:
            a.p.opaque(data)
    elif proc == 8:  # CREATE: name, createhow3
        a.name()
        if a.enum(range(3)) == 2:
            a.p.fixed(a.draw(st.binary(min_size=8, max_size=8)))
        else:
            a.sattr()
    elif proc == 9:
        a.name(), a.sattr()
    elif proc == 10:
        a.name(), a.sattr(), a.path()
    elif proc == 11:  # MKNOD: name, ftype3 and its mknoddata3 arm
        a.name()
        ftype = a.enum(range(1, 8)) if a.only_valid else a.u32(list(range(0, 10)))
        if ftype not in range(1, 8):
            a.valid = False
        if ftype in (3, 4):
            a.sattr(), a.u32(), a.u32()
        elif ftype in (6, 7):
            a.sattr()
    elif proc in (12, 13):
        a.name()
    elif proc == 14:
        a.name(), a.fh(), a.name()
    elif proc == 15:
        a.fh(), a.name()
    elif proc in (16, 17):  # cookie, cookieverf, [dircount], count
        a.u64(), a.u64()
        if proc == 17:
            a.u32()
        a.u32([0, 1, 511, 512, 4096, MiB, MiB + 1, 2**32 - 1])
    elif proc == 21:
        a.u64(), a.u32()
    if a.invalid(chance=bool(a.p.buf)):  # trailing garbage is tolerated; a missing tail is not
        a.cut_at = a.draw(st.integers(0, len(a.p.buf) - 1))


MNT_PATHS = [
    b"/export",
    b"/export/",
    b"/export/dir",
    b"/export/dir/inner",
    b"/export/file",
    b"/export/link",
    b"/export/escape",
    b"/export/escape/deep",
    b"/export/../canary",
    b"/export/dir/../../canary",
    b"/export/a\0b",
    b"/export/" + b"x" * 300,
    b"/nope",
    b"",
    b"/",
    b"/ds",
    b"/ds/vm",
    b"/ro",
    b"\xff\xfe",
    b"//export//dir//",
]


def mount_args(a: Args, proc: int) -> None:
    if proc in (1, 3):  # MNT, UMNT: dirpath<1024>
        a.opaque(MNT_PATHS, 1024)
    elif a.draw(st.booleans()):
        a.p.fixed(a.draw(st.binary(max_size=16)))  # void arguments: anything after them is ignored


NAME = st.sampled_from(NAMES * 2 + HOSTILE_NAMES) | st.binary(max_size=300)
CREDS = [auth_sys(), auth_sys(1000, 1000), (0, b""), auth_sys(65534, 65534)]


def fuzz_one(w: World, data: st.DataObject, only_valid: bool) -> tuple[int, int, bytes, Args]:
    prog = data.draw(st.sampled_from([NFS_PROGRAM] * 5 + [MOUNT_PROGRAM]))
    proc = data.draw(st.integers(0, 21 if prog == NFS_PROGRAM else 5))
    a = Args(data, w.handles(), w.codec, only_valid)
    (nfs_args if prog == NFS_PROGRAM else mount_args)(a, proc)
    return prog, proc, a.bytes(), a


@settings(max_examples=400, **PROFILE)
@given(st.data())
def test_hostile_arguments_get_well_formed_replies(world: World, data: st.DataObject) -> None:
    prog, proc, args, a = fuzz_one(world, data, only_valid=False)
    out = call(world, prog, proc, args, data.draw(st.sampled_from(CREDS)))
    if a.valid:
        assert out.accept == SUCCESS, f"valid XDR for prog {prog} proc {proc} got GARBAGE_ARGS: {args[:200]!r}"
    if a.first_invalid:
        assert out.accept == GARBAGE_ARGS, f"invalid XDR for prog {prog} proc {proc} was accepted: {args[:200]!r}"


@st.composite
def mutations(draw: st.DrawFn, args: bytes) -> bytes:
    buf = bytearray(args)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "word", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, len(buf)))
        if op == "flip" and buf:
            buf[min(at, len(buf) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "word":  # a hostile length/count/enum at an XDR word boundary
            at -= at % 4
            word = draw(st.sampled_from([0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0x00100001, 0x10000, 65, 256, 3]))
            buf[at : at + 4] = word.to_bytes(4, "big")
        elif op == "truncate":
            del buf[at:]
        elif op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del buf[at : at + draw(st.integers(1, 8))]
    return bytes(buf)


@settings(max_examples=300, **PROFILE)
@given(st.data())
def test_mutated_valid_calls_get_well_formed_replies(world: World, data: st.DataObject) -> None:
    prog, proc, args, _ = fuzz_one(world, data, only_valid=True)
    call(world, prog, proc, data.draw(mutations(args)))


@settings(max_examples=80, **PROFILE)
@given(st.data())
def test_valid_calls_succeed(world: World, data: st.DataObject) -> None:
    """The seeds of the mutations are valid XDR: the server decodes every one of them."""
    prog, proc, args, _ = fuzz_one(world, data, only_valid=True)
    assert call(world, prog, proc, args).accept == SUCCESS


def test_outside_is_untouched_so_far(world: World) -> None:
    """The module fixture checks this at the end too; this names the moment if a fuzz test broke out."""
    assert snapshot(world.tmp / "canary")["secret"][-1] == b"outside the export"
    assert sorted(p.name for p in world.tmp.iterdir()) == ["canary", "ds-cache", "ds-root", "ds-vm", "export", "ro"]


# --- golden cases ------------------------------------------------------------------------------------------
SATTR_NONE = bytes(24)  # six "don't set" arms


def sattr_size(size: int) -> bytes:
    return Packer().u32(0).u32(0).u32(0).u32(1).u64(size).u32(0).u32(0).bytes()


def nfs(w: World, proc: int, args: bytes) -> Outcome:
    return call(w, NFS_PROGRAM, proc, args)


def fh(w: World, key: str) -> bytes:
    return Packer().opaque(w.handles()[key]).bytes()


def name(raw: bytes) -> bytes:
    return Packer().opaque(raw).bytes()


def test_truncated_read_args_are_garbage(golden: World) -> None:
    args = fh(golden, "/export/file") + Packer().u64(0).u32(4096).bytes()
    assert nfs(golden, 6, args).status == 0
    for cut in (len(args) - 1, len(args) - 4, 20, 5, 0):
        assert nfs(golden, 6, args[:cut]).accept == GARBAGE_ARGS, cut
    assert nfs(golden, 6, Packer().u32(65).fixed(b"h" * 65).u64(0).u32(1).bytes()).accept == GARBAGE_ARGS


def test_read_count_is_clamped_to_rtmax(golden: World) -> None:
    info = nfs(golden, 19, fh(golden, "/export")).results()
    post_op_attr(info)
    rtmax = info.u32("rtmax")
    assert rtmax == RTMAX
    for key in ("/export/file", "/ds/vm/vm-flat.vmdk"):
        out = nfs(golden, 6, fh(golden, key) + Packer().u64(0).u32(2**32 - 1).bytes())
        assert out.status == 0
        r = out.results()
        post_op_attr(r)
        count, eof, data = r.u32(), r.bool(), r.opaque(2**32 - 1)
        assert count == len(data) == rtmax and not eof, key


def test_huge_claimed_lengths_allocate_nothing(golden: World) -> None:
    """A length believed from the wire would allocate it; every length is checked against the bytes sent."""
    for proc in range(1, 22):
        out = nfs(golden, proc, Packer().u32(0xFFFFFFF0).fixed(bytes(8)).bytes())  # the handle
        assert out.accept == GARBAGE_ARGS and out.peak < 256 * 1024, (proc, out.peak)
    for proc in (3, *range(8, 16)):  # the name (or LINK's second handle)
        out = nfs(golden, proc, fh(golden, "/export/dir") + b"\x7f\xff\xff\xff" + bytes(8))
        assert out.accept == GARBAGE_ARGS and out.peak < 256 * 1024, (proc, out.peak)
    out = call(golden, MOUNT_PROGRAM, 1, b"\xff\xff\xff\xf0" + bytes(8))
    assert out.accept == GARBAGE_ARGS and out.peak < 256 * 1024


BAD_NAMES = [
    (b"", Status.INVAL),
    (b"a/b", Status.INVAL),
    (b"/", Status.INVAL),
    (b"a\0b", Status.INVAL),
    (b"x" * 256, Status.NAMETOOLONG),
    ("\u00e9".encode() * 128, Status.NAMETOOLONG),
    (b"y" * 5000, Status.NAMETOOLONG),
]


def name_calls(w: World, raw: bytes) -> dict[str, tuple[int, bytes]]:
    """Every procedure that takes a filename3, with ``raw`` as that name in the empty directory 'sub'."""
    sub, file, n = fh(w, "/export/sub"), fh(w, "/export/file"), name(raw)
    return {
        "LOOKUP": (3, sub + n),
        "CREATE": (8, sub + n + Packer().u32(0).bytes() + SATTR_NONE),
        "MKDIR": (9, sub + n + SATTR_NONE),
        "SYMLINK": (10, sub + n + SATTR_NONE + name(b"file")),
        "MKNOD": (11, sub + n + Packer().u32(7).bytes() + SATTR_NONE),
        "REMOVE": (12, sub + n),
        "RMDIR": (13, sub + n),
        "RENAME from": (14, sub + n + sub + name(b"new")),
        "RENAME to": (14, fh(w, "/export/dir") + name(b"inner") + sub + n),
        "LINK": (15, file + sub + n),
    }


@pytest.mark.parametrize("raw,status", BAD_NAMES, ids=lambda v: repr(v)[:20])
def test_names_that_are_not_one_component_are_refused(golden: World, raw: bytes, status: Status) -> None:
    for what, (proc, args) in name_calls(golden, raw).items():
        assert nfs(golden, proc, args).status == status, what
    assert not os.listdir(golden.tmp / "export" / "sub")
    assert (golden.tmp / "export" / "dir" / "inner").exists()


def test_dot_names_resolve_in_lookup_and_are_refused_elsewhere(golden: World) -> None:
    expected = {
        "LOOKUP": Status.OK,
        "CREATE": Status.EXIST,
        "MKDIR": Status.EXIST,
        "SYMLINK": Status.EXIST,
        "MKNOD": Status.EXIST,
        "LINK": Status.EXIST,
        "REMOVE": Status.ACCES,
        "RMDIR": Status.ACCES,
        "RENAME from": Status.ACCES,
        "RENAME to": Status.ACCES,
    }
    for raw in (b".", b".."):
        for what, (proc, args) in name_calls(golden, raw).items():
            assert nfs(golden, proc, args).status == expected[what], (raw, what)
    assert (golden.tmp / "export" / "sub").is_dir() and (golden.tmp / "export" / "dir" / "inner").exists()


def test_longest_name_works(golden: World) -> None:
    calls = name_calls(golden, b"n" * 255)
    assert nfs(golden, *calls["CREATE"]).status == 0
    assert nfs(golden, *calls["LOOKUP"]).status == 0
    assert nfs(golden, *calls["REMOVE"]).status == 0


@pytest.mark.parametrize(
    "target,status", [(b"", Status.INVAL), (b"a\0b", Status.INVAL), (b"t" * 4097, Status.NAMETOOLONG)]
)
def test_bad_symlink_data_is_refused(golden: World, target: bytes, status: Status) -> None:
    args = fh(golden, "/export/sub") + name(b"s") + SATTR_NONE + name(target)
    assert nfs(golden, 10, args).status == status
    assert not os.listdir(golden.tmp / "export" / "sub")


def test_sizes_and_offsets_beyond_any_file(golden: World) -> None:
    for key in ("/export/file", "/ds/vm/vm-flat.vmdk"):
        out = nfs(golden, 6, fh(golden, key) + Packer().u64(2**64 - 1).u32(4096).bytes())
        assert out.status == 0, key
        r = out.results()
        post_op_attr(r)
        assert (r.u32(), r.bool(), bytes(r.opaque(4096))) == (0, True, b""), key
        for offset in (2**64 - 4, 2**63 - 2):
            out = nfs(golden, 7, fh(golden, key) + Packer().u64(offset).u32(4).u32(2).opaque(b"abcd").bytes())
            assert out.status == Status.FBIG, (key, offset)
        assert nfs(golden, 2, fh(golden, key) + sattr_size(2**64 - 1) + bytes(4)).status == Status.FBIG, key
    create = fh(golden, "/export/sub") + name(b"big") + Packer().u32(0).bytes() + sattr_size(2**63)
    assert nfs(golden, 8, create).status == Status.FBIG
    assert not os.listdir(golden.tmp / "export" / "sub")
    assert (golden.tmp / "export" / "file").stat().st_size == 3 * MiB


def test_datastore_disk_grows_only_within_its_bound(golden: World) -> None:
    """A legal offset far past the published disk would grow the write cache's block map in memory."""
    extent = fh(golden, "/ds/vm/vm-flat.vmdk")
    for offset in (2**40, 2**50, 2**62):
        out = nfs(golden, 7, extent + Packer().u64(offset).u32(4).u32(2).opaque(b"abcd").bytes())
        assert out.status == Status.FBIG and out.peak < MiB, (offset, out.peak)
        out = nfs(golden, 2, extent + sattr_size(offset) + bytes(4))  # no guard
        assert out.status == Status.FBIG and out.peak < MiB, (offset, out.peak)


@pytest.mark.parametrize(
    "path,stat",
    [
        (b"/export/a\0b", 22),
        (b"/export/" + b"x" * 300, 63),
        (b"/export/file", 20),
        (b"/export/escape", 20),
        (b"/export/escape/deep", 20),
        (b"/export/../canary", 2),
        (b"/export/dir", 0),
    ],
)
def test_mount_paths(golden: World, path: bytes, stat: int) -> None:
    assert call(golden, MOUNT_PROGRAM, 1, name(path)).status == stat
