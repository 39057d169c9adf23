"""Progress display for long commands: a rich bar on a terminal, silence otherwise (or with --json)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def byte_progress(enabled: bool) -> Iterator:
    """Yields ``update(label, done, total)``; draws a bar per label when ``enabled`` and stderr is a TTY."""
    if not enabled or not sys.stderr.isatty():
        yield lambda label, done, total: None
        return
    # Imported here: every bootback command imports this module, few draw a bar, and rich takes ~40 ms to load.
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import (  # noqa: PLC0415
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        tasks: dict[str, int] = {}

        def update(label: str, done: int, total: int | None) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done, total=total)

        yield update
