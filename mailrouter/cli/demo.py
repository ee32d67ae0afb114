"""Command: ``demo`` — the whole loop on local servers: route, correct by reply, retrain."""

from __future__ import annotations

from typing import Annotated

import typer

from ..demo import Demo
from .app import console


def demo(
    emails: Annotated[int, typer.Option(help="How many emails to drop into the inbox.")] = 20,
    with_mlx: Annotated[
        bool, typer.Option("--with-mlx", help="Also LoRA-train a tiny model with mlx-lm.")
    ] = False,
    backend: Annotated[
        str | None,
        typer.Option(help="ollama or baseline (default: Ollama when one answers here)."),
    ] = None,
) -> None:
    """Run the router on a local IMAP server and SMTP sink with the bundled data; no network."""
    if backend not in (None, "ollama", "baseline"):
        raise typer.BadParameter("expected ollama or baseline", param_hint="--backend")
    Demo(console, emails=emails, with_mlx=with_mlx, backend=backend).run()
