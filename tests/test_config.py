"""Settings: file, environment, secrets, and errors that name file, field and fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mailrouter.config import (
    Department,
    fold,
    imap_password,
    load_settings,
    masked_dump,
    smtp_password,
)
from mailrouter.errors import ConfigError, SecretMissingError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "mailrouter.example.toml"


def test_defaults_are_the_tutorial_departments() -> None:
    settings = load_settings()
    assert settings.source is None
    assert settings.labels == ["RH", "Support", "Commercial", "Finance", "SPAM"]
    assert settings.department("SPAM").action == "spam"
    assert settings.mailbox.security == "tls"


def test_example_file_is_valid_and_complete(tmp_path: Path) -> None:
    """The documented template loads, and documents every field the models define."""
    settings = load_settings(EXAMPLE)
    assert settings.source == EXAMPLE
    text = EXAMPLE.read_text()
    for section in ("mailbox", "smtp", "classifier", "training", "corrections", "log"):
        model = getattr(settings, section)
        for field in type(model).model_fields:
            if field in {"password", "token_key", "hf_token", "openai_api_key"}:
                continue  # secrets are documented in the header, never as fields
            assert f"{field} =" in text or f"# {field} =" in text, f"[{section}].{field}"


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[smtp]\nhost = "from-file"\nport = 25\n')
    monkeypatch.setenv("MAILROUTER_SMTP__HOST", "from-env")
    settings = load_settings(cfg)
    assert settings.smtp.host == "from-env"
    assert settings.smtp.port == 25


def test_config_env_variable_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[mailbox]\nhost = "imap.acme.test"\n')
    monkeypatch.setenv("MAILROUTER_CONFIG", str(cfg))
    assert load_settings().mailbox.host == "imap.acme.test"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[mailbox]\nport = "abc"\n', "mailbox.port"),
        ('[smtp]\nsecurity = "ssl3"\n', "smtp.security"),
        ("[classifier]\nconfidence_threshold = 2\n", "classifier.confidence_threshold"),
        ('[mailbox]\nhots = "typo"\n', "unknown field"),
        ('[[departments]]\nname = "RH"\n', "needs an address"),
        ('[[departments]]\nname = "two words"\naddress = "a@b.c"\n', "one word"),
        ("data_dir = [", "not valid TOML"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path: Path, toml: str, expected: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert str(cfg) in str(info.value)
    assert expected in str(info.value)


def test_duplicate_alias_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "dup.toml"
    cfg.write_text(
        '[[departments]]\nname = "RH"\naddress = "rh@x.test"\naliases = ["compta"]\n'
        '[[departments]]\nname = "Finance"\naddress = "f@x.test"\naliases = ["Compta"]\n'
    )
    with pytest.raises(ConfigError, match="names both"):
        load_settings(cfg)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mailrouter init"):
        load_settings(tmp_path / "nope.toml")


def test_secrets_come_from_environment_and_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILROUTER_MAILBOX__PASSWORD", "hunter2-imap")
    settings = load_settings()
    assert imap_password(settings) == "hunter2-imap"
    dumped = str(masked_dump(settings))
    assert "hunter2" not in dumped
    assert "********" in dumped
    assert "hunter2" not in repr(settings)


def test_missing_secret_names_both_fixes() -> None:
    settings = load_settings(smtp={"username": "contact@acme.test"})
    with pytest.raises(SecretMissingError) as info:
        smtp_password(settings)
    assert "MAILROUTER_SMTP__PASSWORD" in str(info.value)
    assert "keyring set mailrouter" in str(info.value)


def test_empty_smtp_username_means_no_auth() -> None:
    assert smtp_password(load_settings(smtp={"username": ""})) is None


def test_fold_ignores_case_accents_and_spaces() -> None:
    assert fold("  Comptabilité ") == fold("COMPTABILITE")
    assert Department(name="SPAM", action="spam").address is None


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailrouter", *args], cwd=cwd, capture_output=True, text=True
    )


def test_cli_bad_config_exits_2_without_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[mailbox]\nport = "x"\n')
    result = _cli("--config", str(cfg), "config", "check", cwd=tmp_path)
    assert result.returncode == 2
    assert "mailbox.port" in result.stderr
    assert "Traceback" not in result.stderr


def test_init_by_flags_then_check(tmp_path: Path) -> None:
    out = tmp_path / "config" / "mailrouter.toml"
    result = _cli(
        "init", "--yes", "--no-store-key", "--output", str(out), "--domain", "acme.test",
        "--department", "Finance=compta@acme.test", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "MAILROUTER_CORRECTIONS__TOKEN_KEY=" in result.stdout
    settings = load_settings(out)
    assert settings.department("Finance").address == "compta@acme.test"
    assert settings.department("RH").address == "rh@acme.test"
    assert settings.corrections.staff_domains == ["acme.test"]
    check = _cli("--config", str(out), "config", "check", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert 'host = "imap.acme.test"' in check.stdout
    again = _cli("init", "--yes", "--output", str(out), cwd=tmp_path)
    assert again.returncode == 2
    assert "--force" in again.stderr


def test_config_example_prints_the_shipped_example() -> None:
    """What a pipx install has instead of the checkout's config/ folder."""
    done = subprocess.run(
        [sys.executable, "-m", "mailrouter", "config", "example"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == EXAMPLE.read_text(encoding="utf-8")
