"""Index objects of packs are hostile input: every damage, forgery and bound is refused with one IntegrityError
naming the key, before anything large is allocated; ``PackIndex`` merges many of them, first record of a chunk
id kept, and answers lookups in other threads while it merges (appliance/repo/packindex.py)."""

from __future__ import annotations

import random
import struct
import threading
import tracemalloc

import pytest
import zstandard

from appliance.errors import IntegrityError, UnsupportedFormatError
from appliance.repo import objects
from appliance.repo.keys import RepoKey
from appliance.repo.packindex import (
    INDEX_MAGIC,
    MAX_RECORDS,
    RECORD,
    PackIndex,
    PackRecord,
    decode_index,
    encode_index,
    index_key,
    pack_key,
)

KEY = "index/0123456789abcdef0123456789abcdef-0.idx"
MAX_LENGTH = 1 << 20
PLAIN = objects.Envelope()


def sealed_envelope() -> objects.Envelope:
    return objects.Envelope(RepoKey.generate().aead)


@pytest.fixture(params=["plain", "encrypted"])
def envelope(request: pytest.FixtureRequest) -> objects.Envelope:
    return PLAIN if request.param == "plain" else sealed_envelope()


def make_records(n: int, seed: int, packs: int = 3) -> list[PackRecord]:
    rnd = random.Random(seed)
    pack_ids = [rnd.randbytes(16) for _ in range(packs)]
    return [PackRecord(rnd.randbytes(32), rnd.choice(pack_ids), 4096 * i, 1 + rnd.randrange(4096)) for i in range(n)]


def payload(records: list[PackRecord]) -> bytes:
    """The raw records of ``records`` in their order (a decode_index payload when sorted)."""
    return b"".join(RECORD.pack(r.chunk, r.pack, r.offset, r.length) for r in records)


def forge(raw: bytes, envelope: objects.Envelope = PLAIN, key: str = KEY) -> bytes:
    """A well-framed index object around any payload ``raw``: encode_index's checks bypassed."""
    inner = objects.seal(INDEX_MAGIC, raw, zstandard.ZstdCompressor(level=3).compress(raw))
    return envelope.wrap(INDEX_MAGIC, inner, key.encode())


def forge_records(records: list[PackRecord], count: int | None = None) -> bytes:
    return forge(struct.pack(">I", len(records) if count is None else count) + payload(records))


def unpack_all(data: bytes) -> list[PackRecord]:
    return [PackRecord(*RECORD.unpack_from(data, i)) for i in range(0, len(data), RECORD.size)]


def test_round_trip_sorts_and_keeps_one_record_per_chunk(envelope: objects.Envelope) -> None:
    recs = make_records(500, seed=1)
    dup = PackRecord(recs[7].chunk, recs[9].pack, 1, 1)
    blob = encode_index([*recs, dup], envelope, KEY)
    got = unpack_all(decode_index(blob, envelope, KEY, MAX_LENGTH))
    assert got == sorted(recs, key=lambda r: r.chunk)
    assert (b"BBIX" + bytes([objects.ENCRYPTED_VERSION if envelope.encrypted else objects.SEALED_VERSION])) == blob[:5]
    assert recs[7].chunk not in blob or not envelope.encrypted  # encrypted: no id in clear


def test_names() -> None:
    rec = make_records(1, seed=2)[0]
    h = rec.pack.hex()
    assert rec.pack_key == pack_key(rec.pack) == f"packs/{h[:2]}/{h}"
    assert rec.chunk_hex == rec.chunk.hex()
    assert index_key("ab" * 16, 3) == f"index/{'ab' * 16}-3.idx"
    with pytest.raises(ValueError, match="bad index name"):
        index_key("../x", 0)


def test_index_moved_to_another_key_fails() -> None:
    env = sealed_envelope()
    blob = encode_index(make_records(10, seed=3), env, KEY)
    other = KEY.replace("-0.idx", "-1.idx")
    with pytest.raises(IntegrityError, match=f"index {other}: authentication failed"):
        decode_index(blob, env, other, MAX_LENGTH)


def test_one_flipped_byte_anywhere_or_a_cut_fails(envelope: objects.Envelope) -> None:
    blob = encode_index(make_records(40, seed=4), envelope, KEY)
    for i in range(len(blob)):
        damaged = bytearray(blob)
        damaged[i] ^= 0x01
        with pytest.raises(IntegrityError, match=f"index {KEY}: "):
            decode_index(bytes(damaged), envelope, KEY, MAX_LENGTH)
    for cut in range(len(blob)):
        with pytest.raises(IntegrityError, match=f"index {KEY}: "):
            decode_index(blob[:cut], envelope, KEY, MAX_LENGTH)


def test_bytes_after_the_object_fail() -> None:
    blob = encode_index(make_records(5, seed=5), PLAIN, KEY)
    with pytest.raises(IntegrityError, match=f"index {KEY}: 1 bytes after the sealed object"):
        decode_index(blob + b"x", PLAIN, KEY, MAX_LENGTH)


