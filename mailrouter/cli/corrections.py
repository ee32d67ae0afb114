"""Command group: ``corrections list | revert ID | review [accept|reject ID] | digest``.

``review`` settles the corrections held because they contradict an existing example (see
:mod:`mailrouter.dataset`): accepting one relabels that example, rejecting it leaves the dataset
as it is. Either way the corrections waiting on it are closed in the state database.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from ..corrections.digest import send_spam_digest
from ..corrections.review import list_corrections, revert_correction
from ..dataset import Dataset
from ..state import State
from .app import console, echo_json_lines, settings

group = typer.Typer(help="Review staff corrections and the spam digest.", no_args_is_help=True)
review_group = typer.Typer(
    help="Corrections held because they contradict an existing example: list, accept, reject.",
    invoke_without_command=True,
)
group.add_typer(review_group, name="review")
EXCERPT = 60


@group.command("list")
def list_(
    limit: Annotated[int, typer.Option("-n", help="How many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """The latest corrections: who, when, from which department to which, and their status."""
    with State(settings().state_path) as state:
        rows = list_corrections(state, limit)
    if as_json:
        echo_json_lines(rows)
        return
    table = Table("id", "when", "by", "command", "from", "to", "status", "subject", "example")
    for r in rows:
        table.add_row(str(r.id), r.created, r.by, r.command, r.old_label or "", r.new_label or "",
                      r.status, (r.subject or "")[:40], r.example_id or "")  # fmt: skip
    console.print(table)


@group.command("revert")
def revert(correction_id: Annotated[int, typer.Argument(help="The id shown by `list`.")]) -> None:
    """Remove the training example a correction recorded (the mail itself stays where it is)."""
    current = settings()
    with State(current.state_path) as state:
        console.print(revert_correction(current, state, correction_id), highlight=False)


@review_group.callback()
def review(
    context: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List held corrections: the email, its current label, the proposed one, who and when."""
    if context.invoked_subcommand is not None:
        return
    held = Dataset.from_settings(settings()).held()
    if as_json:
        for h in held:
            row = {"id": h.example.id, "example": h.target_id, "text": h.example.text,
                   "subject": h.example.subject, "current": h.target.label if h.target else None,
                   "proposed": h.example.label, "by": h.example.by, "created": h.example.created,
                   "kind": h.target.kind if h.target else None}  # fmt: skip
            typer.echo(json.dumps(row, ensure_ascii=False))
        return
    if not held:
        console.print("no correction waiting for review", highlight=False)
        return
    table = Table("id", "email", "current", "proposed", "by", "when")
    for h in held:
        title = " ".join((h.example.subject + " " + h.example.text).split())[:EXCERPT]
        now = f"{h.target.label} ({h.target.kind})" if h.target else "(gone)"
        table.add_row(h.example.id, title, now, h.example.label, h.example.by or "",
                      h.example.created)  # fmt: skip
    console.print(table)
    console.print(
        "`mailrouter corrections review accept ID` relabels the example, `… reject ID` drops "
        "the correction",
        highlight=False,
    )


@review_group.command("accept")
def accept(held_id: Annotated[str, typer.Argument(help="The id shown by `review`.")]) -> None:
    """Apply a held correction: the example takes the proposed label."""
    current = settings()
    stored = Dataset.from_settings(current).accept_held(held_id)
    with State(current.state_path) as state:
        state.close_held_corrections(held_id, "applied", stored.id)
    console.print(
        f"accepted: example {stored.id} is now {stored.label} ({stored.split})", highlight=False
    )


@review_group.command("reject")
def reject(held_id: Annotated[str, typer.Argument(help="The id shown by `review`.")]) -> None:
    """Drop a held correction; the dataset stays as it is."""
    current = settings()
    entry = Dataset.from_settings(current).reject_held(held_id)
    with State(current.state_path) as state:
        state.close_held_corrections(held_id, "rejected")
    console.print(f"rejected: {entry.label} for {entry.id} was not applied", highlight=False)


@group.command("digest")
def digest() -> None:
    """Send the spam digest to the triage address now (the service sends it daily)."""
    count = send_spam_digest(settings())
    console.print(f"spam digest: {count} message(s) listed", highlight=False)
