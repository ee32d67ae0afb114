"""Entry point of the ``mailrouter`` command."""

from __future__ import annotations

import sys

from rich.markup import escape

from ..errors import MailRouterError
from ..files import private_umask
from . import (  # noqa: F401 - each module registers its commands on the app
    classify,
    config_cmd,
    corrections,
    dataset,
    demo,
    serve,
    service,
    train,
)
from .app import app, err_console


def main() -> None:
    """Run the CLI; a ``MailRouterError`` is one clear message and its exit status, no traceback.

    Every file this process and its children create is private to its owner (see
    :mod:`mailrouter.files`).
    """
    private_umask()
    try:
        code = app(standalone_mode=False)
    except MailRouterError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # click's own usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)
