"""Command: ``history`` — the latest decisions recorded in the state database."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..state import State
from .app import console, echo_json_lines, settings


def history(
    n: Annotated[int, typer.Option("-n", help="How many decisions.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    explain: Annotated[
        int | None,
        typer.Option(help="A message's id (column 'msg'): what the classifier read and said."),
    ] = None,
) -> None:
    """The latest decisions recorded in the state database, newest first, with their reason."""
    current = settings()
    if explain is not None:
        _explain(current.state_path, explain)
        return
    with State(current.state_path) as state:
        entries = state.history(n)
    if as_json:
        echo_json_lines(entries)
        return
    table = Table("msg", "at", "state", "from", "subject", "route", "to", "conf.", "reason")
    for e in entries:
        conf = f"{e.confidence:.2f}" if e.confidence is not None else ""
        table.add_row(
            str(e.message), e.at, e.state, e.sender, e.subject[:40], e.route or "",
            e.destination or "", conf, e.reason or "",
        )  # fmt: skip
    console.print(table)


def _explain(state_path: Path, message: int) -> None:
    with State(state_path) as state:
        try:
            record = state.message(message)
        except KeyError:
            raise typer.BadParameter(f"no message {message} in {state_path}") from None
    console.print(f"message {record.id}: {record.subject!r} from {record.sender}", highlight=False)
    console.print(f"route: {record.route} → {record.destination or '-'}", highlight=False)
    console.print(f"reason: {record.reason or '-'}", highlight=False)
    if not record.explain:
        console.print("no classifier answer recorded (decided before the model, or older)")
        return
    data = json.loads(record.explain)
    console.print(f"model: {data.get('model')}   answer: {data.get('answer')!r}", highlight=False)
    for label, p in (data.get("probabilities") or {}).items():
        console.print(f"  {label:<14} {p:6.1%}", highlight=False)
    console.print("email text in the prompt:", highlight=False)
    console.print(data.get("text", ""), highlight=False, markup=False)
