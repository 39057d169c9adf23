"""Small guests with network services for the lab's tests (and the demo's lab): the Debian kernel, booted by
extlinux from a raw disk, with a busybox initramfs as the whole system, so a guest needs 64 MiB and boots in
seconds under TCG. Roles: ``db`` listens on DB_PORT; ``db-off`` is the same guest with its service stopped;
``app`` serves HTTP with a page that says whether it reached the db from inside the lab, and a probe page that
tries any address:port (the isolation test asks it to reach the host). The demo's lab (appliance.demo.lab):
``web`` serves a page and answers qemu-guest-agent's ``guest-sync``/``guest-ping`` on its virtio-serial port;
``client`` looks the web VM up in the lab's DNS, fetches its page over the lab network and says so on its console.

Built once per recipe into a cache directory (``appliance.demo.bootdisk`` does the disk; this module the
initramfs), keyed by content: a rebuild happens only when the recipe, kernel or busybox changes.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from appliance.atomicfile import fsync_dir
from appliance.demo.bootdisk import BootDisk, DemoBuildError, build_boot_disk

ROLES = ("db", "db-off", "app", "web", "client")
DB_ADDRESS = "10.0.0.10"  # the db's address "in production": the group gives it the same one in the lab
DB_PORT = 5432
DB_REPLY = "db-ok"
WEB_ADDRESS = "10.0.0.10"  # the demo lab's web VM
WEB_NAME = "demo-web"  # its name, which the client resolves in the lab's DNS
WEB_PAGE = "demo-web: up"
BANNER = "bootback-lab: {role} booted"
READY = "bootback-lab: {role} ready"
APPEND = "console=ttyS0 panic=-1 quiet rdinit=/init"
RECIPE_VERSION = "1"

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
say() {{ echo "bootback-lab: $*"; echo "bootback-lab: $*" > /dev/tty1; }}
say "{role} booted, kernel $(uname -r)"
insmod /e1000.ko
{modules}ip link set lo up
nic=$(ls /sys/class/net | grep -v '^lo$' | head -n 1)
ip link set "$nic" up
if udhcpc -i "$nic" -n -q -t 30 -T 1 -s /udhcpc.sh >/dev/null 2>&1; then
  say "{role} address $(ip -4 -o addr show dev "$nic" | awk '{{print $4}}')"
  say "{role} $(ip route show default)"
else
  say "{role} got no address"
fi
{service}
say "{role} ready"
while true; do sleep 3600; done
"""

SERVICES = {
    "db": f'(while true; do echo {DB_REPLY} | nc -l -p {DB_PORT}; done) &\nsay "db listening on {DB_PORT}"',
    "db-off": 'say "db service off"',
    "app": 'httpd -p 80 -h /www\nsay "app serving http on 80"',
    "web": 'httpd -p 80 -h /www\n/agent.sh &\nsay "web serving http on 80"',
    "client": f"""# by name when the lab has a name server (the group's dns), as in production; else by address
web=$(nslookup {WEB_NAME} 2>/dev/null | sed -n 's/^Address: *\\([0-9.]*\\)$/\\1/p' | tail -n 1)
if [ -n "$web" ]; then say "client resolved {WEB_NAME} to $web"; else say "client could not resolve {WEB_NAME}"; fi
web=${{web:-{WEB_ADDRESS}}}
n=0
# nc, not wget: a static busybox's wget resolves even an address through glibc's NSS, and crashes doing so
until page=$(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 "$web" 80 | tail -n 1) && [ -n "$page" ]; do
  n=$((n + 1)); [ $n -ge 120 ] && break; sleep 1
done
if [ -n "$page" ]; then say "client reached $web: $page"
else say "client could not reach $web"; fi""",
}

# Load order matters: each module needs the ones before it (modules.dep of Debian's kernel).
VIRTIO_SERIAL = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_console",
)
MODULES = {"web": VIRTIO_SERIAL}

# A stand-in for qemu-guest-agent (not in busybox): it answers guest-sync (echoing its id, so the host can tell
# a fresh reply from a stale one) and guest-ping on the port qemu names org.qemu.guest_agent.0. A read returns
# at once while nobody is connected on the host side, hence the sleep.
AGENT = """#!/bin/sh
while true; do
  port=""
  for d in /sys/class/virtio-ports/*; do
    [ "$(cat "$d/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${d##*/}
  done
  # one open at a time (the port allows a single opener); a subshell, so a failed open does not end the loop
  [ -n "$port" ] && (
    exec 3<>"$port" || exit
    while read -r line <&3; do
      case "$line" in
        *guest-sync*) echo "{\\"return\\": $(echo "$line" | sed -n 's/.*"id": *\\([0-9]*\\).*/\\1/p')}" >&3 ;;
        *guest-ping*) echo '{"return": {}}' >&3 ;;
      esac
    done
  )
  sleep 1
done
"""

