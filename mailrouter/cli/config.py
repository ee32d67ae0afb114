"""Command group: ``config check`` (validate the configuration and print the effective one) and
``config example`` (the documented example, every field with its comment)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..config import masked_dump
from ..files import EXAMPLE_CONFIG
from .app import console, settings, to_toml

group = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)


@group.command("check")
def config_check(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Validate the configuration and print the effective values, secrets masked."""
    current = settings()
    data = masked_dump(current)
    if as_json:
        console.print_json(json.dumps(data))
        return
    console.print(f"# config: {current.source or 'defaults (no file)'}", highlight=False)
    console.print(to_toml(data), highlight=False, markup=False)


@group.command("example")
def config_example() -> None:
    """Print the documented example configuration (every field, with its comment)."""
    typer.echo(EXAMPLE_CONFIG.read_text(encoding="utf-8"), nl=False)
