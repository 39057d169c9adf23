"""``bootback lab``: virtual labs through the daemon's control socket (define a group, verify it, start a sandbox
lab with a TTL, list and stop labs)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from appliance.commands.daemon import _client, _client_args
from appliance.errors import VerificationFailedError
from appliance.lab.esxi import add_arguments as esxi_arguments
from appliance.lab.esxi import cmd_verify_esxi

LIVE = ("verifying", "starting", "running")
POLL = 1.0


def register(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser("lab", help="virtual labs: boot application groups on an isolated network and check them")
    labsub = lab.add_subparsers(dest="lab_command", metavar="LAB_COMMAND", required=True)

    def group_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("group", help="a defined group's name, or a group file (YAML or JSON)")

    p = labsub.add_parser("define", help="keep an application group (a YAML or JSON file) in the appliance")
    p.add_argument("file", type=Path)
    _client_args(p)
    p.set_defaults(func=cmd_define)

    p = labsub.add_parser("groups", help="list the defined application groups")
    _client_args(p)
    p.set_defaults(func=cmd_groups)

    p = labsub.add_parser(
        "verify", help="boot a group in its lab, run every check, report per VM; exit 70 when a check fails"
    )
    group_arg(p)
    _client_args(p)
    esxi_arguments(p)
    p.set_defaults(func=cmd_verify)

    p = labsub.add_parser("start", help="start a sandbox lab of a group: it runs until 'lab stop' or its TTL")
    group_arg(p)
    p.add_argument("--ttl", default="4h", help="how long it may run: 30m, 4h, 2d (default 4h)")
    p.add_argument("--wait", action="store_true", help="return once every VM is up and checked")
    _client_args(p)
    p.set_defaults(func=cmd_start)

    p = labsub.add_parser("stop", help="stop a lab: its guests and sandboxes are thrown away")
    p.add_argument("id")
    _client_args(p)
    p.set_defaults(func=cmd_stop)

    p = labsub.add_parser("list", help="labs running and recently finished")
    _client_args(p)
    p.set_defaults(func=cmd_list)

    p = labsub.add_parser("show", help="one lab's record and report")
    p.add_argument("id")
    _client_args(p)
    p.set_defaults(func=cmd_show)


def _group_ref(text: str) -> str | dict[str, Any]:
    """A file's document when ``text`` names a file (or looks like one), else a defined group's name."""
    from appliance.lab.group import load_file, parse_group

    path = Path(text)
    if path.exists() or path.suffix in (".yaml", ".yml", ".json"):
        doc = load_file(path)
        parse_group(doc)  # a bad file is reported here, before the daemon is asked
        return json.loads(json.dumps(doc, default=str))  # YAML times become strings the daemon parses again
    return text


def _wait(client: Any, lab_id: str, until: tuple[str, ...]) -> dict[str, Any]:
    while True:
        record = client.call("lab", id=lab_id)
        if record["state"] not in until:
            return record
        time.sleep(POLL)


def _print(record: dict[str, Any]) -> None:
    expires = f", expires {record['expires']}" if record.get("expires") else ""
    print(f"lab {record['id']} ({record['group']}, {record['kind']}): {record['state']}{expires}")
    report = record.get("report") or {}
    for vm in report.get("vms", []):
        up = f", up after {vm['boot_seconds']} s" if vm.get("boot_seconds") is not None else ""
        print(f"  {vm['vm']}@{vm.get('point') or '?'} {vm['address']}: {vm['state']}{up}")
        for check in vm.get("checks", []):
            print(f"    {check['line']}")
        if vm.get("detail"):
            print(f"    {vm['detail']}")
        if vm.get("screenshot"):
            print(f"    screenshot {vm['screenshot']}")
    if record.get("error"):
        print(f"  error: {record['error']}")


def _show(args: argparse.Namespace, doc: Any) -> None:
    if args.json:
        print(json.dumps(doc, indent=2))
    elif isinstance(doc, dict):
        _print(doc)
    else:
        for record in doc:
            _print(record)


def cmd_define(args: argparse.Namespace) -> int:
    from appliance.lab.group import load_file

    group = _client(args).call("lab_define", group=json.loads(json.dumps(load_file(args.file), default=str)))
    print(json.dumps(group, indent=2) if args.json else f"group {group['name']}: {len(group['vms'])} VM(s)")
    return 0


def cmd_groups(args: argparse.Namespace) -> int:
    groups = _client(args).call("lab_groups")
    if args.json:
        print(json.dumps(groups, indent=2))
    for g in [] if args.json else groups:
        vms = " -> ".join(v["vm"] for v in g.get("vms", [])) or g.get("error", "")
        when = f"  (schedule {g['schedule']}, next run {g['next_run']})" if g.get("schedule") else ""
        print(f"{g['name']}: {vms}{when}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.esxi:  # the lab on an ESXi host instead of the appliance's qemu (appliance/lab/esxi.py)
        return cmd_verify_esxi(args, client, _group_ref(args.group))
    record = client.call("lab_verify", group=_group_ref(args.group))
    try:
        record = _wait(client, record["id"], LIVE)
    except KeyboardInterrupt:
        client.call("lab_stop", id=record["id"])
        raise
    _show(args, record)
    if record["state"] != "passed":
        failed = (record.get("report") or {}).get("failed") or [record.get("error") or record["state"]]
        raise VerificationFailedError(f"lab {record['group']} did not verify: {'; '.join(failed)}")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    client = _client(args)
    record = client.call("lab_start", group=_group_ref(args.group), ttl=args.ttl)
    if args.wait:
        record = _wait(client, record["id"], ("starting",))
    _show(args, record)
    return 0 if record["state"] in LIVE else 1


def cmd_stop(args: argparse.Namespace) -> int:
    _show(args, _client(args).call("lab_stop", id=args.id))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    _show(args, _client(args).call("lab_list"))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    _show(args, _client(args).call("lab", id=args.id))
    return 0