def test_newer_version_is_unsupported() -> None:
    blob = bytearray(encode_index(make_records(5, seed=6), PLAIN, KEY))
    blob[4] = objects.NEWEST_VERSION + 1
    with pytest.raises(UnsupportedFormatError, match=f"index {KEY}: object version 4 is newer"):
        decode_index(bytes(blob), PLAIN, KEY, MAX_LENGTH)


@pytest.mark.parametrize("fault", ["unsorted", "duplicate"])
def test_unsorted_or_duplicate_records_fail(fault: str) -> None:
    recs = sorted(make_records(20, seed=7), key=lambda r: r.chunk)
    if fault == "unsorted":
        recs[11], recs[12] = recs[12], recs[11]
        why = f"record 12: chunk {recs[12].chunk.hex()} is smaller than the one before"
    else:
        recs[12] = PackRecord(recs[11].chunk, recs[12].pack, 0, 5)
        why = f"record 12: chunk {recs[12].chunk.hex()} repeats the one before"
    with pytest.raises(IntegrityError, match=f"index {KEY}: {why}"):
        decode_index(forge_records(recs), PLAIN, KEY, MAX_LENGTH)


@pytest.mark.parametrize("count", [19, 21, 0, MAX_RECORDS + 1])
def test_count_not_matching_the_records_fails(count: int) -> None:
    recs = sorted(make_records(20, seed=8), key=lambda r: r.chunk)
    why = f"{count} records, an index object holds at most" if count > MAX_RECORDS else f"says {count} records"
    with pytest.raises(IntegrityError, match=f"index {KEY}: {why}"):
        decode_index(forge_records(recs, count), PLAIN, KEY, MAX_LENGTH)
    with pytest.raises(IntegrityError, match=f"index {KEY}: 3 payload bytes"):
        decode_index(forge(b"\0\0\0"), PLAIN, KEY, MAX_LENGTH)


@pytest.mark.parametrize(
    ("offset", "length", "why"),
    [
        (0, 0, "length 0, a chunk object has 1 to"),
        (0, MAX_LENGTH + 1, f"length {MAX_LENGTH + 1}, a chunk object has 1 to {MAX_LENGTH}"),
        ((1 << 63) - 10, 11, f"offset {(1 << 63) - 10} \\+ length 11 > 2\\^63"),
        ((1 << 64) - 1, 1, "offset 18446744073709551615 \\+ length 1"),
    ],
)
def test_record_out_of_bounds_fails(offset: int, length: int, why: str) -> None:
    recs = sorted(make_records(20, seed=9), key=lambda r: r.chunk)
    recs[13] = PackRecord(recs[13].chunk, recs[13].pack, offset, length)
    with pytest.raises(IntegrityError, match=f"index {KEY}: record 13 \\(chunk {recs[13].chunk.hex()}\\): {why}"):
        decode_index(forge_records(recs), PLAIN, KEY, MAX_LENGTH)


def test_edge_records_in_bounds_pass() -> None:
    recs = sorted(make_records(3, seed=10), key=lambda r: r.chunk)
    recs[0] = PackRecord(recs[0].chunk, recs[0].pack, 0, 1)
    recs[1] = PackRecord(recs[1].chunk, recs[1].pack, (1 << 63) - MAX_LENGTH, MAX_LENGTH)
    assert unpack_all(decode_index(forge_records(recs), PLAIN, KEY, MAX_LENGTH)) == recs


def test_encode_refuses_more_than_max_records_and_bad_records() -> None:
    pack = bytes(16)

    def many() -> object:
        for i in range(MAX_RECORDS + 1):
            yield PackRecord(i.to_bytes(32, "big"), pack, i, 1)

    with pytest.raises(ValueError, match=f"more than {MAX_RECORDS} records"):
        encode_index(many(), PLAIN, KEY)  # type: ignore[arg-type]
    for bad in (PackRecord(bytes(31), pack, 0, 1), PackRecord(bytes(32), pack, 0, 0)):
        with pytest.raises(ValueError, match="record"):
            encode_index([bad], PLAIN, KEY)


def forged_header(encrypted: bool) -> bytes:
    """A small object whose header announces 1 TiB."""
    huge = 1 << 40
    if encrypted:
        header = struct.pack(">4sBBHQ12s", INDEX_MAGIC, objects.ENCRYPTED_VERSION, 1, 0, huge, bytes(12))
    else:
        header = struct.pack(">4sBBHQQ32s", INDEX_MAGIC, objects.SEALED_VERSION, 1, 0, huge, huge, bytes(32))
    return header + bytes(64)