# The guest routes everything through the DHCP server's address (the lab's own) when offered no router, as a
# guest with a gateway in production would: the lab's isolation must not rest on guests having no route.
UDHCPC = """#!/bin/sh
[ "$1" = bound ] || [ "$1" = renew ] || exit 0
ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up
gw=${router%% *}
ip route replace default via "${gw:-$serverid}" dev "$interface"
mkdir -p /etc
: > /etc/resolv.conf
for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
"""

HEADERS = 'echo "Content-Type: text/plain"\necho ""\n'
STATUS_CGI = f"""#!/bin/sh
{HEADERS}if reply=$(nc -w 3 {DB_ADDRESS} {DB_PORT} </dev/null 2>/dev/null) && [ -n "$reply" ]; then
  echo "db: reachable ($reply)"
else
  echo "db: unreachable"
fi
"""
PROBE_CGI = f"""#!/bin/sh
{HEADERS}target=$(echo "$QUERY_STRING" | tr -cd '0-9a-zA-Z.:-')
if nc -w 3 "${{target%:*}}" "${{target##*:}}" </dev/null >/dev/null 2>&1; then
  echo "$target: open"
else
  echo "$target: closed"
fi
"""


def _kernel() -> tuple[str, str]:
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    if not kernels:
        raise DemoBuildError("cannot build a lab guest: no kernel in /boot (install linux-image-amd64)")
    release = kernels[-1].removeprefix("/boot/vmlinuz-")
    return kernels[-1], f"/lib/modules/{release}/kernel/drivers/net/ethernet/intel/e1000/e1000.ko"


def _module(name: str) -> str:
    release = _kernel()[0].removeprefix("/boot/vmlinuz-")
    found = glob.glob(f"/lib/modules/{release}/kernel/drivers/**/{name}.ko", recursive=True)
    if not found:
        raise DemoBuildError(f"cannot build a lab guest: no {name}.ko for kernel {release} (install linux-image-amd64)")
    return found[0]


def _initramfs_files(role: str) -> dict[str, tuple[bytes, int]]:
    _, e1000 = _kernel()
    if not os.path.exists(e1000):
        raise DemoBuildError(f"cannot build a lab guest: no {e1000} (install linux-image-amd64)")
    init = INIT.format(
        role=role, service=SERVICES[role], modules="".join(f"insmod /{m}.ko\n" for m in MODULES.get(role, ()))
    )
    files = {
        "init": (init.encode(), 0o755),
        "udhcpc.sh": (UDHCPC.encode(), 0o755),
        "e1000.ko": (Path(e1000).read_bytes(), 0o644),
        "bin/busybox": (Path("/bin/busybox").read_bytes(), 0o755),
    }
    for name in MODULES.get(role, ()):
        path = _module(name)
        files[f"{name}.ko"] = (Path(path).read_bytes(), 0o644)
    if role == "web":
        files["agent.sh"] = (AGENT.encode(), 0o755)
        files["www/index.html"] = (f"{WEB_PAGE}\n".encode(), 0o644)
    if role == "app":
        files["www/index.html"] = (b"app: up\n", 0o644)
        files["www/cgi-bin/status"] = (STATUS_CGI.encode(), 0o755)
        files["www/cgi-bin/probe"] = (PROBE_CGI.encode(), 0o755)
    return files


def build_initramfs(cache_dir: Path, role: str) -> Path:
    """The role's initramfs (newc cpio, gzip), named by a hash of its content so that an unchanged one keeps its
    name and mtime (the disk's cache key)."""
    files = _initramfs_files(role)
    h = hashlib.sha256(RECIPE_VERSION.encode())
    for name in sorted(files):
        data, mode = files[name]
        h.update(f"{name}:{mode}:{len(data)}:".encode() + data)
    out = Path(cache_dir) / f"lab-initramfs-{role}-{h.hexdigest()[:16]}.cpio.gz"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        root = Path(tmp) / "root"
        for sub in ("bin", "proc", "sys", "dev", "tmp"):
            (root / sub).mkdir(parents=True)
        for name, (data, mode) in files.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(mode)
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        p = subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "--owner=0:0"],
            input=("\n".join(names) + "\n").encode(),
            capture_output=True,
            cwd=root,
        )
        if p.returncode != 0:
            raise DemoBuildError(f"building a lab guest's initramfs failed: {p.stderr.decode(errors='replace')}")
        part = Path(tmp) / "initramfs.cpio.gz"
        with open(part, "wb") as f:
            f.write(gzip.compress(p.stdout, mtime=0))
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, out)
        fsync_dir(Path(cache_dir))
    return out


def build_guest_disk(cache_dir: Path, role: str) -> BootDisk:
    """A bootable raw disk of the role (``ROLES``), built once per recipe into ``cache_dir``."""
    if role not in ROLES:
        raise DemoBuildError(f"lab guest role: one of {', '.join(ROLES)}, got {role!r}")
    if shutil.which("cpio") is None:
        raise DemoBuildError("cannot build a lab guest: cpio is not installed")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    initrd = build_initramfs(cache_dir, role)
    return build_boot_disk(cache_dir, size_mib=24, init=f"# lab guest {role}\n", initrd=initrd, append=APPEND)
