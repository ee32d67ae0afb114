"""Command: ``selftest`` — this machine's Ollama and mlx-lm, end to end, and a report to paste."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import selftest as checks
from .app import console, settings


def selftest(
    keep: Annotated[
        Path | None,
        typer.Option("--keep", help="Work in this folder and leave its files (model, run, logs)."),
    ] = None,
) -> None:
    """Train, publish and classify with a tiny model on this Ollama; a report for an issue."""
    console.print(
        "selftest: a tiny model trained, published to Ollama, classified, then deleted "
        "(about a minute)",
        highlight=False,
    )
    report = checks.run(
        settings(),
        lambda check: console.print(check.line(), highlight=False, markup=False, soft_wrap=True),
        keep=keep,
    )
    console.print("\npaste this into an issue:\n", highlight=False)
    console.print(
        "```text\n" + report.text() + "\n```", highlight=False, markup=False, soft_wrap=True
    )
    if not report.ok:
        raise typer.Exit(1)
