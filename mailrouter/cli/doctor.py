"""Command: ``doctor`` — every outside dependency checked, one line each, with the fix."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import doctor as checks
from .app import console, state


def doctor(
    send_test: Annotated[
        bool,
        typer.Option("--send-test", help="Also send a real test message to the triage address."),
    ] = False,
) -> None:
    """Check the config, mailbox, SMTP, Ollama, training prerequisites and the dataset."""
    results = checks.run(
        state.config,
        send_test=send_test,
        emit=lambda check: console.print(
            check.line(), highlight=False, markup=False, soft_wrap=True
        ),
    )
    if checks.failed(results):
        raise typer.Exit(1)
