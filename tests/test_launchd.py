"""launchd as it really behaves, through ``mailrouter service``: a stand-in ``launchctl`` on PATH
(tests/fake_launchctl.py) keeps launchd's state, unloads asynchronously, refuses a bootstrap while
the label is still known or with no GUI session, and runs one-shot jobs for real."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import plistlib
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mailrouter import deploy
from mailrouter.cli import app
from mailrouter.config import load_settings
from mailrouter.deploy import run as deploy_run
from mailrouter.errors import ConfigError
from mailrouter.logs import SERVICE_LOG_ENV, STDERR_LIMIT, cap_stderr_file, event
from mailrouter.service import configure_logging

FAKE = Path(__file__).with_name("fake_launchctl.py")


@pytest.fixture
def launchd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fake launchd: its state folder; ``launchctl`` on PATH; HOME in tmp; the Mac's manager."""
    state = tmp_path / "launchd"
    bin_dir = tmp_path / "bin"
    state.mkdir()
    bin_dir.mkdir()
    script = bin_dir / "launchctl"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LAUNCHD_DIR", str(state))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(deploy, "detect_manager", lambda: "launchd")
    monkeypatch.setattr(deploy.run, "POLL_SECONDS", 0.01)
    yield state


def _calls(state: Path) -> list[list[str]]:
    path = state / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _jobs(state: Path) -> dict:
    return json.loads((state / "state.json").read_text())


def _config(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "etc" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'data_dir = "{tmp_path / "data" / path.stem}"\n')
    return path


def _service(config: Path, *args: str) -> object:
    return CliRunner().invoke(app, ["--config", str(config), "service", *args])


def test_the_fake_fails_like_launchd_when_bootstrap_follows_bootout_at_once(
    launchd: Path, tmp_path: Path
) -> None:
    """Without the wait, the old plan (bootout then bootstrap) fails on a Mac: the fake agrees."""
    t = deploy.target_for(_config(tmp_path, "mailrouter.toml"))
    assert _service(t.config, "install").exit_code == 0  # type: ignore[attr-defined]
    runner = deploy_run.subprocess_runner
    assert runner(("launchctl", "bootout", t.service), capture=True).code == 0
    failed = runner(("launchctl", "bootstrap", t.domain, str(t.unit_file)), capture=True)
    assert failed.code == 5 and "Input/output error" in failed.output


def test_reinstall_waits_until_launchd_has_forgotten_the_label(
    launchd: Path, tmp_path: Path
) -> None:
    config = _config(tmp_path, "mailrouter.toml")
    first = _service(config, "install")
    assert first.exit_code == 0, first.output  # type: ignore[attr-defined]
    again = _service(config, "install")
    assert again.exit_code == 0, again.output  # type: ignore[attr-defined]
    verbs = [c[0] for c in _calls(launchd)]
    last_bootout = len(verbs) - 1 - verbs[::-1].index("bootout")
    between = verbs[last_bootout + 1 : verbs.index("bootstrap", last_bootout)]
    assert between.count("print") == 4  # known 3 more times (stopping), then "could not find"
    assert "com.mailrouter.agent" in _jobs(launchd)


def test_a_label_that_never_goes_away_is_a_clear_error(
    launchd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path, "mailrouter.toml")
    assert _service(config, "install").exit_code == 0  # type: ignore[attr-defined]
    monkeypatch.setenv("FAKE_LAUNCHD_LINGER", "1000")
    monkeypatch.setattr(deploy, "BOOTOUT_WAIT_SECONDS", 0.3)
    res = _service(config, "install")
    assert res.exit_code == 1  # type: ignore[attr-defined]
    assert "still knows gui/" in res.output and "after `launchctl bootout`" in res.output  # type: ignore[attr-defined]
    assert "bootstrap" not in [c[0] for c in _calls(launchd)][-3:]


def test_no_gui_session_explains_error_125(launchd: Path, tmp_path: Path) -> None:
    (launchd / "no-gui").touch()
    res = _service(_config(tmp_path, "mailrouter.toml"), "install")
    assert res.exit_code == 125  # type: ignore[attr-defined]
    out = res.output  # type: ignore[attr-defined]
    assert "session graphique" in out and "no GUI session" in out
    assert out.index("session graphique") < out.index("no GUI session")  # French first
    assert "log in at the Mac" in out and "LaunchDaemon" in out


