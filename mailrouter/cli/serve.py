"""Command: ``serve`` — route the mailbox, forever or once."""

from __future__ import annotations

import contextlib
import os
from typing import Annotated

import typer
from rich.table import Table

from ..config import Settings, check_serve_secrets
from ..datalock import DataDirLock
from ..logs import cap_stderr_file
from ..pipeline.types import RoundReport
from ..service import run_forever
from ..wiring import build_pipeline
from .app import console, settings


def serve(
    once: Annotated[
        bool, typer.Option("--once", help="Process the mailbox once and exit.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Classify and report; send, move, flag and record nothing."),
    ] = False,
) -> None:
    """Route the contact mailbox: forever (IDLE), or once with --once."""
    if os.environ.get("MAILROUTER_SUPERVISED") == "launchd":
        cap_stderr_file()  # before the configuration is read: its errors land there
    current = settings()
    check_serve_secrets(current, dry_run=dry_run)
    with _one_process(current, once=once, dry_run=dry_run):
        if not once:
            raise typer.Exit(run_forever(current, dry_run=dry_run) or 0)
        pipeline = build_pipeline(current, dry_run=dry_run)
        try:
            report = pipeline.run_once()
        finally:
            pipeline.close()
    _print_round(report, dry_run)


def _one_process(
    current: Settings, *, once: bool, dry_run: bool
) -> contextlib.AbstractContextManager[object]:
    """The data folder's lock (see :mod:`mailrouter.datalock`). ``serve --once --dry-run`` goes
    without: it changes nothing, so it may look at the mailbox beside a live service. A long
    dry run takes it, because it owns the service's status (pid, heartbeat) while it runs."""
    if once and dry_run:
        return contextlib.nullcontext()
    command = "mailrouter serve" + (" --once" if once else "") + (" --dry-run" if dry_run else "")
    return DataDirLock(current.data_dir, command)


def _print_round(report: RoundReport, dry_run: bool) -> None:
    if dry_run:
        table = Table("uid", "from", "subject", "route", "department", "conf.", "reason")
        for d in report.decisions:
            conf = f"{d.confidence:.2f}" if d.confidence is not None else ""
            table.add_row(
                str(d.uid), d.sender, d.subject[:50], d.route, d.department or "", conf, d.reason
            )
        console.print(table)
    verb = "would route" if dry_run else "routed"
    console.print(
        f"{verb} {len(report.decisions)} of {report.seen} message(s): forwarded "
        f"{report.forwarded}, filed {report.filed}, deferred {report.deferred}, failed "
        f"{report.failed}, duplicates {report.duplicates}, waiting {report.waiting} "
        f"({report.seconds:.1f} s)",
        highlight=False,
    )
