"""Access to the web app and API: `bootback token create|list|revoke`, `bootback password`."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.config import default_state_dir
from appliance.errors import UsageError

if TYPE_CHECKING:
    from appliance.access.credentials import Credentials


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("token", help="API tokens for scripts (Authorization: Bearer ...)")
    p.add_argument("action", choices=("create", "list", "revoke"))
    p.add_argument("name", nargs="?", help="token name (create) or id (revoke)")
    p.add_argument("--state", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("password", help="set the admin page password (reads it from stdin when not a terminal)")
    p.add_argument("--user", default="admin")
    p.add_argument("--state", type=Path, default=None)
    p.set_defaults(func=cmd_password)


def _creds(args: argparse.Namespace) -> Credentials:
    # Imported here: it loads werkzeug (~70 ms), which only these two commands need, not every bootback start.
    from appliance.access.credentials import Credentials  # noqa: PLC0415

    return Credentials(args.state or default_state_dir())


def cmd_token(args: argparse.Namespace) -> int:
    creds = _creds(args)
    if args.action == "create":
        if not args.name:
            raise UsageError("token create needs a NAME")
        tok = creds.create_token(args.name)
        print(json.dumps(tok) if args.json else tok["token"])
    elif args.action == "list":
        toks = creds.tokens()
        print(json.dumps(toks) if args.json else "\n".join(f"{t['id']}  {t['name']}" for t in toks))
    else:
        if not args.name or not creds.revoke_token(args.name):
            raise UsageError(f"no token with id {args.name!r}; see 'bootback token list'")
    return 0


def cmd_password(args: argparse.Namespace) -> int:
    if sys.stdin.isatty():
        pw = getpass.getpass("new password: ")
        if getpass.getpass("again: ") != pw:
            raise UsageError("the passwords differ")
    else:
        pw = sys.stdin.readline().rstrip("\n")
    _creds(args).set_password(args.user, pw)
    print(
        f"password of {args.user!r} changed; every login of {args.user!r} has ended (log in again with it)",
        file=sys.stderr,
    )
    return 0
