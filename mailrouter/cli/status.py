"""Command: ``status`` — is the service running, what it routed today, its model, its last error."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .. import status as report
from ..state import State
from .app import console, settings


def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Whether the service runs, what it routed today, the model in service, the last error."""
    current = settings()
    if not current.state_path.exists():  # reading must not create the database
        result = report.collect(current, None)
    else:
        with State(current.state_path) as db:
            result = report.collect(current, db)
    if as_json:
        console.print_json(json.dumps(result.to_dict()))
        return
    for line in report.format_lines(result):
        console.print(line, highlight=False, markup=False)
