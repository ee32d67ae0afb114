"""The launchd agent and systemd unit as rendered, and the exact service-manager command lines."""

from __future__ import annotations

import plistlib
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mailrouter import deploy
from mailrouter.cli import app
from mailrouter.cli import service as service_cli
from mailrouter.deploy.run import Result, execute, exit_status, explain
from mailrouter.errors import ConfigError


def _target(tmp_path: Path, manager: deploy.Manager) -> deploy.Target:
    home = tmp_path / "home dir"  # a space, as in "Macintosh HD" paths
    return deploy.Target(
        manager=manager,
        program=tmp_path / "venv" / "bin" / "mailrouter",
        config=tmp_path / "etc" / "mail & router.toml",
        workdir=tmp_path / "work",
        home=home,
        uid=501,
        config_home=home / ".config",
    )


def test_plist_has_what_launchd_needs(tmp_path: Path) -> None:
    t = _target(tmp_path, "launchd")
    data = plistlib.loads(deploy.render_plist(t).encode())
    assert data["Label"] == "com.mailrouter.agent"
    assert data["ProgramArguments"] == [str(t.program), "--config", str(t.config), "serve"]
    assert data["RunAtLoad"] is True
    assert data["KeepAlive"] == {"SuccessfulExit": False}
    assert data["ThrottleInterval"] == deploy.THROTTLE_SECONDS
    assert data["WorkingDirectory"] == str(t.workdir)
    path = data["EnvironmentVariables"]["PATH"].split(":")
    assert path[0] == str(t.program.parent)
    assert {"/opt/homebrew/bin", "/usr/local/bin", "/usr/bin"} <= set(path)
    assert data["EnvironmentVariables"]["MAILROUTER_SUPERVISED"] == "launchd"
    assert data["ExitTimeOut"] == deploy.EXIT_TIMEOUT_SECONDS
    logs = t.home / "Library" / "Logs" / "mailrouter"
    assert data["StandardOutPath"] == str(logs / "mailrouter.out.log")
    assert data["StandardErrorPath"] == str(logs / "mailrouter.err.log")
    # the service writes and rotates its own log; the plist names it and holds nothing secret
    env = data["EnvironmentVariables"]
    assert env["MAILROUTER_SERVICE_LOG"] == str(logs / "mailrouter.log")
    assert set(env) == {
        "PATH",
        "PYTHONUNBUFFERED",
        "MAILROUTER_SUPERVISED",
        "MAILROUTER_SERVICE_LOG",
    }
    if shutil.which("plutil"):
        out = tmp_path / "agent.plist"
        out.write_text(deploy.render_plist(t))
        subprocess.run(["plutil", "-lint", str(out)], check=True)


def test_broken_template_is_refused(tmp_path: Path) -> None:
    t = _target(tmp_path, "launchd")
    templates = tmp_path / "templates"
    (templates / "launchd").mkdir(parents=True)
    good = deploy.template_path("launchd").read_text()
    deploy.template_path("launchd", templates).write_text(good.replace("</dict>\n</plist>", ""))
    with pytest.raises(ConfigError, match="not a valid plist"):
        deploy.render_plist(t, templates)


def test_systemd_unit(tmp_path: Path) -> None:
    t = _target(tmp_path, "systemd")
    unit = deploy.render_unit(t)
    lines = unit.splitlines()
    assert f'ExecStart="{t.program}" --config "{t.config}" serve' in lines
    assert f"WorkingDirectory={t.workdir}" in lines
    assert f'Environment="PATH={t.path_env}"' in lines
    assert "Restart=on-failure" in lines
    assert "WantedBy=default.target" in lines
    assert "$" not in unit
    if shutil.which("systemd-analyze"):
        path = tmp_path / deploy.UNIT
        path.write_text(unit)
        # verify checks syntax; ExecStart's program does not exist here, so only syntax errors fail
        res = subprocess.run(
            ["systemd-analyze", "--user", "verify", str(path)], capture_output=True, text=True
        )
        assert "Unknown key" not in res.stderr and "bad-setting" not in res.stderr


