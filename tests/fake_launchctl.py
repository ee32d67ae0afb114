"""A stand-in for macOS's ``launchctl``, for tests on Linux where launchd cannot run.

Installed by tests as an executable ``launchctl`` on ``PATH`` (a test double of an OS command:
docs/development.md). It keeps launchd's state in ``$FAKE_LAUNCHD_DIR`` and behaves as the real
one does where mailrouter depends on it:

- ``bootout`` returns at once, but ``print`` still knows the label for ``$FAKE_LAUNCHD_LINGER``
  more calls (the job is stopping); a ``bootstrap`` meanwhile fails with "Bootstrap failed: 5:
  Input/output error", as it does on a Mac.
- ``bootstrap`` with no GUI session (the file ``no-gui`` in the state folder) fails with 125,
  "Domain does not support specified action"; a group- or world-writable plist fails with 5.
- a job without ``KeepAlive`` runs once at bootstrap, really: its ``ProgramArguments`` with its
  ``EnvironmentVariables`` and ``WorkingDirectory``, output to ``StandardOutPath``; ``print``
  then shows ``state = not running`` and ``last exit code = N``.

Every call is appended to ``calls.jsonl`` for the tests to read.
"""

from __future__ import annotations

import json
import os
import plistlib
import subprocess
import sys
from pathlib import Path

STATE = Path(os.environ.get("FAKE_LAUNCHD_DIR", "."))
LINGER = int(os.environ.get("FAKE_LAUNCHD_LINGER", "3"))


def _load() -> dict:
    path = STATE / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _save(jobs: dict) -> None:
    tmp = STATE / "state.json.tmp"
    tmp.write_text(json.dumps(jobs))
    os.replace(tmp, STATE / "state.json")


def _fail(message: str, code: int) -> int:
    print(message, file=sys.stderr)
    return code


def _label(target: str) -> str:
    return target.rsplit("/", 1)[-1]


def _print(jobs: dict, target: str) -> int:
    label = _label(target)
    job = jobs.get(label)
    if job is None:
        return _fail(f'Could not find service "{label}" in domain for port', 113)
    if job["linger"] is not None:
        if job["linger"] <= 0:
            del jobs[label]
            _save(jobs)
            return _fail(f'Could not find service "{label}" in domain for port', 113)
        job["linger"] -= 1
        _save(jobs)
    exit_file = STATE / f"{label}.exit"
    done = exit_file.exists()
    state = "not running" if done or job["linger"] is not None else "running"
    last = exit_file.read_text().strip() if done else "(never exited)"
    print(
        f"{target} = {{\n\tpath = {job['plist']}\n\tstate = {state}\n\tlast exit code = {last}\n}}"
    )
    return 0


def _bootout(jobs: dict, target: str) -> int:
    job = jobs.get(_label(target))
    if job is None:
        return _fail("Boot-out failed: 3: No such process", 3)
    if job["linger"] is None:
        job["linger"] = LINGER
        _save(jobs)
    return 0


def _bootstrap(jobs: dict, domain: str, plist: str) -> int:
    if (STATE / "no-gui").exists() or domain != f"gui/{os.getuid()}":
        return _fail("Bootstrap failed: 125: Domain does not support specified action", 125)
    if os.stat(plist).st_mode & 0o022:
        return _fail("Bootstrap failed: 5: Input/output error", 5)
    data = plistlib.loads(Path(plist).read_bytes())
    label = data["Label"]
    if label in jobs:
        return _fail("Bootstrap failed: 5: Input/output error", 5)
    jobs[label] = {"plist": plist, "linger": None}
    _save(jobs)
    (STATE / f"{label}.exit").unlink(missing_ok=True)
    if "KeepAlive" not in data and data.get("RunAtLoad"):
        subprocess.Popen(
            [sys.executable, __file__, "_run", plist],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return 0


def _run_job(plist: str) -> int:
    """What launchd does for a job it starts: its environment, folder and output files."""
    data = plistlib.loads(Path(plist).read_bytes())
    with open(data["StandardOutPath"], "a") as out:
        code = subprocess.run(
            data["ProgramArguments"],
            env=data.get("EnvironmentVariables", {}),
            cwd=data.get("WorkingDirectory"),
            stdout=out,
            stderr=out,
            check=False,
        ).returncode
    tmp = STATE / f"{data['Label']}.exit.tmp"
    tmp.write_text(str(code))
    os.replace(tmp, STATE / f"{data['Label']}.exit")
    return 0


def main(argv: list[str]) -> int:
    with open(STATE / "calls.jsonl", "a") as calls:
        calls.write(json.dumps(argv) + "\n")
    jobs = _load()
    command, args = argv[0], argv[1:]
    if command == "print":
        return _print(jobs, args[0])
    if command == "bootout":
        return _bootout(jobs, args[0])
    if command == "bootstrap":
        return _bootstrap(jobs, args[0], args[1])
    if command == "enable":
        return 0
    if command == "kickstart":
        job = jobs.get(_label(args[-1]))
        return 0 if job and job["linger"] is None else _fail("Could not find service", 113)
    if command == "_run":
        return _run_job(args[0])
    return _fail(f"Unrecognized subcommand: {command}", 64)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
