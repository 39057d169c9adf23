"""Keys of encrypted repositories: ``bootback key export|import``, and the key options of every command that
opens a repository (``--key-file``; ``BOOTBACK_PASSPHRASE``, ``BOOTBACK_KEY_FILE``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import UsageError
from appliance.repo.backends import add_repository_argument
from appliance.repo.keys import (
    AES_256_GCM,
    ALGORITHMS,
    ENCRYPTION_ENV,
    KEY_FILE_ENV,
    PASSPHRASE_ENV,
    KeySource,
    read_key_file,
    write_key_file,
)

if TYPE_CHECKING:
    from appliance.repo import Repository


def add_key_options(p: argparse.ArgumentParser) -> None:
    """``--key-file`` on a command that opens a repository."""
    p.add_argument(
        "--key-file",
        type=Path,
        action="append",
        default=[],
        help=f"key file of an encrypted repository (repeatable; ${KEY_FILE_ENV}); else the passphrase: "
        f"${PASSPHRASE_ENV}, or a prompt on a terminal",
    )


def key_source(args: argparse.Namespace, interactive: bool = True) -> KeySource:
    """Where this command's repository key comes from; a terminal may be asked unless ``interactive`` is off
    (a daemon)."""
    return KeySource.from_env(getattr(args, "key_file", []), interactive=interactive)


def add_init_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--encryption",
        choices=ALGORITHMS,
        default=os.environ.get(ENCRYPTION_ENV) or None,
        help=f"aes-256-gcm (the default when a passphrase or key file is at hand) or none (${ENCRYPTION_ENV})",
    )
    p.add_argument(
        "--key-file",
        type=Path,
        help="with aes-256-gcm: write the new key to this file (kept only there) instead of wrapping it with a "
        "passphrase in the repository",
    )


def init_encryption(args: argparse.Namespace) -> tuple[str, KeySource]:
    """The encryption ``init`` uses: as asked, else aes-256-gcm if a key can be had, else one clear error.
    Unencrypted repositories are made only where the operator says so (``--encryption none`` or
    ``BOOTBACK_ENCRYPTION=none``)."""
    source = KeySource.from_env((), interactive=True)
    if args.key_file and _inside(Path(args.key_file), Path(str(args.repo))):
        raise UsageError(f"key file {args.key_file} would sit inside the repository it unlocks: keep it elsewhere")
    if args.encryption is not None:
        if args.encryption == "none" and args.key_file:
            raise UsageError("--key-file is for an encrypted repository, not with --encryption none")
        return args.encryption, source
    if args.key_file or source.passphrase is not None or source.interactive:
        print(f"bootback: encrypting with {AES_256_GCM} (the default)", file=sys.stderr)
        return AES_256_GCM, source
    raise UsageError(
        f"choose the repository's encryption: --encryption {AES_256_GCM} (with ${PASSPHRASE_ENV} or --key-file FILE) "
        f"or --encryption none (${ENCRYPTION_ENV}=none makes that the default)"
    )


def _inside(path: Path, directory: Path) -> bool:
    """Whether ``path`` lies in the local ``directory`` (an s3:// location never holds a local file)."""
    if str(directory).startswith("s3:"):
        return False
    return path.resolve().is_relative_to(directory.resolve())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("key", help="export or import the key of an encrypted repository")
    keysub = p.add_subparsers(dest="key_command", metavar="ACTION", required=True)
    e = keysub.add_parser("export", help="write the repository's key to a new key file (keep it like the passphrase)")
    add_repository_argument(e)
    e.add_argument("file", type=Path, help="the key file to create (never overwritten)")
    add_key_options(e)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_key_export)
    i = keysub.add_parser(
        "import",
        help="keep a key file's key in the repository, wrapped by a (new) passphrase: recovers a lost or damaged "
        "wrapped key, changes the passphrase, or adds one to a key-file repository",
    )
    add_repository_argument(i)
    i.add_argument("file", type=Path, help="a key file written by 'key export' or 'init --key-file'")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_key_import)


def _open_encrypted(location: str, source: KeySource) -> Repository:
    from appliance.repo import Repository  # here, not at the top: the other commands start without it

    repo = Repository.open(location, source)
    if repo.key is None:
        raise UsageError(f"repository {repo.location} is not encrypted: it has no key")
    return repo


def cmd_key_export(args: argparse.Namespace) -> int:
    if _inside(args.file, Path(str(args.repo))):
        raise UsageError(f"key file {args.file} would sit inside the repository it unlocks: keep it elsewhere")
    repo = _open_encrypted(args.repo, key_source(args))
    write_key_file(args.file, repo.key, repo.config.id)
    doc = {"repository": repo.location, "id": repo.config.id, "key_file": str(args.file)}
    print(json.dumps(doc) if args.json else f"wrote the key of repository {repo.location} to {args.file}")
    return 0


def cmd_key_import(args: argparse.Namespace) -> int:
    repo_id, _key = read_key_file(args.file)
    repo = _open_encrypted(args.repo, KeySource((args.file,), None, False))
    if repo.config.id != repo_id:  # unlock() would have refused it; said plainly all the same
        raise UsageError(f"key file {args.file} is for repository {repo_id}, not {repo.config.id}")
    repo.wrap_key(KeySource.from_env((), interactive=True).new_passphrase(f"repository {repo.location}"))
    doc = {"repository": repo.location, "id": repo.config.id, "key": "wrapped by passphrase"}
    print(json.dumps(doc) if args.json else f"repository {repo.location}: key imported, wrapped by the passphrase")
    return 0
