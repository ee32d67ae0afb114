"""Command: ``reprocess`` — decide the mail already in a folder again, show what would change;
``--forward`` routes what was never routed (see :mod:`mailrouter.reprocess`)."""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table

from ..config import check_serve_secrets
from ..datalock import DataDirLock
from ..reprocess import Comparison, Reprocessed, outcome
from ..reprocess import reprocess as run_reprocess
from .app import BackendOption, check_backend, console, settings


def reprocess(
    since: Annotated[
        datetime,
        typer.Option(
            "--since",
            formats=["%Y-%m-%d"],
            metavar="YYYY-MM-DD",
            help="Mail received on this day or later.",
        ),
    ],
    folder: Annotated[
        str | None,
        typer.Option("--folder", help="The folder to read (default: mailbox.routed_folder)."),
    ] = None,
    backend: BackendOption = None,
    forward: Annotated[
        bool,
        typer.Option("--forward", help="Route the mail of the folder that was never routed, once."),
    ] = False,
) -> None:
    """Classify the mail already in a folder and show what would be decided differently now;
    nothing is sent, moved, flagged or recorded unless --forward."""
    current = settings()
    check_serve_secrets(current, dry_run=not forward)
    lock = (
        DataDirLock(current.data_dir, "mailrouter reprocess --forward")
        if forward
        else contextlib.nullcontext()
    )
    with lock:
        found = run_reprocess(
            current,
            since=since.date(),
            folder=folder,
            backend=check_backend(backend),
            forward=forward,
        )
    _print(found)


def _was(comparison: Comparison) -> str:
    record = comparison.recorded
    if record is None:
        return "never routed"
    conf = f" {record.confidence:.2f}" if record.confidence is not None else ""
    return f"{outcome(record.route or '', record.department)}{conf}"


def _print(found: Reprocessed) -> None:
    shown = [c for c in found.compared if c.changed or c.recorded is None]
    if shown:
        table = Table("uid", "from", "subject", "was", "now", "conf.", "reason")
        for c in shown:
            d = c.decision
            conf = f"{d.confidence:.2f}" if d.confidence is not None else ""
            table.add_row(str(d.uid), d.sender, d.subject[:40], _was(c),
                          outcome(d.route, d.department), conf, d.reason)  # fmt: skip
        console.print(table)
    report = found.report
    same = len(found.compared) - len(found.changed) - len(found.unknown)
    console.print(
        f"{report.seen} message(s) in {found.folder} since {found.since.isoformat()}: "
        f"{len(found.changed)} would change, {same} unchanged, {len(found.unknown)} never routed"
        + (f", {report.waiting} not decided (classifier unavailable)" if report.waiting else ""),
        highlight=False,
    )
    routed = found.forwarded
    if routed is not None:
        console.print(
            f"routed {len(routed.decisions)} never-routed message(s): forwarded "
            f"{routed.forwarded}, filed {routed.filed}, deferred {routed.deferred}, failed "
            f"{routed.failed}, waiting {routed.waiting}",
            highlight=False,
        )
