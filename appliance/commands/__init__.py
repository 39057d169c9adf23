"""The ``bootback`` subcommands, one module per area; each module exposes ``register(sub)``.

``AREAS`` names the commands each module registers, so that ``bootback publish`` imports the daemon's module
only, not the repository, item-recovery and lab code of the others: a command starts in a fraction of the time
(``tests/unit/test_cli_areas.py`` checks the table against what each module registers).
"""

AREAS: dict[str, tuple[str, ...]] = {
    "access": ("token", "password"),
    "daemon": ("serve", "publish", "sessions", "stop", "verify-boot", "health", "migrate"),
    "demo": ("demo",),
    "files": ("files", "extract"),
    "items": ("items",),
    "keys": ("key",),
    "lab": ("lab",),
    "repository": ("init", "backup", "points", "restore", "verify", "prune"),
}