def test_plist_is_0644_and_logs_are_private_whatever_the_umask(
    launchd: Path, tmp_path: Path
) -> None:
    config = _config(tmp_path, "mailrouter.toml")
    old = os.umask(0o002)  # a umask that would leave the plist group-writable: launchd refuses
    try:
        res = _service(config, "install")
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    t = deploy.target_for(config)
    assert stat.S_IMODE(t.unit_file.stat().st_mode) == 0o644
    assert stat.S_IMODE(t.log_dir.stat().st_mode) == 0o700
    for log in (t.service_log, t.stdout_log, t.stderr_log):
        assert stat.S_IMODE(log.stat().st_mode) == 0o600, log


def test_two_services_side_by_side(launchd: Path, tmp_path: Path) -> None:
    sales, support = _config(tmp_path, "sales.toml"), _config(tmp_path, "support.toml")
    for config in (sales, support):
        res = _service(config, "install")
        assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    a, b = deploy.target_for(sales), deploy.target_for(support)
    assert set(_jobs(launchd)) == {"com.mailrouter.sales", "com.mailrouter.support"}
    plists = [plistlib.loads(t.unit_file.read_bytes()) for t in (a, b)]
    assert [p["Label"] for p in plists] == ["com.mailrouter.sales", "com.mailrouter.support"]
    paths = [
        (p["StandardErrorPath"], p["EnvironmentVariables"]["MAILROUTER_SERVICE_LOG"])
        for p in plists
    ]
    assert len({*paths[0], *paths[1]}) == 4  # no log file shared
    assert [p["ProgramArguments"][2] for p in plists] == [str(sales), str(support)]

    assert _service(sales, "uninstall").exit_code == 0  # type: ignore[attr-defined]
    assert not a.unit_file.exists() and b.unit_file.exists()
    assert "com.mailrouter.sales" not in _jobs(launchd)
    res = _service(support, "status")
    assert res.exit_code == 0 and "com.mailrouter.support" in res.output  # type: ignore[attr-defined]


def test_two_files_of_one_name_do_not_replace_each_other(launchd: Path, tmp_path: Path) -> None:
    first = tmp_path / "a" / "mailrouter.toml"
    second = tmp_path / "b" / "mailrouter.toml"
    for path in (first, second):
        path.parent.mkdir()
        path.write_text(f'data_dir = "{path.parent / "data"}"\n')
    assert _service(first, "install").exit_code == 0  # type: ignore[attr-defined]
    res = _service(second, "install")
    assert isinstance(res.exception, ConfigError)  # type: ignore[attr-defined]
    assert "already runs" in str(res.exception) and "--instance" in str(res.exception)  # type: ignore[attr-defined]
    assert _service(second, "install", "--instance", "b").exit_code == 0  # type: ignore[attr-defined]
    assert set(_jobs(launchd)) == {"com.mailrouter.agent", "com.mailrouter.b"}


def test_service_doctor_runs_in_the_agents_context(launchd: Path, tmp_path: Path) -> None:
    """The doctor runs as a launchd job of the GUI domain with the agent's program, folder and
    environment; its output is shown and its exit status is the command's."""
    program = tmp_path / "venv" / "bin" / "mailrouter"
    program.parent.mkdir(parents=True)
    program.write_text(
        '#!/bin/sh\necho "args: $*"\necho "PATH=$PATH"\necho "cwd: $(pwd)"\n'
        'echo "✗ IMAP: no route to host 192.168.1.20"\nexit 1\n'
    )
    program.chmod(0o755)
    config = _config(tmp_path, "sales.toml")
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    t = deploy.Target(
        **{**deploy.target_for(config).__dict__, "program": program, "workdir": workdir}
    )
    lines: list[str] = []
    code = deploy_run.execute(deploy.plan("doctor", t), echo=lines.append)
    out = "\n".join(lines)
    assert code == 1
    assert f"args: --config {config} doctor" in out
    assert f"PATH={t.path_env}" in out and f"cwd: {workdir}" in out
    assert "✗ IMAP: no route to host" in out
    verbs = [c[:2] for c in _calls(launchd)]
    assert ["bootstrap", t.domain] in verbs
    doctor_job = _jobs(launchd).get("com.mailrouter.sales.doctor")
    assert doctor_job is None or doctor_job["linger"] is not None  # booted out
    assert not t.doctor_plist.exists()
    assert stat.S_IMODE(t.doctor_output.stat().st_mode) == 0o600


