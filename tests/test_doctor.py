"""``mailrouter doctor`` against the real test servers, and against ports where nothing listens."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from typer.testing import CliRunner

from mailrouter import doctor
from mailrouter.cli import app
from mailrouter.localservers import SmtpSink, free_port, write_toml
from tests.fixtures.ollama import OllamaEndpoint


def _lines(output: str) -> dict[str, str]:
    """First line of each check by name (``✓ IMAP: …`` → ``{"IMAP": "✓ IMAP: …"}``)."""
    found: dict[str, str] = {}
    for line in output.splitlines():
        if line[:2] in ("✓ ", "✗ "):
            found.setdefault(line[2:].split(":", 1)[0], line)
    return found


def test_doctor_all_green_against_the_test_servers(
    make_mail_config: Callable[..., Path],
    smtp_sink: SmtpSink,
    ollama_server: OllamaEndpoint,
    tiny_ollama_model: str,
) -> None:
    config = make_mail_config(
        classifier={
            "backend": "ollama",
            "ollama_host": ollama_server.url,
            "model": "mailrouter-absent:latest",
            "zero_shot_model": tiny_ollama_model,
        }
    )
    res = CliRunner().invoke(app, ["--config", str(config), "doctor", "--send-test"])
    lines = _lines(res.output)
    assert res.exit_code == 0, res.output
    for name in ("config", "IMAP", "IMAP capabilities", "SMTP", "Ollama", "model", "MLX"):
        assert lines[name].startswith("✓"), res.output
    assert "IDLE yes, MOVE yes, UIDPLUS yes" in lines["IMAP capabilities"]
    assert "test message sent" in lines["SMTP"]
    assert f"zero-shot {tiny_ollama_model}" in lines["model"]
    assert "not checked offline" in lines["Hugging Face"]  # HF_HUB_OFFLINE=1 in tests
    sent = smtp_sink.wait_for(1)
    assert [m.rcpt_tos for m in sent] == [("triage@mailrouter.test",)]
    assert sent[0].header("Auto-Submitted") == "auto-generated"


def test_doctor_names_the_fix_and_fails_on_closed_ports(data_dir: Path) -> None:
    closed = free_port()
    config = write_toml(
        {
            "data_dir": str(data_dir),
            "mailbox": {
                "host": "127.0.0.1",
                "port": closed,
                "security": "none",
                "password": "x",
                "timeout_seconds": 5,
            },
            "smtp": {"host": "127.0.0.1", "port": closed, "security": "none", "username": ""},
            "classifier": {"backend": "ollama", "ollama_host": f"http://127.0.0.1:{closed}"},
        },
        data_dir.parent / "closed.toml",
    )
    res = CliRunner().invoke(app, ["--config", str(config), "doctor"])
    assert res.exit_code == 1, res.output
    lines = _lines(res.output)
    assert lines["config"].startswith("✓")
    for name in ("IMAP", "SMTP", "Ollama"):
        assert lines[name].startswith("✗"), res.output
        assert f"127.0.0.1:{closed}" in lines[name]
    assert "fix: check [mailbox] host, port and security" in lines["IMAP"]
    assert "fix: check [smtp] host, port and security" in lines["SMTP"]
    assert "ollama serve" in lines["Ollama"]
    assert "dataset" in lines and lines["dataset"].startswith("✗")  # empty, but optional here


def test_invalid_config_stops_early(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[mailbox]\nport = 'not a number'\n")
    checks = doctor.run(bad)
    assert len(checks) == 1 and not checks[0].ok
    assert "mailbox.port" in checks[0].detail
    assert doctor.failed(checks)


def test_optional_failures_do_not_fail_doctor() -> None:
    checks = [
        doctor.Check("config", True, "ok"),
        doctor.Check("MLX", False, "no module named mlx", "pip install mlx-lm", required=False),
    ]
    assert not doctor.failed(checks)
    assert checks[1].line() == (
        "✗ MLX: no module named mlx — fix: pip install mlx-lm (needed for training only)"
    )