@pytest.mark.parametrize("encrypted", [False, True])
def test_header_announcing_a_huge_size_is_refused_before_allocation(encrypted: bool) -> None:
    env = sealed_envelope() if encrypted else PLAIN
    why = "envelope says 1099511627776 bytes" if encrypted else "header says 1099511627776 bytes, more than"
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError, match=f"index {KEY}: {why}"):
            decode_index(forged_header(encrypted), env, KEY, MAX_LENGTH)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_zstd_frame_announcing_more_than_the_header_is_refused() -> None:
    raw = bytes(4)
    bomb = zstandard.ZstdCompressor().compress(bytes(1 << 20))
    header = struct.pack(">4sBBHQQ32s", INDEX_MAGIC, 2, 1, 0, len(raw), len(bomb), bytes(32))
    with pytest.raises(IntegrityError, match=f"index {KEY}: .*more than zstd makes|declares {1 << 20} bytes"):
        decode_index(header + bomb, PLAIN, KEY, MAX_LENGTH)


# --- PackIndex ---------------------------------------------------------------------------------------------------


def sorted_payload(recs: list[PackRecord]) -> bytes:
    return payload(sorted(recs, key=lambda r: r.chunk))


def test_merge_of_several_payloads_keeps_the_first_record_of_a_chunk() -> None:
    """Balanced merges (both sides large), lopsided ones (a few records into many, many into a few), and
    duplicates across payloads, checked against a plain dict."""
    index = PackIndex()
    expected: dict[bytes, PackRecord] = {}
    a, b, few, many = (make_records(n, seed=s) for n, s in ((3000, 20), (3000, 21), (40, 22), (100_000, 23)))

    def again(recs: list[PackRecord], seed: int) -> list[PackRecord]:  # same chunk ids, other places
        return [PackRecord(r.chunk, bytes(16), 7, 9) for r in recs] + make_records(10, seed=seed)

    groups = [a, b, again(a[::3], 24), few, many, again(many[::5000], 25)]  # balanced merges, then lopsided
    first = PackIndex()
    first.add(sorted_payload(many))  # many first, then a few into many
    first.add(sorted_payload(few))
    try:
        for recs in groups:
            index.add(sorted_payload(recs))
            for r in recs:
                expected.setdefault(r.chunk, r)
        assert len(index) == len(expected)
        assert list(index.records()) == [expected[c] for c in sorted(expected)]
        for r in groups[2][:-10] + groups[5][:-10]:  # a later record of a chunk id: the first one is found
            assert index.find(r.chunk) == expected[r.chunk] != r
        assert sorted(first.records(), key=lambda r: r.chunk) == list(first.records())
        assert len(first) == 100_040
    finally:
        index.close()
        first.close()
    assert len(index) == 0 and index.find(a[0].chunk) is None


def test_find_of_absent_ids() -> None:
    inner = [r for r in make_records(1000, seed=30) if 1 < r.chunk[0] < 0xFE]
    ends = [PackRecord(b"\x01" + bytes(31), bytes(16), 0, 1), PackRecord(b"\xfe" + bytes(31), bytes(16), 0, 1)]
    recs = sorted(inner + ends, key=lambda r: r.chunk)
    index = PackIndex()
    assert index.find(recs[0].chunk) is None  # empty
    index.add(payload(recs))
    try:
        for r in recs:
            assert index.find(r.chunk) == r
        between = bytearray(recs[500].chunk)
        between[-1] ^= 1  # next to a present id (ids are random: nothing else is that close)
        for absent in (bytes(32), b"\x00" + b"\xff" * 31, b"\xff" * 32, b"\xfe" + bytes(30) + b"\x01", bytes(between)):
            assert index.find(absent) is None
        assert index.find(b"\xfe" + bytes(31) + b"\x00") is None  # not an id's length
    finally:
        index.close()


def test_add_refuses_a_payload_that_is_not_sorted_records() -> None:
    recs = sorted(make_records(10, seed=31), key=lambda r: r.chunk)
    index = PackIndex()
    with pytest.raises(ValueError, match="not strictly sorted"):
        index.add(payload(recs[::-1]))
    with pytest.raises(ValueError, match="not whole 60-byte records"):
        index.add(payload(recs)[:-1])
    assert len(index) == 0


def test_find_in_other_threads_while_adding() -> None:
    """Lookups never see a half-merged file: every present id is found, every time, during five merges."""
    base = make_records(10_000, seed=40)
    index = PackIndex()
    index.add(sorted_payload(base))
    probes = base[::97]
    failures: list[str] = []
    stop = threading.Event()
    lookups = 0

    def reader() -> None:
        nonlocal lookups
        while not stop.is_set():
            for r in probes:
                try:
                    got = index.find(r.chunk)
                except Exception as exc:  # noqa: BLE001 - reported by the test, not lost in the thread
                    got = exc
                if got != r:
                    failures.append(f"{r.chunk.hex()}: {got!r}")
                    return
                lookups += 1

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for seed in range(41, 46):
            index.add(sorted_payload(make_records(10_000, seed=seed)))
    finally:
        stop.set()
        for t in threads:
            t.join()
        index.close()
    assert not failures, failures[:3]
    assert lookups > len(probes)
