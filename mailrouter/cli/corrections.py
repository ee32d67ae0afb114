"""Commands: ``corrections list | revert ID | digest`` (the poisoning guard and the spam digest)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer
from rich.table import Table

from ..corrections import list_corrections, revert_correction, send_spam_digest
from ..state import State
from .app import app, console, settings

corrections_app = typer.Typer(help="Review staff corrections and the spam digest.")
app.add_typer(corrections_app, name="corrections")


@corrections_app.command("list")
def list_(
    limit: Annotated[int, typer.Option("-n", help="How many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """The latest corrections: who, when, from which department to which, and their status."""
    with State(settings().state_path) as state:
        rows = list_corrections(state, limit)
    if as_json:
        for row in rows:
            typer.echo(json.dumps(asdict(row), ensure_ascii=False))
        return
    table = Table("id", "when", "by", "command", "from", "to", "status", "subject", "example")
    for r in rows:
        table.add_row(str(r.id), r.created, r.by, r.command, r.old_label or "", r.new_label or "",
                      r.status, (r.subject or "")[:40], r.example_id or "")  # fmt: skip
    console.print(table)


@corrections_app.command("revert")
def revert(correction_id: Annotated[int, typer.Argument(help="The id shown by `list`.")]) -> None:
    """Remove the training example a correction recorded (the mail itself stays where it is)."""
    current = settings()
    with State(current.state_path) as state:
        console.print(revert_correction(current, state, correction_id), highlight=False)


@corrections_app.command("digest")
def digest() -> None:
    """Send the spam digest to the triage address now (the service sends it daily)."""
    count = send_spam_digest(settings())
    console.print(f"spam digest: {count} message(s) listed", highlight=False)
