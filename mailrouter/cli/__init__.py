"""The ``mailrouter`` command: its commands, in the order ``--help`` lists them, and ``main()``.

Each top-level command or group lives in the module named after it; :mod:`.app` holds what they
share (the Typer app, settings, consoles).
"""

from __future__ import annotations

import sys

from rich.markup import escape

from ..errors import MailRouterError
from ..files import private_umask
from . import (
    classify,
    config,
    corrections,
    dataset,
    demo,
    doctor,
    evaluate,
    history,
    init,
    models,
    reprocess,
    rules,
    selftest,
    serve,
    service,
    status,
    train,
)
from .app import app, err_console

for command in (
    classify.classify,
    evaluate.evaluate,
    init.init,
    demo.demo,
    serve.serve,
    reprocess.reprocess,
    history.history,
    doctor.doctor,
    selftest.selftest,
    status.status,
    train.train,
):
    app.command()(command)
for name, group in (
    ("config", config.group),
    ("corrections", corrections.group),
    ("dataset", dataset.group),
    ("service", service.group),
    ("models", models.group),
    ("rules", rules.group),
):
    app.add_typer(group, name=name)


def main() -> None:
    """Run the CLI; a ``MailRouterError`` is one clear message and its exit status, no traceback.

    Typer runs in click's standalone mode: a usage error (unknown command, bad option, missing
    argument) prints the usage line and the error and exits 2, Ctrl-C exits 130, ``typer.Exit``
    is the exit status. Every file this process and its children create is private to its owner
    (see :mod:`mailrouter.files`).
    """
    private_umask()
    try:
        app()
    except MailRouterError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
