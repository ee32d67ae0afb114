"""The ``mailrouter`` Typer application and what every command shares: settings and errors.

Command bodies stay short: they parse arguments, call into the modules and print. Each group of
commands lives in its own module of this package and registers itself on :data:`app`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..config import Settings, load_settings
from ..logs import setup_logging

app = typer.Typer(
    name="mailrouter",
    help="Route the contact@ mailbox to departments with a local fine-tuned LLM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


class _State:
    config: Path | None = None
    verbose: bool = False
    _settings: Settings | None = None


state = _State()


@app.callback()
def _main(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="TOML config file (default: $MAILROUTER_CONFIG, else config/mailrouter.toml).",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    state.config = config
    state.verbose = verbose
    state._settings = None


def settings() -> Settings:
    """The settings for this invocation, loaded once; logging configured from them."""
    if state._settings is None:
        state._settings = load_settings(state.config)
        setup_logging(
            fmt=state._settings.log.format,
            level="DEBUG" if state.verbose else state._settings.log.level,
        )
    return state._settings
