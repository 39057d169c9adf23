"""Keys of encrypted repositories: the master key, what is derived from it, and where it is kept.

A repository encrypted at ``init`` has one random 256-bit *master key*. Two keys are derived from it with
HKDF-SHA256 (different ``info``): the AES-256-GCM key that seals every object (``objects.encrypt``), and the
HMAC-SHA256 key that names chunks (``RepoKey.chunk_id``), so a chunk's id says nothing about its content to
someone without the key. A third derived value, the *key check* (an HMAC of the repository id), sits in
``config.json``, so a wrong key file is refused at open with one clear line, not as damage on the first read.

The master key is kept either in ``config.json`` wrapped by a passphrase (scrypt, then AES-256-GCM with the
repository id as associated data), or only in a key file outside the repository (``--key-file``); ``bootback key
export`` writes a key file, ``bootback key import`` wraps a key file's key with a (new) passphrase.
Everything cryptographic is the ``cryptography`` package's; this module only chooses and stores.
"""

from __future__ import annotations

import base64
import getpass
import hmac
import json
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import IntegrityError, RepositoryKeyError, UsageError
from appliance.repo import safefile

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# cryptography is imported where a key is made or used (below): the commands that take none start without it.

AES_256_GCM = "aes-256-gcm"
NONE = "none"
ALGORITHMS = (AES_256_GCM, NONE)
CHUNK_ID_HMAC = "hmac-sha256"
PASSPHRASE_ENV = "BOOTBACK_PASSPHRASE"
# A file holding the passphrase (a container's secret mount): not in the environment, where `docker inspect` shows it
PASSPHRASE_FILE_ENV = "BOOTBACK_PASSPHRASE_FILE"
MAX_PASSPHRASE_BYTES = 4096
KEY_FILE_ENV = "BOOTBACK_KEY_FILE"  # one or more key files, separated by ':'
ENCRYPTION_ENV = "BOOTBACK_ENCRYPTION"  # the operator's standing choice for init (e.g. "none")
KEY_FILE_MAGIC = "bootback-key"
MASTER_LEN = 32
MAX_KEY_FILE_BYTES = 64 << 10
KEY_FILE_REFUSED_MODE = 0o027  # group-writable or any access by others (a group-readable secret mount is kept)
# scrypt: 128 MiB and ~0.6 s here per open; a config may ask for more, within bounds a hostile one cannot abuse
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 17, 8, 1
_MAX_SCRYPT_MEMORY = 1 << 30  # 128 * n * r bytes
_MAX_SCRYPT_WORK = 1 << 24  # n * r * p: 16 times the default


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise RepositoryKeyError(f"{what}: expected base64 text, found {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise RepositoryKeyError(f"{what}: not base64") from None


def _aesgcm(key: bytes) -> AESGCM:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def _derive(master: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)


class RepoKey:
    """A repository's master key and the keys derived from it."""

    def __init__(self, master: bytes) -> None:
        if len(master) != MASTER_LEN:
            raise RepositoryKeyError(f"a repository key has {MASTER_LEN} bytes, this one {len(master)}")
        self.master = master
        self.aead = _aesgcm(_derive(master, b"bootback object encryption"))
        self._id_key = _derive(master, b"bootback chunk id")
        self._check_key = _derive(master, b"bootback key check")

    @classmethod
    def generate(cls) -> RepoKey:
        return cls(os.urandom(MASTER_LEN))

    def chunk_id(self, data: bytes | bytearray | memoryview) -> str:
        """The keyed id of a chunk: HMAC-SHA256 (SHA-NI makes it as fast as the plain hash)."""
        return hmac.digest(self._id_key, data, "sha256").hex()

    def check_value(self, repo_id: str) -> str:
        return hmac.digest(self._check_key, repo_id.encode(), "sha256").hex()


def encryption_doc(key: RepoKey, repo_id: str, passphrase: str | None) -> dict:
    """config.json's "encryption" object for a new repository; its master key wrapped by ``passphrase``, or kept
    only in a key file (``"key": null``)."""
    return {
        "algorithm": AES_256_GCM,
        "chunk_id": CHUNK_ID_HMAC,
        "key_check": key.check_value(repo_id),
        "key": wrap(key, repo_id, passphrase) if passphrase is not None else None,
    }


def check_encryption_doc(doc: object, where: str) -> dict:
    """The "encryption" object of a config, checked for shape (its key is checked when unwrapped)."""
    if (
        not isinstance(doc, dict)
        or doc.get("algorithm") != AES_256_GCM
        or doc.get("chunk_id") != CHUNK_ID_HMAC
        or not _is_hex_digest(doc.get("key_check"))  # compare_digest raises TypeError on non-ASCII text
        or not isinstance(doc.get("key"), dict | None)
    ):
        raise RepositoryKeyError(f"{where}: config.json's encryption settings are damaged or unknown: {doc!r:.200}")
    return doc


def _is_hex_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


# --- the passphrase-wrapped key -----------------------------------------------------------------------
def _kek(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())


def wrap(key: RepoKey, repo_id: str, passphrase: str) -> dict:
    salt, nonce = os.urandom(16), os.urandom(12)
    kek = _kek(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    sealed = _aesgcm(kek).encrypt(nonce, key.master, _wrap_ad(repo_id))
    return {
        "kdf": "scrypt",
        "n": SCRYPT_N,
        "r": SCRYPT_R,
        "p": SCRYPT_P,
        "salt": _b64(salt),
        "nonce": _b64(nonce),
        "wrapped": _b64(sealed),
    }


def _wrap_ad(repo_id: str) -> bytes:
    return b"bootback-key:" + repo_id.encode()


def unwrap(doc: dict, repo_id: str, passphrase: str, where: str, source: str) -> RepoKey:
    """The master key in ``doc`` (config.json's wrapped key); ``source`` says where the passphrase came from."""
    n, r, p = doc.get("n"), doc.get("r"), doc.get("p")
    if doc.get("kdf") != "scrypt" or not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, r, p)):
        raise RepositoryKeyError(f"{where}: unknown key derivation in config.json: {doc.get('kdf')!r}")
    if not (1 < n <= 1 << 20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16) or (
        128 * n * r > _MAX_SCRYPT_MEMORY or n * r * p > _MAX_SCRYPT_WORK
    ):
        raise RepositoryKeyError(f"{where}: scrypt parameters n={n} r={r} p={p} out of bounds in config.json")
    salt = _unb64(doc.get("salt"), f"{where}: key salt")
    nonce = _unb64(doc.get("nonce"), f"{where}: key nonce")
    wrapped = _unb64(doc.get("wrapped"), f"{where}: wrapped key")
    if len(nonce) != 12:
        raise RepositoryKeyError(f"{where}: key nonce has {len(nonce)} bytes, expected 12")
    from cryptography.exceptions import InvalidTag

    try:
        master = _aesgcm(_kek(passphrase, salt, n, r, p)).decrypt(nonce, wrapped, _wrap_ad(repo_id))
    except InvalidTag:
        raise RepositoryKeyError(f"{where}: wrong passphrase ({source})") from None
    return RepoKey(master)


