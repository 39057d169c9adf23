"""File-level recovery from the command line: list what is inside a backed-up disk, and copy files or whole
directories out of it, straight from the repository."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from appliance.commands.keys import add_key_options, key_source
from appliance.errors import NoSpaceError
from appliance.files import FileBrowser, browse
from appliance.repo import Repository
from appliance.repo.backends import add_repository_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("files", help="list the volumes, directories and files inside a backed-up disk")
    add_repository_argument(p)
    p.add_argument("point", metavar="VM[@POINT]")
    p.add_argument("path", nargs="?", default="/", help="/ lists the volumes; /p1/etc lists a directory")
    p.add_argument("--disk", help="disk name, when the restore point has several")
    add_key_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_files)

    p = sub.add_parser("extract", help="copy a file (or a directory, as tar) out of a backed-up disk")
    add_repository_argument(p)
    p.add_argument("point", metavar="VM[@POINT]")
    p.add_argument("path", help="e.g. /p1/etc/hostname")
    p.add_argument("-o", "--output", required=True, help="output file, '-' for standard output")
    p.add_argument("--disk", help="disk name, when the restore point has several")
    add_key_options(p)
    p.set_defaults(func=cmd_extract)


def _browser(args: argparse.Namespace) -> FileBrowser:
    repo = Repository.open(args.repo, key_source(args))
    return browse(repo, repo.resolve(args.point), args.disk)


def print_list(objects: Sequence[Any], as_json: bool, line: Callable[[Any], str]) -> None:
    """A listing command's output: a JSON array of the objects' ``to_json()``, or ``line(obj)`` for each."""
    if as_json:
        print(json.dumps([o.to_json() for o in objects], indent=2))
        return
    for o in objects:
        print(line(o))


def minute(when: datetime | None) -> str:
    """A listed time, to the minute ('-' when unknown)."""
    return when.strftime("%Y-%m-%d %H:%M") if when else "-"


def cmd_files(args: argparse.Namespace) -> int:
    browser = _browser(args)
    if args.path.strip("/") == "":
        print_list(
            browser.volumes(),
            args.json,
            lambda v: f"{v.id:6} {v.size:>15,}  {v.filesystem or '-':5} {v.description}",
        )
        return 0
    print_list(
        browser.listdir(args.path),
        args.json,
        lambda e: f"{e.kind[0] if e.kind != 'file' else '-'} {e.size:>13,}  {minute(e.mtime):16}  {e.name}",
    )
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    browser = _browser(args)
    entry = browser.stat(args.path)  # fails before the output is created when the path is wrong
    out = sys.stdout.buffer if args.output == "-" else open(args.output, "wb")  # noqa: SIM115
    try:
        if entry.kind == "file":
            with browser.open(args.path) as fh:
                shutil.copyfileobj(fh, out, 1 << 20)
        else:
            browser.write_tar(args.path, out)
        out.flush()
    except BaseException as exc:
        if out is not sys.stdout.buffer:
            out.close()
            Path(args.output).unlink(missing_ok=True)  # never leave a partial file that looks recovered
        if isinstance(exc, OSError) and exc.errno == 28:
            raise NoSpaceError(f"no space left writing {args.output}") from exc
        raise
    if out is not sys.stdout.buffer:
        out.close()
    return 0
