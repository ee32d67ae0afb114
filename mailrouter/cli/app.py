"""The ``mailrouter`` Typer application and what its commands share: settings, consoles, options.

Command bodies stay short: they parse arguments, call into the modules and print. Each top-level
command or group lives in the module of this package named after it; ``cli/__init__.py`` adds them
to :data:`app` in the order ``--help`` lists them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from ..config import Settings, load_settings
from ..errors import ClassifierError
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

BACKENDS = ("ollama", "mlx", "baseline", "openai")
BackendOption = Annotated[
    str | None,
    typer.Option("--backend", "-b", help="ollama|mlx|baseline|openai (default: config)."),
]


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


def echo_json_lines(rows: Iterable[Any]) -> None:
    """``--json``: one JSON object per line, one line per record (dataclasses)."""
    for row in rows:
        typer.echo(json.dumps(asdict(row), ensure_ascii=False))


def check_backend(name: str | None) -> str | None:
    """``--backend`` as given, refused with the allowed values when it names no backend."""
    if name is not None and name not in BACKENDS:
        raise ClassifierError(f"--backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps("" if value is None else str(value), ensure_ascii=False)


def to_toml(data: dict[str, Any]) -> str:
    """Settings data as TOML (top-level scalars, tables, then arrays of tables): what ``config
    check`` prints and ``init`` writes."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    arrays: list[tuple[str, list[dict[str, Any]]]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            arrays.append((key, value))
        elif value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables:
        lines += ["", f"[{name}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    for name, items in arrays:
        for item in items:
            lines += ["", f"[[{name}]]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in item.items() if v is not None]
    return "\n".join(lines) + "\n"
