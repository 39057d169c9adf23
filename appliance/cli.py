"""The ``bootback`` command: one argparse tree, with each area's subcommands in ``appliance.commands``.

Errors from below arrive as ``BootbackError`` subclasses; this is the one place that turns them into
a message on stderr and a distinct exit code.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from appliance import __version__, allocator, commands
from appliance.errors import BootbackError


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole tree, or only the area of ``command`` when it names one (``commands.AREAS``)."""
    parser = argparse.ArgumentParser(
        prog="bootback",
        description="Run virtual machines straight out of backup files over NFS.",
    )
    parser.add_argument("--version", action="version", version=f"bootback {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    areas = [area for area, names in commands.AREAS.items() if command in names]
    if not areas:  # help, a typo, or no command: every area, so argparse can list them all
        areas = sorted(info.name for info in pkgutil.iter_modules(commands.__path__))
    # Each module of appliance.commands exposes register(sub); adding an area is adding a module.
    for area in areas:
        importlib.import_module(f"{commands.__name__}.{area}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    allocator.tune()  # before any worker thread starts
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    # argparse binds a trailing nargs='*' positional before later options ("backup REPO --vm X DISK"), so
    # commands that take trailing paths name the attribute in `trailing` and get the leftovers there.
    args, extra = parser.parse_known_args(argv)
    trailing = getattr(args, "trailing", None)
    if extra:
        if trailing is None or any(e.startswith("-") and e != "-" for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, trailing, getattr(args, trailing) + extra)
    try:
        return int(args.func(args) or 0)
    except BootbackError as exc:
        print(f"bootback: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("bootback: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
