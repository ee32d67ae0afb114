"""Command group: ``models list | promote VERSION | rollback`` (published model versions)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from ..errors import TrainingError
from ..state import open_state
from ..training import registry
from ..training.publish import latest_name
from ..training.publish import promote as do_promote
from ..training.publish import rollback as do_rollback
from .app import console, err_console, settings

group = typer.Typer(
    help="Published model versions: list, promote, roll back.", no_args_is_help=True
)


@group.command("list")
def list_(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Published versions (newest first) and the last training runs."""
    with open_state(settings()) as state:
        versions = registry.versions(state)
        runs = registry.runs(state, limit=10)
    if as_json:
        data = {
            "versions": [v.__dict__ for v in versions],
            "runs": [{**r.__dict__, "rule": r.rule} for r in runs],
        }
        typer.echo(json.dumps(data, ensure_ascii=False, default=str))
        return
    table = Table(title="model versions")
    for col in ("version", "name", "created", "status", "accuracy (Ollama)", "macro-F1", "run"):
        table.add_column(col)
    for v in versions:
        o = v.metrics.get("ollama") or {}
        table.add_row(
            v.version,
            v.name,
            v.created,
            v.status,
            _fmt(o.get("accuracy")),
            _fmt(o.get("macro_f1")),
            str(v.metrics.get("run", "")),
        )
    console.print(table)
    runs_table = Table(title="training runs")
    for col in ("run", "started", "decision", "gate rule", "reason"):
        runs_table.add_column(col)
    for r in runs:
        runs_table.add_row(
            str(r.id), r.started, r.decision or "", r.rule or "", (r.reason or "")[:100]
        )
    console.print(runs_table)


@group.command("promote")
def promote(version: Annotated[str, typer.Argument(help="A version, e.g. v3.")]) -> None:
    """Put a kept version in service (copies it to the router's model name)."""
    current = settings()
    with open_state(current) as state:
        model = do_promote(current, state, version if version.startswith("v") else f"v{version}")
    console.print(f"{model.name} is in service as {latest_name(current)}", highlight=False)


@group.command("rollback")
def rollback() -> None:
    """Put back the version that was in service before the current one."""
    current = settings()
    with open_state(current) as state:
        try:
            model = do_rollback(current, state)
        except TrainingError as exc:
            err_console.print(f"[red]error:[/red] {exc}", highlight=False)
            raise typer.Exit(1) from exc
    console.print(f"rolled back: {model.name} is in service as {latest_name(current)}")


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "-"