def test_the_agent_rotates_its_own_log(tmp_path: Path) -> None:
    """launchd never rotates StandardErrorPath: under the agent, the service's handler writes the
    log file named by the plist and rotates it at log.max_bytes; nothing goes to stderr."""
    config = tmp_path / "sales.toml"
    config.write_text("[log]\nmax_bytes = 10000\nbackup_count = 2\n")
    log = tmp_path / "Logs" / "mailrouter-sales.log"
    env = {"MAILROUTER_SUPERVISED": "launchd", SERVICE_LOG_ENV: str(log)}
    stderr = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        with contextlib.redirect_stderr(stderr):
            assert configure_logging(load_settings(config), env) == log
        for n in range(400):  # ~40 KB of lines: rotated at 10 KB, two old files kept
            event(logging.getLogger("mailrouter.test"), "decision", uid=n, reason="x" * 60)
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level = saved
    files = sorted(p.name for p in log.parent.iterdir())
    assert files == ["mailrouter-sales.log", "mailrouter-sales.log.1", "mailrouter-sales.log.2"]
    for path in log.parent.iterdir():
        assert path.stat().st_size <= 10_000
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "uid=399" in log.read_text()
    assert stderr.getvalue() == ""


def test_the_stderr_file_launchd_never_rotates_is_capped(tmp_path: Path) -> None:
    """A broken configuration is printed again at each of launchd's restarts: `serve` empties the
    file launchd gives it as stderr once it has passed 1 MB, before it reads the configuration."""
    config = tmp_path / "broken.toml"
    config.write_text("[mailbox\n")
    err_log = tmp_path / "mailrouter.err.log"
    err_log.write_bytes(b"x" * (STDERR_LIMIT + 1))
    fd = os.open(err_log, os.O_WRONLY | os.O_APPEND)  # as launchd opens StandardErrorPath
    try:
        done = subprocess.run(
            [sys.executable, "-m", "mailrouter", "--config", str(config), "serve"],
            env={**os.environ, "MAILROUTER_SUPERVISED": "launchd"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=fd,
            timeout=60,
            check=False,
        )
    finally:
        os.close(fd)
    assert done.returncode == 2  # the configuration error, as before
    text = err_log.read_text()
    assert text.startswith(f"(mailrouter: {STDERR_LIMIT + 1} bytes of earlier output dropped)")
    assert "not valid TOML" in text and len(text) < 2000
    fd = os.open(err_log, os.O_WRONLY | os.O_APPEND)
    try:
        assert not cap_stderr_file(fd)  # below the limit: left alone
    finally:
        os.close(fd)


def test_two_services_on_one_data_folder_are_refused(launchd: Path, tmp_path: Path) -> None:
    """Both would route every email: the second would be refused at start, every 30 s."""
    sales = tmp_path / "sales.toml"
    support = tmp_path / "support.toml"
    sales.write_text('data_dir = "shared"\n')  # relative to the service's working directory
    support.write_text(f'data_dir = "{tmp_path / "work" / "shared"}"\n')
    (tmp_path / "work").mkdir(exist_ok=True)
    args = ("install", "--workdir", str(tmp_path / "work"))
    assert _service(sales, *args).exit_code == 0  # type: ignore[attr-defined]
    res = _service(support, *args)
    assert isinstance(res.exception, ConfigError)  # type: ignore[attr-defined]
    message = str(res.exception)  # type: ignore[attr-defined]
    assert "com.mailrouter.sales.plist" in message and "set another data_dir" in message
    support.write_text(f'data_dir = "{tmp_path / "support-data"}"\n')
    assert _service(support, *args).exit_code == 0  # type: ignore[attr-defined]


def test_log_file_of_the_configuration_is_the_agents_log(launchd: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, "sales.toml")
    log = tmp_path / "var" / "sales.log"
    config.write_text(config.read_text() + f'[log]\nfile = "{log}"\n')
    assert _service(config, "install").exit_code == 0  # type: ignore[attr-defined]
    plist = plistlib.loads(deploy.target_for(config).unit_file.read_bytes())
    assert plist["EnvironmentVariables"]["MAILROUTER_SERVICE_LOG"] == str(log)
    res = _service(config, "logs", "-n", "5", "--dry-run")
    assert f"$ tail -n 5 {log} " in res.output  # type: ignore[attr-defined]