# --- key files ----------------------------------------------------------------------------------------
def write_key_file(path: Path, key: RepoKey, repo_id: str) -> None:
    """A new key file (0600, never replacing an existing file): the master key in the clear, so it must be kept
    like the passphrase."""
    doc = {"magic": KEY_FILE_MAGIC, "version": 1, "repository": repo_id, "algorithm": AES_256_GCM}
    data = json.dumps({**doc, "key": _b64(key.master)}, indent=2).encode() + b"\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise UsageError(f"key file {path} already exists: choose a new name") from None
    except OSError as exc:
        raise UsageError(f"cannot create key file {path}: {exc.strerror or exc}") from None
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_key_file(path: Path) -> tuple[str, RepoKey]:
    """(repository id, key) held by the key file at ``path``."""
    what = f"key file {path}"
    try:
        mode = os.stat(path, follow_symlinks=False).st_mode
        # the master key in the clear: other users must not read or change it (ssh refuses such keys too)
        if stat.S_ISREG(mode) and mode & KEY_FILE_REFUSED_MODE:
            raise RepositoryKeyError(f"{what} is open to other users (mode {mode & 0o777:04o}): chmod 600 {path}")
        doc = json.loads(safefile.read_regular(path, what, MAX_KEY_FILE_BYTES))
    except FileNotFoundError:
        raise RepositoryKeyError(f"{what} does not exist") from None
    except OSError as exc:
        raise RepositoryKeyError(f"cannot read {what}: {exc.strerror or exc}") from None
    except ValueError:
        raise RepositoryKeyError(f"{what} is not a bootback key file (not JSON)") from None
    if not isinstance(doc, dict) or doc.get("magic") != KEY_FILE_MAGIC or doc.get("algorithm") != AES_256_GCM:
        raise RepositoryKeyError(f"{what} is not a bootback key file")
    if not isinstance(doc.get("repository"), str):
        raise RepositoryKeyError(f"{what}: no repository id")
    return doc["repository"], RepoKey(_unb64(doc.get("key"), what))