def test_launchd_commands(tmp_path: Path) -> None:
    t = _target(tmp_path, "launchd")
    plist = str(t.home / "Library" / "LaunchAgents" / "com.mailrouter.agent.plist")
    install = deploy.plan("install", t, have_plutil=True)
    assert install.commands == [
        ("plutil", "-lint", plist),
        ("launchctl", "bootout", "gui/501/com.mailrouter.agent"),
        ("launchctl", "enable", "gui/501/com.mailrouter.agent"),
        ("launchctl", "bootstrap", "gui/501", plist),
    ]
    # bootout is asynchronous: the plan waits for launchd to forget the label before bootstrap
    kinds = [type(s).__name__ for s in install.steps]
    assert kinds.index("WaitGone") == kinds.index("Run") + 2  # after plutil and bootout
    assert deploy.plan("install", t).commands[0][0] == "launchctl"
    uninstall = deploy.plan("uninstall", t)
    assert uninstall.commands == [("launchctl", "bootout", "gui/501/com.mailrouter.agent")]
    assert isinstance(uninstall.steps[1], deploy.WaitGone)
    assert deploy.plan("restart", t).commands == [
        ("launchctl", "kickstart", "-k", "gui/501/com.mailrouter.agent")
    ]
    assert deploy.plan("status", t).commands == [
        ("launchctl", "print", "gui/501/com.mailrouter.agent")
    ]
    logs = t.home / "Library" / "Logs" / "mailrouter"
    assert deploy.plan("logs", t, lines=20, follow=True).commands == [
        ("tail", "-n", "20", "-F", str(logs / "mailrouter.log"), str(logs / "mailrouter.err.log"))
    ]


def test_systemd_commands(tmp_path: Path) -> None:
    t = _target(tmp_path, "systemd")
    assert deploy.plan("install", t).commands == [
        ("systemctl", "--user", "daemon-reload"),
        ("systemctl", "--user", "enable", "--now", "mailrouter.service"),
    ]
    assert deploy.plan("uninstall", t).commands == [
        ("systemctl", "--user", "disable", "--now", "mailrouter.service"),
        ("systemctl", "--user", "daemon-reload"),
    ]
    assert deploy.plan("restart", t).commands == [
        ("systemctl", "--user", "restart", "mailrouter.service")
    ]
    assert deploy.plan("status", t).commands == [
        ("systemctl", "--user", "status", "--no-pager", "mailrouter.service")
    ]
    assert deploy.plan("logs", t, lines=5).commands == [
        ("journalctl", "--user", "-u", "mailrouter.service", "-n", "5", "--no-pager")
    ]
    (doctor,) = deploy.plan("doctor", t).commands
    assert doctor[:5] == ("systemd-run", "--user", "--wait", "--pipe", "--quiet")
    assert f"--working-directory={t.workdir}" in doctor
    assert f"--setenv=PATH={t.path_env}" in doctor
    assert doctor[-4:] == (str(t.program), "--config", str(t.config), "doctor")


def test_a_second_instance_has_its_own_names(tmp_path: Path) -> None:
    base = _target(tmp_path, "launchd")
    sales = deploy.Target(**{**base.__dict__, "instance": "sales"})
    data = plistlib.loads(deploy.render_plist(sales).encode())
    assert data["Label"] == "com.mailrouter.sales"
    assert data["StandardErrorPath"].endswith("/mailrouter-sales.err.log")
    assert sales.unit_file.name == "com.mailrouter.sales.plist"
    assert deploy.plan("restart", sales).commands == [
        ("launchctl", "kickstart", "-k", "gui/501/com.mailrouter.sales")
    ]
    unit = deploy.Target(**{**sales.__dict__, "manager": "systemd"})
    assert unit.unit_file.name == "mailrouter-sales.service"
    assert "Description=mailrouter (sales)" in deploy.render_unit(unit)
    assert deploy.plan("restart", unit).commands == [
        ("systemctl", "--user", "restart", "mailrouter-sales.service")
    ]
    with pytest.raises(ConfigError, match="instance name"):
        deploy.target_for(tmp_path / "c.toml", instance="Sales Team")


def test_the_service_is_named_after_its_configuration_file(tmp_path: Path) -> None:
    assert deploy.instance_for(Path("config/mailrouter.toml")) == ""  # today's label, kept
    assert deploy.instance_for(Path("sales.toml")) == "sales"
    assert deploy.instance_for(Path("/etc/Sales Team (Lyon).toml")) == "sales-team-lyon"
    assert deploy.instance_for(Path("x" * 50 + ".toml")) == "x" * 31
    with pytest.raises(ConfigError, match="rename it"):
        deploy.instance_for(Path("___.toml"))
    assert deploy.target_for(tmp_path / "mailrouter.toml").label == "com.mailrouter.agent"
    sales = deploy.target_for(tmp_path / "sales.toml")
    assert (sales.label, sales.unit) == ("com.mailrouter.sales", "mailrouter-sales.service")
    assert deploy.target_for(tmp_path / "sales.toml", instance="").label == deploy.LABEL


