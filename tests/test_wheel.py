"""The wheel is sealed: installed outside the checkout, ``mailrouter demo`` and ``mailrouter
service install --dry-run`` run from a folder outside it and read only what the wheel ships.

The wheel is built offline (no build isolation, no index) from a copy of the checkout's source
files, into which the runtime files a developer's checkout holds are planted (a state database,
model runs, logs, a user's config with a password): none may end up in the wheel. It is installed
without its dependencies into a folder put first on ``PYTHONPATH``, and run by this virtualenv's
interpreter, whose dependencies are already there. The virtualenv also has an editable install of
the checkout: the child proves that every ``mailrouter`` module it loaded came from the installed
folder, and an audit hook records every file it opened, so a read of the checkout shows up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO, require

#: What ``pyproject.toml``'s package-data globs must put in the wheel, besides modules.
PACKAGE_DATA = {
    "mailrouter/starter/examples.jsonl",
    "mailrouter/service_templates/launchd/com.mailrouter.agent.plist.template",
    "mailrouter/service_templates/systemd/mailrouter.service.template",
    "mailrouter/example_config/mailrouter.example.toml",
}
SOURCES = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "mailrouter", "data", "deploy",
           "config")  # fmt: skip
#: Runtime files of a developer's checkout (all git-ignored), planted in the copy.
PLANTED = ("data/state.db", "data/state.db-wal", "data/models/runs/1/adapters.safetensors",
           "data/logs/mailrouter.log", "data/mailrouter.lock", "data/export/train.jsonl",
           "config/mailrouter.toml")  # fmt: skip
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]

#: Runs ``python -m mailrouter ARGS`` in the child, then prints on stderr, after ``SEAL``, where
#: every loaded mailrouter module and every opened file of the checkout or the install came from.
PROBE = """
import json, os, runpy, sys
from pathlib import Path

site, checkout = Path(sys.argv.pop(1)), Path(sys.argv.pop(1))
venv = Path(sys.prefix).resolve()
opened = set()

def audit(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)):
        opened.add(os.path.abspath(os.fsdecode(args[0])))

sys.addaudithook(audit)
try:
    runpy.run_module("mailrouter", run_name="__main__", alter_sys=True)
finally:
    files = [Path(m.__file__).resolve() for name, m in list(sys.modules.items())
             if name.split(".")[0] == "mailrouter" and getattr(m, "__file__", None)]
    paths = [Path(p).resolve() for p in opened]
    seal = {
        "modules": len(files),
        "modules_elsewhere": sorted(str(f) for f in files if not f.is_relative_to(site)),
        "checkout_read": sorted(str(p) for p in paths
                                if p.is_relative_to(checkout) and not p.is_relative_to(venv)),
        "data_read": sorted(p.relative_to(site).as_posix() for p in paths
                            if p.is_relative_to(site) and p.suffix not in (".py", ".pyc")),
    }
    print("SEAL " + json.dumps(seal), file=sys.stderr)
"""


def _source_files() -> list[str]:
    """The checkout's source files (tracked or new, never git-ignored) among :data:`SOURCES`."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *SOURCES],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return [name for name in listed if (REPO / name).is_file()]  # not deleted meanwhile


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(shutil.which("git") is not None and (REPO / ".git").exists(), "needs a git checkout")
    src = tmp_path_factory.mktemp("src")
    for name in _source_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / name, src / name)
    for name in PLANTED:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text('password = "not for the wheel"\n')
    dist = tmp_path_factory.mktemp("dist")
    build = [*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist)]
    done = subprocess.run([*build, str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (built,) = dist.glob("mailrouter-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    install = [*PIP, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)]
    done = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return target.resolve()


def _mailrouter(site: Path, cwd: Path, *args: str, env: dict[str, str]) -> tuple[str, dict]:
    """Run ``python -m mailrouter ARGS`` from the install in ``site``; (stdout, the SEAL report)."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(site), str(REPO), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        env={**env, "PYTHONPATH": str(site), "COLUMNS": "140"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("SEAL ")]
    seal = json.loads(line.removeprefix("SEAL "))
    assert seal["modules"] > 10 and seal["modules_elsewhere"] == [], seal
    assert seal["checkout_read"] == [], seal
    return " ".join(done.stdout.split()), seal


def test_wheel_holds_the_package_and_only_its_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    files = {n for n in names if not n.startswith("mailrouter-0") and not n.endswith(".py")}
    assert files == PACKAGE_DATA  # no planted runtime file, no user config
    modules = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "mailrouter").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert modules - names == set(), "every module of the checkout ships"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "mailrouter = mailrouter.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_demo_runs_outside_the_checkout(site: Path, tmp_path: Path) -> None:
    from mailrouter.localservers import find_dovecot

    require(find_dovecot() is not None, "Dovecot is not installed (make test-servers)")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "OLLAMA_HOST": "http://127.0.0.1:9"}
    out, seal = _mailrouter(site, cwd, "demo", "--emails", "4", env=env)
    assert "IMAP: Dovecot" in out
    assert "classifier: baseline — no usable Ollama here" in out
    assert "routed automatically" in out
    assert "new example in examples.jsonl" in out
    assert "baseline retrained on" in out
    assert "demo finished" in out
    assert "mailrouter/starter/examples.jsonl" in seal["data_read"]
    assert list(cwd.iterdir()) == []


def test_installed_service_install_dry_run(site: Path, tmp_path: Path) -> None:
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    config = cwd / "mailrouter.toml"
    shutil.copyfile(site / "mailrouter" / "example_config" / "mailrouter.example.toml", config)
    home = tmp_path / "home"
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    out, seal = _mailrouter(
        site, cwd, "--config", str(config), "service", "install", "--dry-run", env=env
    )
    if sys.platform == "darwin":
        unit = home / "Library" / "LaunchAgents" / "com.mailrouter.agent.plist"
        template = "mailrouter/service_templates/launchd/com.mailrouter.agent.plist.template"
        assert "$ launchctl bootstrap" in out
    else:
        unit = home / ".config" / "systemd" / "user" / "mailrouter.service"
        template = "mailrouter/service_templates/systemd/mailrouter.service.template"
        assert "$ systemctl --user daemon-reload" in out
        assert "$ systemctl --user enable --now mailrouter.service" in out
    assert f"write {unit}" in out
    assert template in seal["data_read"]
    assert not home.exists(), "a dry run writes nothing"
