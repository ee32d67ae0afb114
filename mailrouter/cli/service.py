"""Command group: ``service install | uninstall | restart | status | logs`` (launchd or systemd)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from .. import deploy
from ..config import resolve_config_path
from ..deploy import run as deploy_run
from .app import console, settings, state

group = typer.Typer(
    help="Run `mailrouter serve` as a launchd agent (macOS) or a systemd user unit (Linux).",
    no_args_is_help=True,
)

DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the steps; change nothing.")]
Instance = Annotated[
    str | None,
    typer.Option(
        "--instance",
        help="Name of this service (default: the configuration file's name; "
        "mailrouter.toml is the default service).",
    ),
]

# Swap point for tests: the function that runs launchctl / systemctl.
runner: deploy_run.Runner = deploy_run.subprocess_runner


def _target(instance: str | None, workdir: Path | None = None) -> deploy.Target:
    """The service of the configuration file in use; the file is read (and checked) once
    there is one: the service's log is ``log.file`` when it sets one."""
    path = resolve_config_path(state.config)
    log_file = settings().log.file if path is not None else None
    return deploy.target_for(path, workdir=workdir, instance=instance, log_file=log_file)


def _run(
    action: deploy.Action,
    dry_run: bool,
    target: deploy.Target,
    *,
    lines: int = 100,
    follow: bool = False,
) -> None:
    have_plutil = shutil.which("plutil") is not None
    the_plan = deploy.plan(action, target, have_plutil=have_plutil, lines=lines, follow=follow)
    code = deploy_run.execute(
        the_plan,
        runner=runner,
        echo=lambda line: console.print(line, highlight=False, markup=False),
        dry_run=dry_run,
    )
    if code:
        raise typer.Exit(code)


@group.command()
def install(
    dry_run: DryRun = False,
    workdir: Annotated[
        Path | None,
        typer.Option(help="Working directory of the service (data_dir is relative to it)."),
    ] = None,
    instance: Instance = None,
) -> None:
    """Write the agent/unit with this virtualenv's paths and start it now and at every login."""
    target = _target(instance, workdir)
    deploy.check_not_taken(target)
    _run("install", dry_run, target)
    if not dry_run:
        console.print(f"installed {target.unit_file}; check it with `mailrouter service status`")


@group.command()
def uninstall(dry_run: DryRun = False, instance: Instance = None) -> None:
    """Stop the service and remove the agent/unit (data and logs are kept)."""
    _run("uninstall", dry_run, _target(instance))


@group.command()
def restart(dry_run: DryRun = False, instance: Instance = None) -> None:
    """Restart the running service (after a config change or an upgrade)."""
    _run("restart", dry_run, _target(instance))


@group.command("status")
def service_status(dry_run: DryRun = False, instance: Instance = None) -> None:
    """What launchd/systemd says about the service (see also `mailrouter status`)."""
    _run("status", dry_run, _target(instance))


@group.command()
def logs(
    lines: Annotated[int, typer.Option("--lines", "-n", help="Lines to show.")] = 100,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
    dry_run: DryRun = False,
    instance: Instance = None,
) -> None:
    """The service's log lines (launchd: ~/Library/Logs/mailrouter/; systemd: the journal)."""
    _run("logs", dry_run, _target(instance), lines=lines, follow=follow)


@group.command("doctor")
def service_doctor(dry_run: DryRun = False, instance: Instance = None) -> None:
    """Run `mailrouter doctor` inside the service's own context and show its result.

    launchd: a one-shot job in the agent's GUI domain, with the agent's environment, so macOS
    Local Network privacy applies to it as to the agent (a doctor run from Terminal is exempt).
    systemd: a transient unit of the user's manager (systemd-run --user --wait --pipe)."""
    _run("doctor", dry_run, _target(instance))
