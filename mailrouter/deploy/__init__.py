"""Installing ``mailrouter serve`` as a launchd agent (macOS) or a systemd user unit (Linux).

Everything here is pure: the templates (the checkout's ``deploy/``, shipped as the package data
of ``mailrouter.service_templates``) are rendered with real paths, and each ``mailrouter service``
action is a :class:`Plan` of steps (write a file, run a command, wait for launchd). The steps are
carried out by :mod:`mailrouter.deploy.run` through a runner, the one place that starts
``launchctl`` or ``systemctl``: tests put a stand-in ``launchctl`` on ``PATH`` that behaves like
the real one (launchd cannot run on Linux).

One service per configuration file: the label comes from the file's name (``sales.toml`` is
``com.mailrouter.sales``; ``mailrouter.toml`` keeps ``com.mailrouter.agent``), and each service
has its own log files.
"""

from __future__ import annotations

import os
import plistlib
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from string import Template
from typing import Literal
from xml.sax.saxutils import escape

from ..config import default_data_dir
from ..errors import ConfigError
from ..logs import SERVICE_LOG_ENV

LABEL = "com.mailrouter.agent"
UNIT = "mailrouter.service"
DEFAULT_STEM = "mailrouter"  # config/mailrouter.toml: the service keeps the names above
_INSTANCE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
THROTTLE_SECONDS = 30
# launchd sends SIGTERM, then SIGKILL after ExitTimeOut (launchd.plist(5), ExitTimeOut); the
# service stops within 10 s (service.py), so a bootout is over well within this.
EXIT_TIMEOUT_SECONDS = 20
# `launchctl bootout` returns before the job has exited: wait up to this long until launchd has
# forgotten the label (ExitTimeOut, then a margin for launchd's own bookkeeping).
BOOTOUT_WAIT_SECONDS = EXIT_TIMEOUT_SECONDS + 10
DOCTOR_WAIT_SECONDS = 180  # the doctor's checks time out one by one (IMAP, SMTP, Ollama…)
TEMPLATES: Traversable = resources.files("mailrouter.service_templates")
# launchd starts agents with a bare PATH (/usr/bin:/bin:/usr/sbin:/sbin): add Homebrew's two
# prefixes so `ollama` (and anything training calls) is found on Apple silicon and Intel Macs.
SYSTEM_PATH = ("/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin")
# The plist is readable by everyone (0644), so it may only ever hold these variables: never a
# secret. SERVICE_LOG_ENV names the log the agent rotates itself (mailrouter.service.log_file).
PLIST_ENV = frozenset({"PATH", "PYTHONUNBUFFERED", "MAILROUTER_SUPERVISED", SERVICE_LOG_ENV})
# launchctl(1) `load`: "Configuration files must not be group- or world-writable"; bootstrap
# refuses them. 0644 as in ~/Library/LaunchAgents of any Mac; the plist holds no secret.
PLIST_MODE = 0o644
UNIT_MODE = 0o644
LOG_MODE = 0o600  # log lines quote senders and subjects
LOG_DIR_MODE = 0o700

Manager = Literal["launchd", "systemd"]
Action = Literal["install", "uninstall", "restart", "status", "logs", "doctor"]


def detect_manager(platform: str = sys.platform) -> Manager:
    """launchd on macOS, systemd everywhere else (Linux)."""
    return "launchd" if platform == "darwin" else "systemd"


def instance_for(config: Path) -> str:
    """The service's name from its configuration file's name: ``Sales Team.toml`` is
    ``sales-team``; ``mailrouter.toml`` is the default service (``""``)."""
    stem = re.sub(r"[^a-z0-9]+", "-", config.stem.lower()).strip("-")[:31].strip("-")
    if not stem:
        raise ConfigError(
            f"{config.name}: cannot name a service after this file; rename it (e.g. sales.toml)"
        )
    return "" if stem == DEFAULT_STEM else stem


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
    instance: str = ""  # one service per configuration file: "" is the default one
    log_file: Path | None = None  # the configuration's log.file, when set

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
        """The agent's log files (launchd), one set per service."""
        return self.home / "Library" / "Logs" / "mailrouter"

    @property
    def service_log(self) -> Path:
        """The log the agent writes and rotates itself (launchd never rotates a file):
        ``log.file`` when the configuration sets one (relative to the working directory)."""
        if self.log_file is not None:
            return self.workdir / self.log_file.expanduser()
        return self.log_dir / f"{self.log_name}.log"

    @property
    def stdout_log(self) -> Path:
        return self.log_dir / f"{self.log_name}.out.log"

    @property
    def stderr_log(self) -> Path:
        """launchd's ``StandardErrorPath``: only what is printed before logging is set up."""
        return self.log_dir / f"{self.log_name}.err.log"

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

    @property
    def doctor_label(self) -> str:
        return f"{self.label}.doctor"

    @property
    def doctor_service(self) -> str:
        return f"gui/{self.uid}/{self.doctor_label}"

    @property
    def doctor_plist(self) -> Path:
        """The one-shot doctor job: beside the logs, never in LaunchAgents (not run at login)."""
        return self.log_dir / f"{self.log_name}.doctor.plist"

    @property
    def doctor_output(self) -> Path:
        return self.log_dir / f"{self.log_name}.doctor.txt"


def target_for(
    config: Path | None,
    *,
    workdir: Path | None = None,
    manager: Manager | None = None,
    program: Path | None = None,
    environ: dict[str, str] | None = None,
    instance: str | None = None,
    log_file: Path | None = None,
) -> Target:
    """Resolve the real paths; a missing config file is an error that names ``mailrouter init``.

    ``instance`` (``--instance``) overrides the name taken from the configuration file's name."""
    if config is None:
        raise ConfigError(
            "the service needs a configuration file: run `mailrouter init`, then "
            "`mailrouter --config config/mailrouter.toml service install`"
        )
    if instance is None:
        instance = instance_for(Path(config))
    elif instance and not _INSTANCE_RE.match(instance):
        raise ConfigError(
            f"instance name {instance!r}: use lower-case letters, digits and '-' (e.g. 'sales')"
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
        log_file=log_file,
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
        "program": str(target.program),
        "config": str(target.config),
        "workdir": str(target.workdir),
        "path": target.path_env,
        "service_log": str(target.service_log),
        "stdout_log": str(target.stdout_log),
        "stderr_log": str(target.stderr_log),
        "throttle": str(THROTTLE_SECONDS),
        "exit_timeout": str(EXIT_TIMEOUT_SECONDS),
    }
    text = _read_template("launchd", templates).substitute(
        {k: escape(v) for k, v in values.items()}
    )
    check_plist(text, target)
    return text


def check_plist(text: str, target: Target) -> dict:
    """Parse the rendered plist and check the keys launchd needs, and that its environment holds
    only the variables of :data:`PLIST_ENV` (the file is world-readable); returns the dict."""
    try:
        data = plistlib.loads(text.encode("utf-8"))
    except Exception as exc:  # plistlib raises ExpatError, ValueError, InvalidFileException
        raise ConfigError(f"rendered LaunchAgent is not a valid plist: {exc}") from exc
    expected = [str(target.program), "--config", str(target.config), "serve"]
    if data.get("Label") != target.label or data.get("ProgramArguments") != expected:
        raise ConfigError("rendered LaunchAgent lost its Label or ProgramArguments")
    extra = set(data.get("EnvironmentVariables", {})) - PLIST_ENV
    if extra:
        raise ConfigError(
            f"rendered LaunchAgent sets {sorted(extra)}: a plist is world-readable, secrets "
            "belong in the Keychain"
        )
    return data


def render_doctor_plist(target: Target, templates: Traversable = TEMPLATES) -> str:
    """A one-shot job that runs ``mailrouter doctor`` exactly as the agent runs ``serve``: same
    program, working directory and environment, started by launchd in the GUI domain. So the
    doctor meets the agent's Local Network privacy (TN3179), which a doctor run from Terminal,
    exempt, does not. No KeepAlive: it runs once at bootstrap; its output goes to a file."""
    data = check_plist(render_plist(target, templates), target)
    data["Label"] = target.doctor_label
    data["ProgramArguments"] = [*data["ProgramArguments"][:-1], "doctor"]
    for key in ("KeepAlive", "ThrottleInterval"):
        data.pop(key, None)
    data["RunAtLoad"] = True
    data["StandardOutPath"] = data["StandardErrorPath"] = str(target.doctor_output)
    data["EnvironmentVariables"].pop(SERVICE_LOG_ENV, None)
    return plistlib.dumps(data).decode("utf-8")


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
        "exit_timeout": str(EXIT_TIMEOUT_SECONDS),
        "name": target.instance or "contact mailbox",
    }
    return _read_template("systemd", templates).substitute(values)


def render(target: Target, templates: Traversable = TEMPLATES) -> str:
    return (
        render_plist(target, templates)
        if target.manager == "launchd"
        else render_unit(target, templates)
    )


@dataclass(frozen=True)
class Installed:
    """A mailrouter service found installed: its file, and the config and folder it runs with."""

    unit_file: Path
    config: Path
    workdir: Path | None


def _unquote_systemd(value: str) -> str:
    return value.replace('\\"', '"').replace("\\\\", "\\").replace("%%", "%")


def read_installed(unit_file: Path, manager: Manager) -> Installed | None:
    """What an installed agent/unit runs; None when it is not one of ours or not readable."""
    try:
        text = unit_file.read_text(encoding="utf-8")
    except OSError:
        return None
    if manager == "launchd":
        try:
            data = plistlib.loads(text.encode("utf-8"))
        except Exception:  # an unreadable plist: install replaces it
            return None
        args = data.get("ProgramArguments", [])
        if len(args) < 3 or args[1] != "--config":
            return None
        workdir = data.get("WorkingDirectory")
        return Installed(unit_file, Path(args[2]), Path(workdir) if workdir else None)
    match = re.search(r'^ExecStart=".*?" --config "((?:[^"\\]|\\.)*)"', text, re.M)
    if not match:
        return None
    folder = re.search(r"^WorkingDirectory=(.+)$", text, re.M)
    workdir = Path(folder.group(1).replace("%%", "%")) if folder else None
    return Installed(unit_file, Path(_unquote_systemd(match.group(1))), workdir)


def installed_services(target: Target) -> list[Installed]:
    """Every mailrouter agent (``com.mailrouter.*.plist``) or unit (``mailrouter*.service``)."""
    pattern = "com.mailrouter.*.plist" if target.manager == "launchd" else "mailrouter*.service"
    found = (
        read_installed(p, target.manager) for p in sorted(target.unit_file.parent.glob(pattern))
    )
    return [s for s in found if s is not None]


def data_dir_of(config: Path, workdir: Path | None, home: Path, platform: str) -> Path | None:
    """The data folder a service of ``config`` uses: its ``data_dir`` (relative to the service's
    working directory) or the default; None when the file cannot be read. Read from the file
    alone: the service does not see this shell's ``MAILROUTER_*`` variables."""
    try:
        data = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    raw = data.get("data_dir")
    if not isinstance(raw, str):
        return default_data_dir(platform, {}, home)
    path = Path(raw).expanduser()
    return path if path.is_absolute() or workdir is None else workdir / path


def check_not_taken(target: Target, platform: str = sys.platform) -> None:
    """Refuse to install over the service of another configuration file of the same name (two
    files ``a/mailrouter.toml`` and ``b/mailrouter.toml`` share a label), or beside a service
    that uses the same data folder (the second would be refused at start, every 30 s)."""
    mine = data_dir_of(target.config, target.workdir, target.home, platform)
    for other in installed_services(target):
        if other.config == target.config:
            continue
        if other.unit_file == target.unit_file:
            raise ConfigError(
                f"{target.unit_file} already runs {other.config}: give this configuration file "
                "another name (the service is named after it), or pass --instance <name>"
            )
        if mine is not None and mine == data_dir_of(
            other.config, other.workdir, target.home, platform
        ):
            raise ConfigError(
                f"{other.unit_file.name} ({other.config}) already uses the data folder {mine}: "
                f"set another data_dir in {target.config} (one router per data folder)"
            )


# --- plans ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WriteFile:
    path: Path
    text: str
    mode: int = PLIST_MODE


@dataclass(frozen=True)
class MakeDir:
    path: Path
    mode: int | None = None  # None: leave an existing folder's mode (~/Library/LaunchAgents)


@dataclass(frozen=True)
class PrivateFile:
    """Create a log file ``0600`` before launchd opens it (launchd would create it ``0644``)."""

    path: Path


@dataclass(frozen=True)
class RemoveFile:
    path: Path


@dataclass(frozen=True)
class Run:
    """A command; ``check=False`` when a failure is expected (unloading what is not loaded),
    ``quiet`` to keep its output off the terminal (launchctl's "Boot-out failed: 3: No such
    process" when there was nothing to unload)."""

    argv: tuple[str, ...]
    check: bool = True
    quiet: bool = False

    def __str__(self) -> str:
        return shlex.join(self.argv)


@dataclass(frozen=True)
class WaitGone:
    """Poll ``launchctl print <service>`` until launchd no longer knows the label."""

    service: str
    timeout: float = BOOTOUT_WAIT_SECONDS


@dataclass(frozen=True)
class WaitExited:
    """Poll ``launchctl print <service>`` until the one-shot job has exited; its exit status
    becomes the plan's."""

    service: str
    timeout: float = DOCTOR_WAIT_SECONDS


@dataclass(frozen=True)
class ShowFile:
    path: Path


Step = WriteFile | MakeDir | PrivateFile | RemoveFile | Run | WaitGone | WaitExited | ShowFile


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
        if action == "install":
            return Plan(action, _launchd_install(target, templates, have_plutil))
        if action == "doctor":
            return Plan(action, _launchd_doctor(target, templates))
        return Plan(action, _launchd_steps(action, target, lines, follow))
    return Plan(action, _systemd_steps(action, target, templates, lines, follow))


def _launchd_install(t: Target, templates: Traversable, have_plutil: bool) -> tuple[Step, ...]:
    plist = str(t.unit_file)
    steps: list[Step] = [
        MakeDir(t.log_dir, LOG_DIR_MODE),
        *(PrivateFile(p) for p in (t.service_log, t.stdout_log, t.stderr_log)),
        MakeDir(t.unit_file.parent),
        WriteFile(t.unit_file, render_plist(t, templates), PLIST_MODE),
    ]
    if have_plutil:
        steps.append(Run(("plutil", "-lint", plist)))
    # bootstrap refuses a label launchd still knows ("Bootstrap failed: 5: Input/output
    # error"), and bootout returns before the old process has exited: unload, then wait.
    steps += [
        Run(("launchctl", "bootout", t.service), check=False, quiet=True),
        WaitGone(t.service, BOOTOUT_WAIT_SECONDS),
        Run(("launchctl", "enable", t.service)),
        Run(("launchctl", "bootstrap", t.domain, plist)),
    ]
    return tuple(steps)


def _launchd_doctor(t: Target, templates: Traversable) -> tuple[Step, ...]:
    """Bootstrap the one-shot doctor job, wait for it to exit, show what it printed, unload it."""
    plist = str(t.doctor_plist)
    unload = Run(("launchctl", "bootout", t.doctor_service), check=False, quiet=True)
    return (
        MakeDir(t.log_dir, LOG_DIR_MODE),
        unload,  # a run left behind by an interrupted `service doctor`
        WaitGone(t.doctor_service, BOOTOUT_WAIT_SECONDS),
        WriteFile(t.doctor_plist, render_doctor_plist(t, templates), PLIST_MODE),
        RemoveFile(t.doctor_output),
        PrivateFile(t.doctor_output),
        Run(("launchctl", "bootstrap", t.domain, plist)),
        WaitExited(t.doctor_service, DOCTOR_WAIT_SECONDS),
        ShowFile(t.doctor_output),
        unload,
        RemoveFile(t.doctor_plist),
    )


def _launchd_steps(action: Action, t: Target, lines: int, follow: bool) -> tuple[Step, ...]:
    if action == "uninstall":
        return (
            Run(("launchctl", "bootout", t.service), check=False, quiet=True),
            WaitGone(t.service, BOOTOUT_WAIT_SECONDS),
            RemoveFile(t.unit_file),
        )
    if action == "restart":
        return (Run(("launchctl", "kickstart", "-k", t.service)),)
    if action == "status":
        return (Run(("launchctl", "print", t.service)),)
    # -F follows each file by name, so it reopens the log after the service rotates it.
    tail = ("tail", "-n", str(lines), *(("-F",) if follow else ()))
    return (Run((*tail, str(t.service_log), str(t.stderr_log))),)


def _systemd_doctor(t: Target) -> Run:
    """``mailrouter doctor`` as a transient unit of the user's manager: the unit's environment,
    output piped back, its exit status returned (systemd-run(1): --wait, --pipe)."""
    return Run(
        (
            "systemd-run",
            "--user",
            "--wait",
            "--pipe",
            "--quiet",
            "--collect",
            f"--working-directory={t.workdir}",
            f"--setenv=PATH={t.path_env}",
            "--setenv=PYTHONUNBUFFERED=1",
            "--setenv=MAILROUTER_SUPERVISED=systemd",
            str(t.program),
            "--config",
            str(t.config),
            "doctor",
        )
    )


def _systemd_steps(
    action: Action, t: Target, templates: Traversable, lines: int, follow: bool
) -> tuple[Step, ...]:
    if action == "install":
        return (
            MakeDir(t.unit_file.parent),
            WriteFile(t.unit_file, render_unit(t, templates), UNIT_MODE),
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
    if action == "doctor":
        return (_systemd_doctor(t),)
    journal = ["journalctl", "--user", "-u", t.unit, "-n", str(lines), "--no-pager"]
    if follow:
        journal.append("-f")
    return (Run(tuple(journal)),)
