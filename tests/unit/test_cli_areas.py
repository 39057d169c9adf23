"""The CLI imports only the area of the command it runs (``appliance.commands.AREAS``): the table must name
exactly what each module registers, and a command must start without the heavy modules of other areas."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import subprocess
import sys

from appliance import commands
from appliance.cli import build_parser


def test_the_table_names_exactly_what_each_area_registers() -> None:
    modules = sorted(info.name for info in pkgutil.iter_modules(commands.__path__))
    assert sorted(commands.AREAS) == modules
    for area in modules:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"appliance.commands.{area}").register(sub)
        assert tuple(sub.choices) == commands.AREAS[area], area


def test_a_command_builds_its_own_area_and_help_builds_all() -> None:
    whole = build_parser()
    assert build_parser("publish").parse_args(["publish", "vm"]).func.__module__ == "appliance.commands.daemon"
    choices = next(a for a in whole._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(choices) == {name for names in commands.AREAS.values() for name in names}


def test_publish_starts_without_the_repository_reader_crypto_or_item_recovery() -> None:
    probe = (
        "import sys\n"
        "from appliance.cli import main\n"
        "try:\n"
        "    main(['publish', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    loaded = set(
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    )
    for heavy in ("appliance.items.mail", "appliance.files", "appliance.repo.reader", "cryptography", "asyncio"):
        assert heavy not in loaded, f"bootback publish imports {heavy}"
