"""Carrying out a :class:`~mailrouter.deploy.Plan`: the runner that starts ``launchctl`` and
``systemctl``, launchd's asynchronous unloading, and what its error numbers mean.

launchd as it behaves, not as one would like it to:

- ``launchctl bootout`` returns before the job has exited (it sends SIGTERM and lets the job
  take up to ``ExitTimeOut``); a ``bootstrap`` while launchd still knows the label fails with
  "Bootstrap failed: 5: Input/output error" (37, "Operation already in progress", on some
  versions). So a plan waits, with :class:`~mailrouter.deploy.WaitGone`, until
  ``launchctl print`` answers that it cannot find the service (launchctl(1), ``print``).
- ``bootstrap gui/<uid>`` fails with 125, "Domain does not support specified action", when the
  user has no GUI login session (over SSH before anyone logged in at the Mac): the ``gui``
  domain only exists once the user logs in at the GUI (launchctl(1), "login/<asid>" and
  "gui/<uid>" targets).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..files import make_dirs, private_file
from . import (
    MakeDir,
    Plan,
    PrivateFile,
    RemoveFile,
    Run,
    ShowFile,
    Step,
    WaitExited,
    WaitGone,
    WriteFile,
)

POLL_SECONDS = 0.25
# launchctl's error numbers (what it prints after "Bootstrap failed:", also its exit status).
EIO = 5
EALREADY = 37
ENODOMAIN = 125  # "Domain does not support specified action"

NO_GUI_SESSION = (
    "launchd n'a pas de session graphique pour cet utilisateur (erreur 125) : ouvrez une session "
    "sur le Mac lui-même (à l'écran, ou par Partage d'écran), puis relancez la commande ; pour un "
    "Mac sans session ouverte, activez l'ouverture de session automatique, ou installez mailrouter "
    "comme LaunchDaemon (docs/service.md).\n"
    "launchd has no GUI session for this user (error 125): log in at the Mac itself (at its "
    "screen, or with Screen Sharing), then run the command again; for a Mac nobody logs in to, "
    "turn on automatic login, or install mailrouter as a LaunchDaemon (docs/service.md)."
)
STILL_LOADED = (
    "launchd refused the job (error {code}): it still holds a previous copy (run the command "
    "again in a minute; `mailrouter service status` shows what launchd knows), or the plist is "
    "not yours or is group-writable (`ls -l` it); launchd's log says which: "
    "`log show --last 5m --predicate 'process == \"launchd\"'`."
)


@dataclass(frozen=True)
class Result:
    code: int
    output: str = ""


class Runner(Protocol):
    """Runs one command: attached to the terminal, or with ``capture`` its output returned."""

    def __call__(self, argv: Sequence[str], *, capture: bool = False) -> Result: ...


def subprocess_runner(argv: Sequence[str], *, capture: bool = False) -> Result:
    """Run a command with the terminal attached (``status`` and ``logs`` print to it), or
    quietly with its output captured (``launchctl print`` while waiting)."""
    try:
        done = subprocess.run(
            list(argv),
            check=False,
            capture_output=capture,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
    except FileNotFoundError:
        return Result(127)
    return Result(done.returncode, (done.stdout or "") + (done.stderr or "") if capture else "")


def explain(argv: Sequence[str], code: int) -> str | None:
    """What a failed ``launchctl`` command's error number means and what to do."""
    if not argv or argv[0] != "launchctl":
        return None
    if code == ENODOMAIN:
        return NO_GUI_SESSION
    if len(argv) > 1 and argv[1] == "bootstrap" and code in (EIO, EALREADY):
        return STILL_LOADED.format(code=code)
    return None


def _known(runner: Runner, service: str) -> Result | None:
    """``launchctl print``'s answer while launchd knows ``service``; None once it does not."""
    result = runner(("launchctl", "print", service), capture=True)
    return result if result.code == 0 else None


