"""Commands: ``rules test FILE.eml…`` and ``rules suggest``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..mail.parse import parse_email
from ..router import rule_route
from ..rules import as_toml, first_match, suggest
from ..state import State
from .app import console, settings

group = typer.Typer(help="Rules before the model: try them on mail, or get suggestions.")


@group.command("test")
def test(
    files: Annotated[list[Path], typer.Argument(help="Emails (.eml) to try the rules on.")],
) -> None:
    """The rule each email matches (the first, as the router tries them), or none."""
    current = settings()
    for path in files:
        email = parse_email(path.read_bytes(), max_bytes=current.mailbox.max_message_bytes)
        rule = first_match(current.rules, email)
        if rule is None:
            typer.echo(f"{path}: no rule (the model decides)")
            continue
        route = rule_route(rule, current)
        where = route.department or route.kind
        typer.echo(f'{path}: rule "{rule.name}" → {where} ({route.kind})')


@group.command("suggest")
def suggest_(
    at_least: Annotated[int, typer.Option(help="Corrections needed, all the same way.")] = 3,
) -> None:
    """Rules the corrections argue for, as TOML to paste into the config (never applied)."""
    current = settings()
    with State(current.state_path) as state:
        rules = suggest(state.corrected_senders(), at_least=at_least)
    if not rules:
        console.print("no suggestion: no sender or domain was corrected the same way "
                      f"{at_least} times", highlight=False)  # fmt: skip
        return
    typer.echo(as_toml(rules), nl=False)
