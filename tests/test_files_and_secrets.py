"""Files and secrets: where the data folder lives, who may read what mailrouter writes, which
config files are refused, and what the training child inherits.

Modes are read with ``os.stat`` after the code under test wrote the files, under the test
process's own umask (022), so the explicit modes are what is checked, not the CLI's umask.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mailrouter.config import (
    check_serve_secrets,
    default_data_dir,
    hf_token,
    load_settings,
    secrets_in,
)
from mailrouter.errors import ConfigError, SecretMissingError
from mailrouter.logs import setup_logging
from mailrouter.training import job
from mailrouter.training.runner import request_settings

from .conftest import STARTER


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the default data folder -----------------------------------------------------------------


def test_default_data_folder_is_outside_any_checkout() -> None:
    home = Path("/home/ana")
    mac = Path("/Users/ana")
    assert default_data_dir("darwin", {}, mac) == mac / "Library/Application Support/mailrouter"
    assert default_data_dir("darwin", {"XDG_DATA_HOME": "/x"}, mac) == (
        mac / "Library/Application Support/mailrouter"
    )
    assert default_data_dir("linux", {}, home) == home / ".local/share/mailrouter"
    assert default_data_dir("linux", {"XDG_DATA_HOME": "/srv/data"}, home) == Path(
        "/srv/data/mailrouter"
    )
    # the XDG spec: a relative value is invalid and ignored
    assert default_data_dir("linux", {"XDG_DATA_HOME": "rel"}, home) == (
        home / ".local/share/mailrouter"
    )
    assert (
        default_data_dir("linux", {"XDG_DATA_HOME": ""}, home) == home / ".local/share/mailrouter"
    )


def test_settings_default_to_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILROUTER_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    expected = default_data_dir(sys.platform, os.environ, tmp_path)
    assert load_settings().data_dir == expected
    assert not expected.is_relative_to(Path.cwd())
    assert load_settings(data_dir="~/elsewhere").data_dir == tmp_path / "elsewhere"


def test_init_creates_the_data_folder_with_the_starter_data(tmp_path: Path) -> None:
    data = tmp_path / "home" / "share" / "mailrouter"
    out = tmp_path / "config" / "mailrouter.toml"
    env = {**os.environ, "MAILROUTER_DATA_DIR": str(data)}
    argv = [sys.executable, "-m", "mailrouter", "init", "--yes", "--no-store-key"]
    done = subprocess.run(
        [*argv, "--output", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "data_dir" not in out.read_text()  # the default applies
    assert mode(data) == 0o700 and mode(out) == 0o600
    examples = data / "examples.jsonl"
    assert examples.read_bytes() == STARTER.read_bytes() and mode(examples) == 0o600
    examples.write_text("")  # an examples file of the user's own is never replaced
    done = subprocess.run(
        [*argv, "--force", "--output", str(out)], cwd=tmp_path, env=env, capture_output=True
    )
    assert done.returncode == 0 and examples.read_text() == ""


# --- config files that hold secrets ----------------------------------------------------------


def test_a_config_file_with_a_secret_must_be_private(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[mailbox]\nhost = "imap.acme.test"\npassword = "hunter2"\n')
    for loose in (0o644, 0o640, 0o604, 0o620):
        os.chmod(cfg, loose)
        with pytest.raises(ConfigError) as info:
            load_settings(cfg)
        message = str(info.value)
        assert str(cfg) in message and f"chmod 600 {cfg}" in message
        assert "mailbox.password" in message and "hunter2" not in message
    os.chmod(cfg, 0o600)
    assert load_settings(cfg).mailbox.password.get_secret_value() == "hunter2"
    cfg.write_text('[mailbox]\nhost = "imap.acme.test"\n')  # no secret: any mode will do
    os.chmod(cfg, 0o644)
    assert load_settings(cfg).mailbox.host == "imap.acme.test"


def test_secret_fields_of_a_config() -> None:
    data = {
        "mailbox": {"password": "x"},
        "smtp": {"password": ""},
        "corrections": {"token_key": "k"},
        "training": {"hf_token": "hf"},
        "log": {"password": "not a secret field"},
    }
    assert secrets_in(data) == ["mailbox.password", "corrections.token_key", "training.hf_token"]
    assert secrets_in({"mailbox": "not a table"}) == []


# --- secrets serve needs ---------------------------------------------------------------------


def test_serve_checks_every_secret_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILROUTER_MAILBOX__PASSWORD", "imap")
    monkeypatch.setenv("MAILROUTER_SMTP__USERNAME", "contact@acme.test")
    monkeypatch.setenv("MAILROUTER_SMTP__PASSWORD", "smtp")
    check_serve_secrets(load_settings())
    for name, fix in (
        ("MAILROUTER_MAILBOX__PASSWORD", "keyring set mailrouter imap:"),
        ("MAILROUTER_SMTP__PASSWORD", "keyring set mailrouter smtp:"),
        ("MAILROUTER_CORRECTIONS__TOKEN_KEY", "secrets.token_urlsafe(32)"),
    ):
        with monkeypatch.context() as m:
            m.delenv(name)
            with pytest.raises(SecretMissingError) as info:
                check_serve_secrets(load_settings())
            assert f"export {name}=" in str(info.value) and fix in str(info.value)
    monkeypatch.delenv("MAILROUTER_SMTP__PASSWORD")
    check_serve_secrets(load_settings(), dry_run=True)  # a dry run sends nothing
    monkeypatch.setenv("MAILROUTER_SMTP__USERNAME", "")
    check_serve_secrets(load_settings())  # no SMTP login: no SMTP password


# --- files mailrouter writes -----------------------------------------------------------------


@pytest.fixture
def _restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.mark.usefixtures("_restore_logging")
def test_log_files_are_private_after_rotation_too(data_dir: Path) -> None:
    path = data_dir / "logs" / "mailrouter.log"
    setup_logging(file=path)
    logging.getLogger("t").info("decision from=client@example.org subject=Facture")
    handler = next(h for h in logging.getLogger().handlers if hasattr(h, "doRollover"))
    handler.doRollover()
    logging.getLogger("t").info("after rotation")
    assert mode(path.parent) == 0o700
    assert {p.name: mode(p) for p in path.parent.iterdir()} == {
        "mailrouter.log": 0o600,
        "mailrouter.log.1": 0o600,
    }


def test_dataset_writes_are_private(data_dir: Path) -> None:
    from mailrouter.dataset import Dataset, Example

    dataset = Dataset(data_dir / "sub" / "examples.jsonl")
    dataset.add([Example.new("Facture impayee", "Finance", split="train", source="seed")])
    assert mode(dataset.path) == 0o600 and mode(dataset.path.parent) == 0o700
    assert mode(dataset.lock_path) == 0o600


# --- the training child ----------------------------------------------------------------------

# Stands in for the runner (the swap point is job.runner_command): reports what it was given.
CHILD = (
    "import json, os, sys\n"
    "request = json.loads(sys.stdin.read())\n"
    "environ = open('/proc/self/environ', 'rb').read().decode(errors='replace')\n"
    "json.dump({'env': dict(os.environ), 'proc': environ, 'request': request},"
    " open(sys.argv[1], 'w'))\n"
)


def test_the_training_child_gets_no_secret_in_its_environment(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not Path("/proc/self/environ").exists():
        pytest.skip("reads the child's environment from /proc")
    secrets = {
        "MAILROUTER_MAILBOX__PASSWORD": "imap-pw-1",
        "MAILROUTER_SMTP__PASSWORD": "smtp-pw-2",
        "MAILROUTER_CORRECTIONS__TOKEN_KEY": "token-key-3",
        "HF_TOKEN": "hf-token-4",
        "OPENAI_API_KEY": "api-key-5",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MAILROUTER_SMTP__USERNAME", "contact@acme.test")
    dump = tmp_path / "child.json"
    monkeypatch.setattr(job, "runner_command", lambda: [sys.executable, "-c", CHILD, str(dump)])
    settings = load_settings()
    result = job.run_job(settings, timeout=60)
    seen = json.loads(dump.read_text())
    for value in secrets.values():
        assert value not in seen["proc"] and value not in json.dumps(seen["env"])
    assert seen["env"]["MAILROUTER_DATA_DIR"] == str(data_dir)  # the rest is inherited
    # the one secret the child needs travels in its request, on a pipe
    assert seen["request"]["hf_token"] == "hf-token-4"
    child = request_settings(seen["request"])
    assert hf_token(child) == "hf-token-4" and child.data_dir == data_dir
    request_text = json.dumps(seen["request"]["settings"])
    for value in ("imap-pw-1", "smtp-pw-2", "token-key-3", "hf-token-4"):
        assert value not in request_text
    # the child recorded nothing: the job says so, and its log is private
    assert result.decision == "failed"
    run_dir = settings.models_dir / "runs" / f"{result.run_id:04d}"
    assert mode(run_dir) == 0o700 and mode(run_dir / "job.log") == 0o600


def test_child_environment_drops_what_looks_like_a_secret() -> None:
    kept = {"PATH", "HOME", "HF_HOME", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM",
            "MAILROUTER_NO_KEYRING", "MAILROUTER_DATA_DIR", "PYTHON_KEYRING_BACKEND"}  # fmt: skip
    dropped = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MAILROUTER_MAILBOX__PASSWORD",
               "MAILROUTER_SMTP__PASSWORD", "MAILROUTER_CORRECTIONS__TOKEN_KEY",
               "MAILROUTER_TRAINING__HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "OPENAI_API_KEY",
               "GITHUB_TOKEN", "mailrouter_mailbox__password"}  # fmt: skip
    assert set(job.child_environment(dict.fromkeys(kept | dropped, "x"))) == kept