def wait_gone(
    runner: Runner,
    step: WaitGone,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """True once launchd has forgotten the service; False after ``step.timeout`` seconds."""
    deadline = clock() + step.timeout
    while _known(runner, step.service) is not None:
        if clock() >= deadline:
            return False
        sleep(POLL_SECONDS)
    return True


_STATE_RE = re.compile(r"^\s*state = (.+)$", re.M)
_EXIT_RE = re.compile(r"^\s*last exit code = (-?\d+)", re.M)


def exit_status(printed: str) -> int | None:
    """A job's exit status from ``launchctl print``: None while it runs or has not yet exited.

    launchctl(1) warns that ``print``'s output is not API: only two lines are read, ``state =
    …`` and ``last exit code = N`` ("(never exited)" before the first exit), present in every
    macOS since launchctl 2 (10.10). Should they change, the wait times out and says so, and
    the doctor's output file is still shown."""
    state = _STATE_RE.search(printed)
    code = _EXIT_RE.search(printed)
    if code is None or (state is not None and state.group(1).strip() == "running"):
        return None
    return int(code.group(1))


def wait_exited(
    runner: Runner,
    step: WaitExited,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int | None:
    """The one-shot job's exit status once it has exited; None after ``step.timeout``."""
    deadline = clock() + step.timeout
    while True:
        known = _known(runner, step.service)
        status = exit_status(known.output) if known is not None else None
        if status is not None:
            return status
        if clock() >= deadline:
            return None
        sleep(POLL_SECONDS)


def _write(step: WriteFile) -> None:
    """Write the file, with the plan's mode whatever the umask (a umask of 002 would leave the
    plist group-writable, which launchd refuses), and put it in place in one rename."""
    tmp = step.path.with_name(f".{step.path.name}.tmp")
    tmp.write_text(step.text, encoding="utf-8")
    os.chmod(tmp, step.mode)
    os.replace(tmp, step.path)


def _do_file_step(step: Step, echo: Callable[[str], None], dry_run: bool) -> None:
    if isinstance(step, WriteFile):
        echo(f"write {step.path} (mode {step.mode:o})")
        if not dry_run:
            _write(step)
    elif isinstance(step, MakeDir):
        echo(f"mkdir -p {step.path}")
        if not dry_run:
            _make_dir(step)
    elif isinstance(step, PrivateFile):
        if not dry_run:
            private_file(step.path)
    elif isinstance(step, RemoveFile):
        echo(f"rm -f {step.path}")
        if not dry_run:
            step.path.unlink(missing_ok=True)
    elif isinstance(step, ShowFile) and not dry_run:
        echo(_read(step.path).rstrip("\n"))


def _make_dir(step: MakeDir) -> None:
    if step.mode is None:
        step.path.mkdir(parents=True, exist_ok=True)
    else:
        make_dirs(step.path)
        os.chmod(step.path, step.mode)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"({path}: nothing was written)"


def _run(step: Run, runner: Runner, echo: Callable[[str], None]) -> int:
    code = runner(step.argv, capture=step.quiet).code
    if code == 127:
        echo(f"{step.argv[0]}: command not found")
    elif code and step.check:
        hint = explain(step.argv, code)
        if hint:
            echo(hint)
    return code


def _wait(step: WaitGone | WaitExited, runner: Runner, echo: Callable[[str], None]) -> int:
    """0 once launchd has forgotten the service; for a one-shot job, the job's exit status."""
    if isinstance(step, WaitGone):
        if wait_gone(runner, step):
            return 0
        echo(
            f"launchd still knows {step.service} {step.timeout:.0f} s after `launchctl bootout`: "
            "its process has not exited; check `mailrouter service status`, then run the "
            "command again"
        )
        return 1
    status = wait_exited(runner, step)
    if status is None:
        echo(f"{step.service} did not finish within {step.timeout:.0f} s")
        return 1
    return status


def execute(
    the_plan: Plan,
    *,
    runner: Runner = subprocess_runner,
    echo: Callable[[str], None] = print,
    dry_run: bool = False,
) -> int:
    """Carry out a plan; stops at the first failed checked command or wait and returns its
    status (a launchctl error number is explained). A one-shot job's exit status (``service
    doctor``) is the plan's. With ``dry_run`` every step is printed and nothing is changed."""
    result = 0
    for step in the_plan.steps:
        if isinstance(step, Run):
            echo(f"$ {step}")
            code = 0 if dry_run else _run(step, runner, echo)
            if code and step.check:
                return code
        elif isinstance(step, WaitGone | WaitExited):
            echo(f"(wait for launchd: {step.service})")
            code = 0 if dry_run else _wait(step, runner, echo)
            if isinstance(step, WaitExited):
                result = code
            elif code:
                return code
        else:
            _do_file_step(step, echo, dry_run)
    return result
