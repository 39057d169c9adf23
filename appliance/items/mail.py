"""Mail item recovery: messages of a backed-up Maildir or mbox listed, searched, exported, restored into a Maildir.

Python's ``mailbox`` reads the store (on a copy-on-write view, so a large store is fetched lazily and the backup
is never written); ``email`` parses the headers. A message's id is ``FOLDER/KEY``: the Maildir file's unique
name, or the message's position in an mbox, so it stays the same for the same restore point.
"""

from __future__ import annotations

import email.policy
import mailbox
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from email.parser import BytesHeaderParser
from email.utils import parsedate_to_datetime
from pathlib import Path

from appliance.errors import ItemRecoveryError

INBOX = "INBOX"
FOLDER = re.compile(r"[^/\x00-\x1f\x7f]{1,200}")  # a Maildir++ subfolder: its directory is ".NAME", never a path


def check_folder(folder: str | None) -> None:
    """A Maildir++ subfolder's name: its directory is '.' + the name, so no '/' may lead it elsewhere."""
    if folder is not None and not FOLDER.fullmatch(folder):
        raise ItemRecoveryError(f"into folder: {folder[:80]!r} is not a Maildir++ folder name (no '/', printable)")


_headers = BytesHeaderParser(policy=email.policy.compat32)


@dataclass(frozen=True)
class Message:
    id: str  # FOLDER/KEY
    folder: str
    sender: str
    subject: str
    date: datetime | None
    size: int

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "folder": self.folder,
            "from": self.sender,
            "subject": self.subject,
            "date": self.date.isoformat() if self.date else None,
            "size": self.size,
        }


@dataclass(frozen=True)
class Filter:
    folder: str | None = None
    sender: str | None = None  # substring, any case
    subject: str | None = None
    since: date | None = None  # inclusive, by the Date header in UTC
    until: date | None = None
    ids: tuple[str, ...] = ()

    def matches(self, m: Message) -> bool:
        if self.ids and m.id not in self.ids:
            return False
        if self.folder is not None and m.folder != self.folder:
            return False
        if self.sender and self.sender.lower() not in m.sender.lower():
            return False
        if self.subject and self.subject.lower() not in m.subject.lower():
            return False
        if self.since or self.until:
            if m.date is None:
                return False
            day = m.date.astimezone(UTC).date()
            if (self.since and day < self.since) or (self.until and day > self.until):
                return False
        return True


def parse_day(text: str | None, option: str) -> date | None:
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ItemRecoveryError(f"{option} expects a date like 2026-03-01, got {text[:40]!r}") from None


def _text(value: object) -> str:
    """A header as readable text: RFC 2047 encoded words decoded, folding removed."""
    if value is None:
        return ""
    from email.header import decode_header, make_header

    try:
        return str(make_header(decode_header(str(value)))).replace("\n", " ").replace("\r", "")
    except Exception:  # noqa: BLE001 - a malformed encoded word: show it as it is
        return str(value).replace("\n", " ")


def _date(value: object) -> datetime | None:
    try:
        when = parsedate_to_datetime(str(value)) if value else None
    except (TypeError, ValueError, IndexError):
        return None
    if when is not None and when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when


class Store:
    """One Maildir (with its Maildir++ subfolders) or one mbox file, opened read-only at ``path``."""

    def __init__(self, path: Path, kind: str) -> None:
        self.kind = kind
        if kind == "maildir":
            root = mailbox.Maildir(path, factory=None, create=False)
            self.folders: dict[str, mailbox.Mailbox] = {INBOX: root}
            for name in sorted(root.list_folders()):
                self.folders[name] = root.get_folder(name)
        elif kind == "mbox":
            self.folders = {path.name: mailbox.mbox(path, factory=None, create=False)}
        else:
            raise ItemRecoveryError(f"not a mail store: {kind}")

    def messages(self) -> list[Message]:
        out = []
        for folder, box in self.folders.items():
            for key in sorted(box.keys(), key=lambda k: (len(str(k)), str(k))):
                raw = box.get_bytes(key)
                head = _headers.parsebytes(raw)
                out.append(
                    Message(
                        f"{folder}/{key}",
                        folder,
                        _text(head.get("From")),
                        _text(head.get("Subject")),
                        _date(head.get("Date")),
                        len(raw),
                    )
                )
        return sorted(out, key=lambda m: (m.folder != INBOX, m.folder, m.date or datetime.min.replace(tzinfo=UTC)))

    def select(self, flt: Filter) -> list[Message]:
        if flt.folder is not None and flt.folder not in self.folders:
            raise ItemRecoveryError(f"no folder {flt.folder!r} (folders: {', '.join(self.folders)})")
        msgs = self.messages()
        known = {m.id for m in msgs}
        missing = [i for i in flt.ids if i not in known]
        if missing:
            raise ItemRecoveryError(f"no message {missing[0]!r} in this mail store (see --list for ids)")
        return [m for m in msgs if flt.matches(m)]

    def raw(self, m: Message) -> bytes:
        box = self.folders[m.folder]
        key = m.id[len(m.folder) + 1 :]
        return box.get_bytes(key if self.kind == "maildir" else int(key))

    def _get(self, m: Message) -> mailbox.Message:
        box = self.folders[m.folder]
        key = m.id[len(m.folder) + 1 :]
        return box.get_message(key if self.kind == "maildir" else int(key))

    # outputs ---------------------------------------------------------------------------------------------
    def export(
        self, msgs: list[Message], out: Path, fmt: str, claim: Callable[[int], None] = lambda size: None
    ) -> None:
        """``out`` is a fresh file: one message as .eml (its bytes as stored), or any number as mbox. ``claim(n)``
        runs before each message's n bytes are written (the work directory's space guard)."""
        if not msgs:
            raise ItemRecoveryError("no message matches: nothing to export")
        if fmt == "eml":
            if len(msgs) != 1:
                raise ItemRecoveryError(f"an .eml file holds one message; {len(msgs)} match (use --format mbox)")
            raw = self.raw(msgs[0])
            claim(len(raw))
            out.write_bytes(raw)
            return
        if fmt != "mbox":
            raise ItemRecoveryError(f"unknown export format {fmt!r} (eml or mbox)")
        box = mailbox.mbox(out, create=True)
        try:
            box.lock()
            for m in msgs:
                claim(len(self.raw(m)))
                box.add(mailbox.mboxMessage(self._get(m)))
            box.flush()
        finally:
            box.unlock()
            box.close()

    def restore(self, msgs: list[Message], dest: Path, folder: str | None = None, parents: bool = False) -> int:
        """Into the Maildir ``dest`` (created when missing, with its parents too when ``parents``), or its
        Maildir++ subfolder ``folder``, flags kept."""
        check_folder(folder)
        if not msgs:
            raise ItemRecoveryError("no message matches: nothing to restore")
        if dest.exists() and not (dest / "cur").is_dir():
            raise ItemRecoveryError(f"{dest} exists and is not a Maildir (no cur/ in it)")
        if parents:
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not dest.parent.is_dir():
            raise ItemRecoveryError(f"no such directory: {dest.parent}")
        target = mailbox.Maildir(dest, factory=None, create=True)
        if folder:
            target = target.get_folder(folder) if folder in target.list_folders() else target.add_folder(folder)
        for m in msgs:
            target.add(mailbox.MaildirMessage(self._get(m)))
        return len(msgs)
