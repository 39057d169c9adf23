"""Ask a running bootback appliance for its status through its control socket."""

from __future__ import annotations

import json
import os
import socket
import time

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: bootback_appliance_status
short_description: Read a running bootback appliance's status (ports actually used, allowed networks).
description:
  - Sends the daemon's C(status) request over its control socket (JSON lines over the Unix socket
    C(control.sock) in the state directory, which the role bind-mounts from the host) and returns the answer.
  - The appliance moves NFS and MOUNT to the next free port when the wanted one is taken, so the ports it
    reports here are the ones a firewall must open.
options:
  state_dir:
    description: The appliance's state directory on the host (holds control.sock).
    type: path
    required: true
  timeout:
    description: Seconds to keep trying while the daemon starts.
    type: int
    default: 60
"""

RETURN = r"""
status:
  description: The daemon's status document (ports, allowed_networks, export ...).
  returned: success
  type: dict
"""


def ask_status(path: str) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(json.dumps({"op": "status", "params": {}}).encode() + b"\n")
        line = s.makefile("rb").readline(1 << 20)
    answer = json.loads(line)
    if "error" in answer:
        raise RuntimeError(f"the appliance refused the status request: {answer['error']}")
    return answer["result"]


def main() -> None:
    module = AnsibleModule(
        argument_spec={"state_dir": {"type": "path", "required": True}, "timeout": {"type": "int", "default": 60}},
        supports_check_mode=True,
    )
    path = os.path.join(module.params["state_dir"], "control.sock")
    deadline = time.monotonic() + module.params["timeout"]
    while True:
        try:
            module.exit_json(changed=False, status=ask_status(path))
        except (OSError, ValueError) as exc:  # not listening yet, or a half-written answer while it starts
            if time.monotonic() > deadline:
                module.fail_json(msg=f"the appliance does not answer on {path}: {exc}")
            time.sleep(1)
        except RuntimeError as exc:
            module.fail_json(msg=str(exc))


if __name__ == "__main__":
    main()
