"""Application item recovery: databases, directory entries and mails out of a restore point's disks, without
restoring or booting the VM. ``discovery`` finds the applications, ``cowview`` gives a server a private
writable view of their files, and one module per kind (``postgres``, ``mail`` ...) does the rest."""

from appliance.items.discovery import KINDS, Item, discover

__all__ = ["KINDS", "Item", "discover"]
