"""A backup to a remote store stores its full packs from threads of their own (``PackWriter(uploads=N)``): at most
N packs held at once, every pack stored before ``flush`` returns, and a failed store fails the backup, which then
commits no restore point."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.ingest.backup import backup_vm
from appliance.repo import Repository
from appliance.repo.packs import PackWriter
from tests.unit.packs_support import CS, disk, src

BLOB = b"x" * 100


def stage_through(
    repo: Repository,
    monkeypatch: pytest.MonkeyPatch,
    stage: Callable[[Callable[[str, bytes], None], str, bytes], None],
) -> None:
    """Make every backup's batch of ``repo`` store through ``stage(real_stage, key, blob)``."""
    real = repo.backend.writer

    @contextlib.contextmanager
    def writer() -> Iterator[object]:
        with real() as batch:
            inner = batch.stage
            monkeypatch.setattr(batch, "stage", lambda key, blob: stage(inner, key, blob))
            yield batch

    monkeypatch.setattr(repo.backend, "writer", writer)


def test_every_pack_is_stored_before_flush_returns() -> None:
    stored: dict[str, bytes] = {}

    def put(key: str, data: bytes) -> None:
        time.sleep(0.01)  # a slow store: flush must still wait for it
        stored[key] = data

    writer = PackWriter(put, target=300, uploads=2)
    for n in range(20):
        writer.add(n.to_bytes(32, "big"), BLOB)
    writer.flush()
    assert len(stored) == 7  # 6 full packs of 3 objects, the last one of 2
    assert sum(len(d) for d in stored.values()) == 20 * len(BLOB)
    packs = {r.pack_key for r in writer.iter_records()}
    assert packs == set(stored)


def test_at_most_uploads_packs_are_held() -> None:
    release = threading.Event()
    holding, most = 0, 0
    lock = threading.Lock()

    def put(key: str, data: bytes) -> None:
        nonlocal holding, most
        with lock:
            holding += 1
            most = max(most, holding)
        release.wait(5)
        with lock:
            holding -= 1

    writer = PackWriter(put, target=100, uploads=2)
    adder = threading.Thread(target=lambda: [writer.add(n.to_bytes(32, "big"), BLOB) for n in range(6)])
    adder.start()
    time.sleep(0.3)
    assert adder.is_alive(), "the appender went on past two packs held"
    release.set()
    adder.join(5)
    writer.flush()
    assert most == 2


def test_a_failed_store_is_raised_by_the_next_add_or_flush() -> None:
    def put(key: str, data: bytes) -> None:
        raise OSError("the store went away")

    writer = PackWriter(put, target=100, uploads=2)
    writer.add(b"\1" * 32, BLOB)  # fills a pack: stored in the background, fails there
    with pytest.raises(OSError, match="went away"):
        for n in range(50):  # a later add sees the failure
            writer.add(n.to_bytes(32, "big"), BLOB)
            time.sleep(0.01)
    with pytest.raises(OSError, match="went away"):
        writer.flush()


def test_a_backup_whose_pack_cannot_be_stored_commits_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS, packs=True)
    monkeypatch.setattr(repo.backend, "remote", True)  # as S3: packs stored by their own threads

    def stage_failing(stage: Callable[[str, bytes], None], key: str, blob: bytes) -> None:
        if key.startswith("packs/"):
            raise OSError("no space left for packs")
        stage(key, blob)

    stage_through(repo, monkeypatch, stage_failing)
    with pytest.raises(OSError, match="no space left for packs"):
        backup_vm(repo, "vm", [src(disk(40, seed=3))])
    assert Repository.open(repo.path).list_points().points == []
    assert not [t for t in threading.enumerate() if t.name.startswith("pack-upload")]


def test_a_failed_upload_with_more_appenders_waiting_than_slots_fails_them_all() -> None:
    """An appender that filled a pack waits for an upload slot; when an upload fails, each waiter takes a slot,
    sees the failure and raises without giving the slot back, so with more waiters than slots the rest wait
    forever (a backup's pool then never shuts down: the backup hangs instead of failing)."""
    go = threading.Event()
    calls = 0

    def put(key: str, data: bytes) -> None:
        nonlocal calls
        calls += 1
        go.wait(5)
        raise OSError("the store went away")

    writer = PackWriter(put, target=len(BLOB), uploads=1)  # every add fills a pack
    writer.add(b"\0" * 32, BLOB)  # its upload holds the only slot until ``go``
    outcomes: list[BaseException | None] = []

    def append(n: int) -> None:
        try:
            writer.add(n.to_bytes(32, "big"), BLOB)
            outcomes.append(None)
        except OSError as exc:
            outcomes.append(exc)

    appenders = [threading.Thread(target=append, args=(n,), daemon=True) for n in (1, 2)]
    for t in appenders:
        t.start()
    time.sleep(0.3)  # both took a full pack and wait for a slot
    go.set()
    for t in appenders:
        t.join(3)
    hung = [t for t in appenders if t.is_alive()]
    for _ in hung:
        writer._slots.release()  # let the stuck one go (it raises the failure)
    writer.close()
    assert not hung, "an appender waits forever for an upload slot after an upload failed"
    assert len(outcomes) == 2 and all(isinstance(o, OSError) for o in outcomes)


def test_a_backup_whose_pack_upload_fails_while_appenders_wait_fails_rather_than_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same through ``backup_vm`` on a store that says it is remote: a slow pack upload that fails while
    more workers than upload slots wait with a full pack. The backup must fail; it hangs in its pool's shutdown."""
    monkeypatch.setattr("appliance.repo.packs.UPLOADS", 1)
    monkeypatch.setattr("appliance.repo.packs.PACK_TARGET", CS // 2)  # every chunk fills a pack
    repo = Repository.init(tmp_path / "repo", chunk_size=CS, packs=True)
    monkeypatch.setattr(repo.backend, "remote", True)

    def slow_failing(stage: Callable[[str, bytes], None], key: str, blob: bytes) -> None:
        time.sleep(0.5)  # slow: the workers fill packs meanwhile and wait for the slot
        raise OSError("the store went away")

    stage_through(repo, monkeypatch, slow_failing)
    writers: list[PackWriter] = []
    made = PackWriter.__init__

    def recording_init(self: PackWriter, *args: object, **kwargs: object) -> None:
        made(self, *args, **kwargs)  # type: ignore[arg-type]
        writers.append(self)

    monkeypatch.setattr(PackWriter, "__init__", recording_init)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            backup_vm(repo, "vm", [src(disk(40, seed=8))], workers=4)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - what the backup ended with
            outcome.append(exc)

    backup = threading.Thread(target=run, daemon=True)
    backup.start()
    backup.join(10)
    hung = backup.is_alive()
    while backup.is_alive():  # free the stuck workers, or the interpreter waits for them at exit
        for writer in writers:
            with contextlib.suppress(ValueError):
                writer._slots.release()
        backup.join(0.2)
    assert not hung, "the backup hangs after a pack upload failed"
    assert isinstance(outcome[0], OSError)
