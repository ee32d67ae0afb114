"""The ``mailrouter`` command as a user meets it: a typo gets click's usage line and the error,
exit 2, never a traceback; a ``MailRouterError`` is one ``error:`` line and its exit status;
Ctrl-C is 130.

Each case runs the installed console script (or ``python -m mailrouter``) in a child process, the
way a shell does: ``CliRunner`` would bypass ``main()``, where these exits are decided.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("mailrouter")
MODULE = [sys.executable, "-m", "mailrouter"]

# A command added in the child only, which gets a real SIGINT while it runs.
CTRL_C = (
    "import os, signal, time\n"
    "import mailrouter.cli as cli\n"
    "@cli.app.command('wait')\n"
    "def wait() -> None:\n"
    "    os.kill(os.getpid(), signal.SIGINT)\n"
    "    time.sleep(30)\n"
    "cli.main()\n"
)


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL
    )


def mailrouter(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed console script, as a shell runs it."""
    if not SCRIPT.exists():
        pytest.skip(f"no console script at {SCRIPT} (install the package: pip install -e .)")
    return run([str(SCRIPT), *args])


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["clasify"], "No such command 'clasify'. Did you mean 'classify'?"),
        (["dataset", "bogus"], "No such command 'bogus'."),
        (["serve", "--onse"], "No such option: --onse"),
        (["--bogus", "status"], "No such option: --bogus"),
        (["dataset", "add"], "Missing argument 'email'."),
        (["models", "promote"], "Missing argument 'version'."),
        (["history", "-n", "many"], "Invalid value for '-n'"),
        (["corrections", "review", "accept"], "Missing argument"),
    ],
)
def test_a_usage_error_prints_usage_and_the_error_and_exits_2(args: list[str], error: str) -> None:
    result = mailrouter(*args)
    assert result.returncode == 2, result.stderr
    assert "Usage: mailrouter" in result.stderr
    assert error in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""


def test_python_dash_m_behaves_the_same() -> None:
    result = run([*MODULE, "clasify"])
    assert result.returncode == 2, result.stderr
    assert "Usage:" in result.stderr and "No such command 'clasify'" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_option_missing_its_value_is_a_usage_error() -> None:
    result = mailrouter("evaluate", "--split")
    assert result.returncode == 2, result.stderr
    assert "Option '--split' requires an argument." in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [[], ["dataset"], ["models"], ["corrections"]])
def test_a_group_without_its_command_prints_its_help(args: list[str]) -> None:
    result = mailrouter(*args)
    assert result.returncode in (0, 2), result.stderr  # click exits 2 when it shows help for none
    assert "Usage: mailrouter" in result.stdout + result.stderr
    assert "Commands" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_a_mailrouter_error_is_one_line_and_its_exit_status(tmp_path: Path) -> None:
    """ConfigError's exit status is 2 too, but it says `error:`, not the usage line."""
    missing = tmp_path / "nowhere.toml"
    result = mailrouter("--config", str(missing), "config", "check")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert str(missing) in result.stderr and "mailrouter init" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Usage:" not in result.stderr

    refused = mailrouter("evaluate", "--split", "bogus")
    assert refused.returncode == 1
    assert refused.stderr.strip() == "error: --split 'bogus': expected one of train, valid, test"


def test_ctrl_c_exits_130_without_a_traceback() -> None:
    result = run([sys.executable, "-c", CTRL_C, "wait"])
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr
