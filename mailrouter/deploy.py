"""Installing ``mailrouter serve`` as a launchd agent (macOS) or a systemd user unit (Linux).

Everything here is pure: the templates (the checkout's ``deploy/``, shipped as the package data
of ``mailrouter.service_templates``) are rendered with real paths, and each ``mailrouter service``
action is a :class:`Plan` of steps (write a file, run a command). The CLI executes a plan with a
runner that tests replace, so the exact ``launchctl``/``systemctl`` command lines are checked
without touching the machine's service manager.
"""

from __future__ import annotations

import os
import plistlib
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from string import Template
from typing import Literal
from xml.sax.saxutils import escape

from .errors import ConfigError

LABEL = "com.mailrouter.agent"
UNIT = "mailrouter.service"
_INSTANCE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
THROTTLE_SECONDS = 30
TEMPLATES: Traversable = resources.files("mailrouter.service_templates")
# launchd starts agents with a bare PATH (/usr/bin:/bin:/usr/sbin:/sbin): add Homebrew's two
# prefixes so `ollama` (and anything training calls) is found on Apple silicon and Intel Macs.
SYSTEM_PATH = ("/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin")

Manager = Literal["launchd", "systemd"]
Action = Literal["install", "uninstall", "restart", "status", "logs"]


def detect_manager(platform: str = sys.platform) -> Manager:
    """launchd on macOS, systemd everywhere else (Linux)."""
    return "launchd" if platform == "darwin" else "systemd"


@dataclass(frozen=True)
class Target:
    """Where and how the service is installed: real paths, resolved once by :func:`target_for`."""

    manager: Manager
    program: Path  # the virtualenv's ``mailrouter`` script
    config: Path
    workdir: Path
    home: Path
    uid: int
    config_home: Path  # $XDG_CONFIG_HOME (systemd user units live below it)
    instance: str = ""  # one service per mailbox: "" is the default one

    @property
    def label(self) -> str:
        return f"com.mailrouter.{self.instance}" if self.instance else LABEL

    @property
    def unit(self) -> str:
        return f"mailrouter-{self.instance}.service" if self.instance else UNIT

    @property
    def log_name(self) -> str:
        return f"mailrouter-{self.instance}" if self.instance else "mailrouter"

    @property
    def path_env(self) -> str:
        dirs = [str(self.program.parent), *SYSTEM_PATH]
        return ":".join(dict.fromkeys(dirs))

    @property
    def log_dir(self) -> Path:
        """Where launchd writes the agent's stdout and stderr."""
        return self.home / "Library" / "Logs" / "mailrouter"

    @property
    def unit_file(self) -> Path:
        """The file ``install`` writes: the LaunchAgent plist or the systemd user unit."""
        if self.manager == "launchd":
            return self.home / "Library" / "LaunchAgents" / f"{self.label}.plist"
        return self.config_home / "systemd" / "user" / self.unit

    @property
    def domain(self) -> str:
        return f"gui/{self.uid}"

    @property
    def service(self) -> str:
        return f"gui/{self.uid}/{self.label}"


def target_for(
    config: Path | None,
    *,
    workdir: Path | None = None,
    manager: Manager | None = None,
    program: Path | None = None,
    environ: dict[str, str] | None = None,
    instance: str = "",
) -> Target:
    """Resolve the real paths; a missing config file is an error that names ``mailrouter init``."""
    if instance and not _INSTANCE_RE.match(instance):
        raise ConfigError(
            f"instance name {instance!r}: use lower-case letters, digits and '-' (e.g. 'sales')"
        )
    if config is None:
        raise ConfigError(
            "the service needs a configuration file: run `mailrouter init`, then "
            "`mailrouter --config config/mailrouter.toml service install`"
        )
    env = os.environ if environ is None else environ
    home = Path(env.get("HOME") or Path.home())
    exe = program or Path(sys.executable).absolute().parent / "mailrouter"
    return Target(
        manager=manager or detect_manager(),
        program=exe,
        config=Path(config).absolute(),
        workdir=(workdir or Path.cwd()).absolute(),
        home=home,
        uid=os.getuid(),
        config_home=Path(env.get("XDG_CONFIG_HOME") or home / ".config"),
        instance=instance,
    )