def test_execute_writes_runs_and_stops_on_failure(tmp_path: Path) -> None:
    t = _target(tmp_path, "launchd")
    ran: list[tuple[str, ...]] = []

    def runner(argv: Sequence[str], *, capture: bool = False) -> Result:
        ran.append(tuple(argv))
        # print: launchd does not know the label (113); bootout of a missing agent: 3
        codes = {"bootstrap": 5, "bootout": 3, "print": 113}
        return Result(codes.get(argv[1], 0))

    code = execute(deploy.plan("install", t), runner=runner, echo=lambda _: None)
    assert code == 5  # bootout of a missing agent is tolerated; bootstrap's failure is not
    assert [a[1] for a in ran] == ["bootout", "print", "enable", "bootstrap"]
    assert plistlib.loads(t.unit_file.read_bytes())["Label"] == deploy.LABEL
    assert t.log_dir.is_dir()

    assert execute(deploy.plan("uninstall", t), runner=runner, echo=lambda _: None) == 0
    assert not t.unit_file.exists()


def test_cli_dry_run_and_runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "mailrouter.toml"
    config.write_text('data_dir = "data"\n')
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    ran: list[tuple[str, ...]] = []
    monkeypatch.setattr(
        service_cli, "runner", lambda argv, capture=False: ran.append(tuple(argv)) or Result(0)
    )
    cli = CliRunner()

    res = cli.invoke(app, ["--config", str(config), "service", "install", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "$ " in res.output and ran == []
    unit = deploy.target_for(config).unit_file
    assert not unit.exists()

    res = cli.invoke(app, ["--config", str(config), "service", "restart"])
    assert res.exit_code == 0, res.output
    expected = deploy.plan("restart", deploy.target_for(config)).commands
    assert ran == expected

    res = cli.invoke(app, ["service", "status"])  # no config anywhere
    assert res.exit_code != 0
    assert isinstance(res.exception, ConfigError) and "mailrouter init" in str(res.exception)


def test_a_job_exit_status_from_launchctl_print() -> None:
    running = "gui/501/x.doctor = {\n\tstate = running\n\tlast exit code = (never exited)\n}"
    assert exit_status(running) is None
    done = (
        "gui/501/x.doctor = {\n\tactive count = 0\n\tstate = not running\n\tlast exit code = 1\n}"
    )
    assert exit_status(done) == 1
    assert exit_status("state = not running\n\tlast exit code = (never exited)") is None
    assert exit_status("no such lines") is None


def test_launchctl_errors_are_explained() -> None:
    assert "log in at the Mac" in (explain(("launchctl", "bootstrap", "gui/501", "p"), 125) or "")
    assert "run the command again" in (explain(("launchctl", "bootstrap", "gui/501", "p"), 5) or "")
    assert explain(("launchctl", "kickstart", "-k", "gui/501/x"), 5) is None
    assert explain(("systemctl", "--user", "restart", "x"), 125) is None


def test_doctor_plist_is_the_agents_context_run_once(tmp_path: Path) -> None:
    t = _target(tmp_path, "launchd")
    agent = plistlib.loads(deploy.render_plist(t).encode())
    doctor = plistlib.loads(deploy.render_doctor_plist(t).encode())
    assert doctor["Label"] == "com.mailrouter.agent.doctor"
    assert doctor["ProgramArguments"] == [str(t.program), "--config", str(t.config), "doctor"]
    assert doctor["RunAtLoad"] is True and "KeepAlive" not in doctor
    assert doctor["WorkingDirectory"] == agent["WorkingDirectory"]
    assert doctor["EnvironmentVariables"]["PATH"] == agent["EnvironmentVariables"]["PATH"]
    assert doctor["StandardOutPath"] == doctor["StandardErrorPath"] == str(t.doctor_output)
    assert t.doctor_plist.parent == t.log_dir  # never in LaunchAgents: it must not run at login


def test_an_installed_unit_says_what_it_runs(tmp_path: Path) -> None:
    for manager in ("launchd", "systemd"):
        t = _target(tmp_path, manager)  # type: ignore[arg-type]
        t.unit_file.parent.mkdir(parents=True, exist_ok=True)
        t.unit_file.write_text(deploy.render(t))
        found = deploy.read_installed(t.unit_file, t.manager)
        assert found == deploy.Installed(t.unit_file, t.config, t.workdir), manager
        assert deploy.installed_services(t) == [found]
    assert deploy.data_dir_of(tmp_path / "none.toml", None, tmp_path, "linux") is None
    config = tmp_path / "c.toml"
    config.write_text("")
    home = tmp_path / "home"
    assert deploy.data_dir_of(config, tmp_path, home, "darwin") == (
        home / "Library" / "Application Support" / "mailrouter"
    )
    config.write_text('data_dir = "~/mr"\n')
    assert deploy.data_dir_of(config, tmp_path, home, "linux") == Path("~/mr").expanduser()