def read_passphrase_file(path: Path) -> str:
    """The passphrase held by ``path`` (``BOOTBACK_PASSPHRASE_FILE``), without its final newline; refused when
    other users may read or change it, like a key file."""
    what = f"passphrase file {path} (${PASSPHRASE_FILE_ENV})"
    try:
        mode = os.stat(path, follow_symlinks=False).st_mode
        if stat.S_ISREG(mode) and mode & KEY_FILE_REFUSED_MODE:
            raise RepositoryKeyError(f"{what} is open to other users (mode {mode & 0o777:04o}): chmod 600 {path}")
        text = safefile.read_regular(path, what, MAX_PASSPHRASE_BYTES).decode()
    except FileNotFoundError:
        raise RepositoryKeyError(f"{what} does not exist") from None
    except OSError as exc:
        raise RepositoryKeyError(f"cannot read {what}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise RepositoryKeyError(f"{what} is not UTF-8 text") from None
    passphrase = text.removesuffix("\n").removesuffix("\r")
    if not passphrase:
        raise RepositoryKeyError(f"{what} is empty")
    return passphrase


# --- where a key comes from ---------------------------------------------------------------------------
@dataclass(frozen=True)
class KeySource:
    """What the operator gave to open encrypted repositories: key files (each names its repository), a
    passphrase (``BOOTBACK_PASSPHRASE``), and whether a terminal may be asked."""

    key_files: tuple[Path, ...] = ()
    passphrase: str | None = field(default=None, repr=False)  # never in a log line or traceback
    interactive: bool = False
    plain_ok: bool = False  # BOOTBACK_ENCRYPTION=none: the operator accepts unencrypted repositories

    @classmethod
    def from_env(cls, key_files: list[Path] | tuple[Path, ...] = (), interactive: bool = False) -> KeySource:
        """``key_files`` given on the command line, else ``BOOTBACK_KEY_FILE``; the passphrase from
        ``BOOTBACK_PASSPHRASE``; a prompt only when asked for and stdin is a terminal."""
        files = tuple(key_files) or tuple(Path(p) for p in os.environ.get(KEY_FILE_ENV, "").split(os.pathsep) if p)
        passphrase = os.environ.get(PASSPHRASE_ENV) or None
        if passphrase is None and os.environ.get(PASSPHRASE_FILE_ENV):
            passphrase = read_passphrase_file(Path(os.environ[PASSPHRASE_FILE_ENV]))
        plain_ok = os.environ.get(ENCRYPTION_ENV) == NONE
        return cls(files, passphrase, interactive and sys.stdin.isatty(), plain_ok)

    def check_plain(self, where: str, repo_id: str) -> str | None:
        """For a repository whose config.json says it is unencrypted: RepositoryKeyError if a key file given is
        for it (config.json was changed: a downgrade); else why plain writes are refused (a key was given, so the
        operator expects encryption, unless ``BOOTBACK_ENCRYPTION=none``), or None."""
        for path in self.key_files:
            try:
                file_repo, _key = read_key_file(path)
            except (RepositoryKeyError, IntegrityError):
                continue  # a broken key file is refused where it is needed, not when opening a plain repository
            if file_repo == repo_id:
                raise RepositoryKeyError(
                    f"{where}: config.json says unencrypted, but key file {path} is for this repository: "
                    "config.json has been changed (a downgrade?); refusing to open it"
                )
        if self.plain_ok or not (self.key_files or self.passphrase is not None):
            return None
        given = "a key file" if self.key_files else PASSPHRASE_ENV
        return (
            f"{where} is not encrypted (config.json), but {given} was given: refusing to write plain data into it; "
            f"check its config.json, or set {ENCRYPTION_ENV}={NONE} if it is meant to be unencrypted"
        )

    def unlock(self, where: str, repo_id: str, doc: dict) -> RepoKey:
        """The key of the repository ``where`` (id ``repo_id``, config "encryption" object ``doc``): from a key
        file naming this repository, else from the passphrase; RepositoryKeyError in one line otherwise."""
        for path in self.key_files:
            file_repo, key = read_key_file(path)
            if file_repo == repo_id:
                if not hmac.compare_digest(key.check_value(repo_id), doc["key_check"]):
                    raise RepositoryKeyError(f"{where}: key file {path} does not hold this repository's key")
                return key
        files = ", ".join(map(str, self.key_files))
        if doc["key"] is None:
            if self.key_files:
                raise RepositoryKeyError(f"{where}: no key file given is for this repository (id {repo_id}): {files}")
            raise RepositoryKeyError(
                f"{where} is encrypted and its key is kept outside it: pass --key-file FILE (or set {KEY_FILE_ENV})"
            )
        if self.passphrase is not None:
            passphrase, source = self.passphrase, PASSPHRASE_ENV
        elif self.interactive:
            passphrase, source = getpass.getpass(f"passphrase for {where}: "), "as typed"
        elif self.key_files:
            raise RepositoryKeyError(f"{where}: no key file given is for this repository (id {repo_id}): {files}")
        else:
            raise RepositoryKeyError(f"{where} is encrypted: set {PASSPHRASE_ENV} or pass --key-file FILE")
        key = unwrap(doc["key"], repo_id, passphrase, where, source)
        if not hmac.compare_digest(key.check_value(repo_id), doc["key_check"]):
            raise RepositoryKeyError(f"{where}: the key in config.json does not match its key check (damaged)")
        return key

    def new_passphrase(self, what: str) -> str:
        """A passphrase for a new wrapped key: ``BOOTBACK_PASSPHRASE``, or typed twice on a terminal."""
        if self.passphrase is not None:
            return self.passphrase
        if not self.interactive:
            raise UsageError(f"{what} needs a passphrase: set {PASSPHRASE_ENV}, or run on a terminal")
        first = getpass.getpass(f"new passphrase for {what}: ")
        if not first:
            raise UsageError("the passphrase is empty")
        if getpass.getpass("the same passphrase again: ") != first:
            raise UsageError("the two passphrases differ")
        return first
