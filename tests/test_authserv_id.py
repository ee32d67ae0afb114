"""Finding the receiving server's authserv-id in a real mailbox: the IMAP helper, doctor, init."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path

from typer.testing import CliRunner

from mailrouter.cli import app
from mailrouter.config import load_settings
from mailrouter.corrections.authentication import MISSING_ID
from mailrouter.doctor import check_authserv_id
from mailrouter.localservers import ImapAccount
from mailrouter.mail.imap import Mailbox
from tests.fixtures.mail import make_email

MX = "mx.mailrouter.test"
MICROSOFT = "spf=pass (sender IP is 192.0.2.1) smtp.mailfrom=client.test; dkim=none"


def received(subject: str, *results: str) -> bytes:
    """A customer's mail as the receiving server delivers it: its headers on top."""
    top = "".join(f"Authentication-Results: {r}\r\n" for r in results).encode()
    return top + make_email(subject, f"Texte de {subject}", sender="client@client.test")


def _seen(account: ImapAccount) -> list[bool]:
    client = account.client()
    try:
        client.select_folder("INBOX", readonly=True)
        return [b"\\Seen" in f for f in client.get_flags(client.search()).values()]
    finally:
        client.logout()


def test_newest_headers_reads_only_headers_newest_first_and_marks_nothing_seen(
    make_mail_config: Callable[..., Path], imap_account: ImapAccount
) -> None:
    imap_account.append([received(f"m{i}", f"{MX}; none") for i in range(3)])
    mailbox = Mailbox.from_settings(load_settings(make_mail_config()))
    try:
        blocks = mailbox.newest_headers(2)
        assert mailbox.newest_headers(0) == []
        assert len(mailbox.newest_headers(50)) == 3
    finally:
        mailbox.close()
    assert [b"Subject: m2" in b for b in blocks] == [True, False]
    assert b"Subject: m1" in blocks[1]
    assert all(b.startswith(b"Authentication-Results: ") for b in blocks)
    assert not any(b"Texte de" in b for b in blocks)
    assert _seen(imap_account) == [False, False, False]


def _check(make_mail_config: Callable[..., Path], configured: str) -> str:
    settings = load_settings(make_mail_config(corrections={"trusted_authserv_id": configured}))
    check = check_authserv_id(settings)
    assert not check.required  # routing works without it
    return check.line()


def test_doctor_reports_the_detected_id_and_the_line_to_write(
    make_mail_config: Callable[..., Path], imap_account: ImapAccount
) -> None:
    imap_account.append(
        [
            received("a", f"{MX}; dkim=pass header.d=client.test", "evil.test; none"),
            received("b", "evil.test; dkim=pass header.d=example.com"),  # a forged one, alone
            received("c", f"{MX} 1; spf=fail smtp.mailfrom=client.test"),
            make_email("internal", "no header at all", sender="paul@example.com"),
        ]
    )
    line = _check(make_mail_config, "")
    assert line.startswith(f"✗ authserv-id: {MX} on top of 2 of the 4 newest messages")
    assert "trusted_authserv_id is empty" in line
    assert f'put `trusted_authserv_id = "{MX}"` in [corrections]' in line
    assert _check(make_mail_config, MX.upper()).startswith(f"✓ authserv-id: {MX} on top of 2")
    assert _check(make_mail_config, f"mx2.mailrouter.test, {MX}").startswith("✓")
    line = _check(make_mail_config, "evil.test")
    assert "not the configured 'evil.test'" in line
    assert f'trusted_authserv_id = "{MX}"' in line


def test_doctor_with_microsoft_365_and_with_nothing_to_read(
    make_mail_config: Callable[..., Path], imap_account: ImapAccount
) -> None:
    line = _check(make_mail_config, MX)
    assert "no Authentication-Results header in the newest messages of INBOX" in line
    assert f"to compare with trusted_authserv_id '{MX}'" in line
    imap_account.append([received("ms", MICROSOFT)])
    line = _check(make_mail_config, "")
    assert "no authserv-id (Microsoft 365) on top of 1 of the 1 newest" in line
    assert f'trusted_authserv_id = "{MISSING_ID}"' in line
    assert _check(make_mail_config, MISSING_ID).startswith("✓")


def test_doctor_says_why_when_the_mailbox_cannot_be_read(
    make_mail_config: Callable[..., Path], imap_account: ImapAccount
) -> None:
    config = make_mail_config(mailbox={"password": "wrong"})
    check = check_authserv_id(load_settings(config))
    assert not check.ok
    assert "cannot read the newest messages: IMAP login refused" in check.line()


def _init(tmp_path: Path, account: ImapAccount, *extra: str, password: bool = True) -> Path:
    out = tmp_path / "init" / "mailrouter.toml"
    env = {"MAILROUTER_MAILBOX__PORT": str(account.port), "MAILROUTER_MAILBOX__SECURITY": "none"}
    if password:
        env["MAILROUTER_MAILBOX__PASSWORD"] = account.password
    args = ["init", "--yes", "--no-store-key", "--output", str(out), "--domain", "example.com",
            "--imap-host", account.host, "--imap-user", account.username, *extra]  # fmt: skip
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    (out.parent / "output.txt").write_text(result.output)
    return out


def _written(out: Path) -> tuple[str | None, str]:
    data = tomllib.loads(out.read_text())
    said = " ".join((out.parent / "output.txt").read_text().split())  # rich wraps lines
    return data["corrections"].get("trusted_authserv_id"), said


def test_init_proposes_the_detected_id(tmp_path: Path, imap_account: ImapAccount) -> None:
    imap_account.append([received(f"m{i}", f"{MX}; none") for i in range(3)])
    value, said = _written(_init(tmp_path, imap_account))
    assert value == MX
    assert f'trusted_authserv_id = "{MX}" (on top of 3 of the 3 newest messages)' in said
    assert _seen(imap_account) == [False, False, False]


def test_init_takes_the_option_over_the_mailbox(tmp_path: Path, imap_account: ImapAccount) -> None:
    imap_account.append([received("m", f"{MX}; none")])
    value, said = _written(_init(tmp_path, imap_account, "--authserv-id", " mx.example.net "))
    assert value == "mx.example.net"
    assert "on top of" not in said


def test_init_says_nothing_when_the_mailbox_cannot_be_read(
    tmp_path: Path, imap_account: ImapAccount
) -> None:
    imap_account.append([received("m", f"{MX}; none")])
    value, said = _written(_init(tmp_path, imap_account, password=False))
    assert value is None
    assert "authserv" not in said
    value, said = _written(_init(tmp_path / "empty", imap_account, "--force"))
    assert value == MX  # reachable this time


def test_init_with_an_empty_mailbox_writes_no_id(tmp_path: Path, imap_account: ImapAccount) -> None:
    value, said = _written(_init(tmp_path, imap_account))
    assert value is None
    assert "authserv" not in said
