"""Ansible module: mount (or unmount) an NFS v3 datastore on an ESXi host, through vCenter or the host itself.

community.vmware's vmware_host_datastore decides presence from the host's storage-system mount list only and
accepts a same-named datastore that points at another server; a recovery datastore mounted from the wrong
appliance is worse than none. This module looks at the host's datastores themselves and compares the NFS
server and path, with pyVmomi.
"""

from __future__ import annotations

import ssl

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    from pyVim.connect import Disconnect, SmartConnect
    from pyVmomi import vim, vmodl

    HAS_PYVMOMI = True
except ImportError:  # reported by the module, on the controller
    HAS_PYVMOMI = False

DOCUMENTATION = r"""
module: bootback_nfs_datastore
short_description: Mount a bootback NFS datastore on an ESXi host
description:
  - Mounts an NFS v3 export as a datastore on one ESXi host, or unmounts it.
  - An existing datastore of that name mounted from another server or path is reported, never replaced.
options:
  hostname: {description: vCenter or ESXi host to connect to., type: str, required: true}
  port: {description: HTTPS port., type: int, default: 443}
  username: {description: User name., type: str, required: true}
  password: {description: Password., type: str, required: true, no_log: true}
  validate_certs: {description: Check the server's certificate., type: bool, default: true}
  esxi_hostname: {description: The ESXi host as vCenter names it; needed with a vCenter., type: str}
  name: {description: Datastore name., type: str, required: true}
  server: {description: NFS server (the bootback appliance)., type: str}
  path: {description: Export path on the server., type: str}
  read_only: {description: Mount read-only., type: bool, default: false}
  state: {description: present or absent., type: str, choices: [present, absent], default: present}
"""

RETURN = r"""
datastore: {description: Name, server, path and accessibility of the datastore., type: dict, returned: always}
"""


def _connect(module: AnsibleModule):
    p = module.params
    ctx = ssl.create_default_context()
    if not p["validate_certs"]:
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        return SmartConnect(host=p["hostname"], port=p["port"], user=p["username"], pwd=p["password"], sslContext=ctx)
    except vim.fault.InvalidLogin:
        module.fail_json(msg=f"cannot log in to {p['hostname']} as {p['username']}: wrong user name or password")
    except (OSError, vmodl.MethodFault) as exc:
        module.fail_json(msg=f"cannot connect to {p['hostname']}:{p['port']}: {exc}")


def _host(module: AnsibleModule, content):
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.HostSystem], True)
    try:
        hosts = list(view.view)
    finally:
        view.Destroy()
    wanted = module.params["esxi_hostname"]
    if wanted:
        found = [h for h in hosts if h.name == wanted]
        if not found:
            module.fail_json(msg=f"no ESXi host named {wanted!r} (known: {', '.join(sorted(h.name for h in hosts))})")
        return found[0]
    if len(hosts) != 1:
        module.fail_json(msg=f"{module.params['hostname']} manages {len(hosts)} hosts: set esxi_hostname")
    return hosts[0]


def _describe(ds) -> dict:
    nas = getattr(ds.info, "nas", None)
    return {
        "name": ds.name,
        "server": getattr(nas, "remoteHost", None),
        "path": getattr(nas, "remotePath", None),
        "type": ds.summary.type,
        "accessible": bool(ds.summary.accessible),
    }


def run(module: AnsibleModule) -> None:
    p = module.params
    si = _connect(module)
    try:
        host = _host(module, si.RetrieveContent())
        current = next((ds for ds in host.datastore if ds.name == p["name"]), None)
        if p["state"] == "absent":
            if current is None:
                module.exit_json(changed=False, datastore={})
            if not module.check_mode:
                try:
                    host.configManager.datastoreSystem.RemoveDatastore(current)
                except vim.fault.ResourceInUse as exc:
                    module.fail_json(msg=f"datastore {p['name']} on {host.name} is in use (VMs run from it): {exc.msg}")
                except vmodl.MethodFault as exc:
                    module.fail_json(msg=f"cannot unmount {p['name']} from {host.name}: {exc.msg}")
            module.exit_json(changed=True, datastore=_describe(current))

        if current is not None:
            have = _describe(current)
            if (have["server"], have["path"]) != (p["server"], p["path"]):
                module.fail_json(
                    msg=f"datastore {p['name']} on {host.name} is mounted from {have['server']}:{have['path']}, "
                    f"not {p['server']}:{p['path']}; unmount it first (VMs may run from it) or choose another name",
                    datastore=have,
                )
            module.exit_json(changed=False, datastore=have)

        spec = vim.host.NasVolume.Specification(
            remoteHost=p["server"],
            remotePath=p["path"],
            localPath=p["name"],
            type="NFS",
            accessMode="readOnly" if p["read_only"] else "readWrite",
        )
        if module.check_mode:
            module.exit_json(changed=True, datastore={"name": p["name"], "server": p["server"], "path": p["path"]})
        try:
            ds = host.configManager.datastoreSystem.CreateNasDatastore(spec)
        except vmodl.MethodFault as exc:
            module.fail_json(msg=f"cannot mount {p['server']}:{p['path']} as {p['name']} on {host.name}: {exc.msg}")
        module.exit_json(changed=True, datastore=_describe(ds))
    finally:
        Disconnect(si)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "hostname": {"type": "str", "required": True},
            "port": {"type": "int", "default": 443},
            "username": {"type": "str", "required": True},
            "password": {"type": "str", "required": True, "no_log": True},
            "validate_certs": {"type": "bool", "default": True},
            "esxi_hostname": {"type": "str"},
            "name": {"type": "str", "required": True},
            "server": {"type": "str"},
            "path": {"type": "str"},
            "read_only": {"type": "bool", "default": False},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
        },
        required_if=[("state", "present", ("server", "path"))],
        supports_check_mode=True,
    )
    if not HAS_PYVMOMI:
        module.fail_json(msg=missing_required_lib("pyvmomi"))
    run(module)


if __name__ == "__main__":
    main()