# --- rendering ------------------------------------------------------------------------------


def template_path(manager: Manager, templates: Traversable = TEMPLATES) -> Traversable:
    if manager == "launchd":
        return templates / "launchd" / f"{LABEL}.plist.template"
    return templates / "systemd" / f"{UNIT}.template"


def _read_template(manager: Manager, templates: Traversable) -> Template:
    path = template_path(manager, templates)
    try:
        return Template(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(
            f"{path}: service template not found; reinstall mailrouter (its package ships it)"
        ) from exc


def render_plist(target: Target, templates: Traversable = TEMPLATES) -> str:
    """The LaunchAgent, checked with ``plistlib``: a bad path or template never reaches launchd."""
    values = {
        "label": target.label,
        "log_name": target.log_name,
        "program": str(target.program),
        "config": str(target.config),
        "workdir": str(target.workdir),
        "path": target.path_env,
        "log_dir": str(target.log_dir),
        "throttle": str(THROTTLE_SECONDS),
    }
    text = _read_template("launchd", templates).substitute(
        {k: escape(v) for k, v in values.items()}
    )
    check_plist(text, target)
    return text


def check_plist(text: str, target: Target) -> dict:
    """Parse the rendered plist and check the keys launchd needs; returns the parsed dict."""
    try:
        data = plistlib.loads(text.encode("utf-8"))
    except Exception as exc:  # plistlib raises ExpatError, ValueError, InvalidFileException
        raise ConfigError(f"rendered LaunchAgent is not a valid plist: {exc}") from exc
    expected = [str(target.program), "--config", str(target.config), "serve"]
    if data.get("Label") != target.label or data.get("ProgramArguments") != expected:
        raise ConfigError("rendered LaunchAgent lost its Label or ProgramArguments")
    return data


def _systemd_quote(value: str) -> str:
    """A path inside a quoted systemd argument: backslashes and quotes escaped; % doubled."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")


def render_unit(target: Target, templates: Traversable = TEMPLATES) -> str:
    """The systemd user unit; paths with spaces are quoted, ``%`` specifiers escaped."""
    values = {
        "program": _systemd_quote(str(target.program)),
        "config": _systemd_quote(str(target.config)),
        "workdir": str(target.workdir).replace("%", "%%"),
        "path": _systemd_quote(target.path_env),
        "throttle": str(THROTTLE_SECONDS),
        "name": target.instance or "contact mailbox",
    }
    return _read_template("systemd", templates).substitute(values)


def render(target: Target, templates: Traversable = TEMPLATES) -> str:
    return (
        render_plist(target, templates)
        if target.manager == "launchd"
        else render_unit(target, templates)
    )


# --- plans ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WriteFile:
    path: Path
    text: str


@dataclass(frozen=True)
class MakeDir:
    path: Path


@dataclass(frozen=True)
class RemoveFile:
    path: Path


@dataclass(frozen=True)
class Run:
    """A command; ``check=False`` when a failure is expected (unloading what is not loaded)."""

    argv: tuple[str, ...]
    check: bool = True

    def __str__(self) -> str:
        return shlex.join(self.argv)


Step = WriteFile | MakeDir | RemoveFile | Run


@dataclass(frozen=True)
class Plan:
    action: Action
    steps: tuple[Step, ...] = field(default_factory=tuple)

    @property
    def commands(self) -> list[tuple[str, ...]]:
        return [s.argv for s in self.steps if isinstance(s, Run)]


def _systemctl(*args: str, check: bool = True) -> Run:
    return Run(("systemctl", "--user", *args), check=check)


def plan(
    action: Action,
    target: Target,
    *,
    templates: Traversable = TEMPLATES,
    have_plutil: bool = False,
    lines: int = 100,
    follow: bool = False,
) -> Plan:
    """The steps of one ``mailrouter service`` action, in order."""
    if target.manager == "launchd":
        return Plan(action, _launchd_steps(action, target, templates, have_plutil, lines, follow))
    return Plan(action, _systemd_steps(action, target, templates, lines, follow))


def _launchd_steps(
    action: Action, t: Target, templates: Traversable, have_plutil: bool, lines: int, follow: bool
) -> tuple[Step, ...]:
    plist = str(t.unit_file)
    if action == "install":
        steps: list[Step] = [
            MakeDir(t.log_dir),
            MakeDir(t.unit_file.parent),
            WriteFile(t.unit_file, render_plist(t, templates)),
        ]
        if have_plutil:
            steps.append(Run(("plutil", "-lint", plist)))
        # bootstrap refuses an agent that is already loaded: unload the old one first.
        steps += [
            Run(("launchctl", "bootout", t.service), check=False),
            Run(("launchctl", "enable", t.service)),
            Run(("launchctl", "bootstrap", t.domain, plist)),
        ]
        return tuple(steps)
    if action == "uninstall":
        return (Run(("launchctl", "bootout", t.service), check=False), RemoveFile(t.unit_file))
    if action == "restart":
        return (Run(("launchctl", "kickstart", "-k", t.service)),)
    if action == "status":
        return (Run(("launchctl", "print", t.service)),)
    tail = ("tail", "-n", str(lines), *(("-F",) if follow else ()))
    return (
        Run(
            (
                *tail,
                str(t.log_dir / f"{t.log_name}.err.log"),
                str(t.log_dir / f"{t.log_name}.out.log"),
            )
        ),
    )


def _systemd_steps(
    action: Action, t: Target, templates: Traversable, lines: int, follow: bool
) -> tuple[Step, ...]:
    if action == "install":
        return (
            MakeDir(t.unit_file.parent),
            WriteFile(t.unit_file, render_unit(t, templates)),
            _systemctl("daemon-reload"),
            _systemctl("enable", "--now", t.unit),
        )
    if action == "uninstall":
        return (
            _systemctl("disable", "--now", t.unit, check=False),
            RemoveFile(t.unit_file),
            _systemctl("daemon-reload"),
        )
    if action == "restart":
        return (_systemctl("restart", t.unit),)
    if action == "status":
        # `status` exits 3 for a stopped unit: still a useful answer, not a failure.
        return (_systemctl("status", "--no-pager", t.unit, check=False),)
    journal = ["journalctl", "--user", "-u", t.unit, "-n", str(lines), "--no-pager"]
    if follow:
        journal.append("-f")
    return (Run(tuple(journal)),)


# --- execution ------------------------------------------------------------------------------

Runner = Callable[[Sequence[str]], int]


def subprocess_runner(argv: Sequence[str]) -> int:
    """Run a command with the terminal attached (``status`` and ``logs`` print to it)."""
    try:
        return subprocess.run(list(argv), check=False).returncode
    except FileNotFoundError:
        return 127


def execute(
    the_plan: Plan,
    *,
    runner: Runner = subprocess_runner,
    echo: Callable[[str], None] = print,
    dry_run: bool = False,
) -> int:
    """Carry out a plan; stops at the first failed checked command and returns its status.

    With ``dry_run`` every step is printed and nothing is written or run.
    """
    for step in the_plan.steps:
        if isinstance(step, Run):
            echo(f"$ {step}")
            if dry_run:
                continue
            code = runner(step.argv)
            if code == 127:
                echo(f"{step.argv[0]}: command not found")
            if code and step.check:
                return code
        elif isinstance(step, WriteFile):
            echo(f"write {step.path}")
            if not dry_run:
                step.path.write_text(step.text, encoding="utf-8")
        elif isinstance(step, MakeDir):
            echo(f"mkdir -p {step.path}")
            if not dry_run:
                step.path.mkdir(parents=True, exist_ok=True)
        else:
            echo(f"rm -f {step.path}")
            if not dry_run:
                step.path.unlink(missing_ok=True)
    return 0
