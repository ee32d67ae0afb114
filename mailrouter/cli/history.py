"""Command: ``history`` — the latest decisions recorded in the state database."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer
from rich.table import Table

from ..state import State
from .app import console, settings


def history(
    n: Annotated[int, typer.Option("-n", help="How many decisions.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """The latest decisions recorded in the state database, newest first."""
    current = settings()
    with State(current.state_path) as state:
        entries = state.history(n)
    if as_json:
        for entry in entries:
            typer.echo(json.dumps(asdict(entry), ensure_ascii=False))
        return
    table = Table("at", "state", "from", "subject", "route", "to", "conf.", "reason")
    for e in entries:
        conf = f"{e.confidence:.2f}" if e.confidence is not None else ""
        table.add_row(
            e.at, e.state, e.sender, e.subject[:40], e.route or "", e.destination or "", conf,
            e.reason or "",
        )  # fmt: skip
    console.print(table)
