"""Subcommands of ``bootback``, one module per area; each module defines ``register(subparsers)``."""
