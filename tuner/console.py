"""What every etune command shares: the consoles, the one-line error exit, the records database.

A module of its own so the command modules (tuner.cli, tuner.measure_cmd, tuner.export_cmd) import
it and never each other.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """A user mistake: one readable line on stderr and a non-zero exit, never a traceback."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def records_db(path: Path, **options):
    """measurements.records.RecordsDB.open for a command (``readonly=True`` for the ones that only
    read): a path that is no usable records database ends the command with one line (exit 2), and
    so does an error of the database later on (a full disk, say: exit 1)."""
    from etune.measurements.records import RecordsDB, RecordsDBError

    try:
        records = RecordsDB.open(path, **options)
    except RecordsDBError as exc:
        fail(str(exc))
    try:
        with records:
            yield records
    except RecordsDBError as exc:
        fail(str(exc), code=1)
