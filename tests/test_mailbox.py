"""The IMAP adapter against a real Dovecot: security, fetch, filing, IDLE, errors."""

from __future__ import annotations

import ssl
import threading
import time
from typing import Any

import pytest

from mailrouter.config import Settings
from mailrouter.errors import ConfigError, MailboxAuthError, MailboxError
from mailrouter.localservers import DovecotServer, ImapAccount
from mailrouter.mail.imap import Mailbox, UidValidityChanged, connect_imap
from mailrouter.mail.tls import tls_context
from tests.fixtures.mail import make_email


def _mailbox(account: ImapAccount, **extra: Any) -> Mailbox:
    settings = Settings(
        mailbox={
            "host": account.host,
            "port": account.port,
            "security": "none",
            "username": account.username,
            "poll_seconds": 1,
            **extra,
        }
    )
    return Mailbox(settings.mailbox, account.password, reconnect_base=0.05)


def _flags(account: ImapAccount, folder: str = "INBOX") -> list[tuple[bytes, ...]]:
    client = account.client()
    try:
        client.select_folder(folder, readonly=True)
        return list(client.get_flags(client.search()).values())
    finally:
        client.logout()


def test_tls_is_verified_by_default() -> None:
    context = tls_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert Settings().mailbox.security == "tls"


def test_plaintext_refused_towards_another_host() -> None:
    settings = Settings(mailbox={"host": "imap.example.org", "security": "none"})
    with pytest.raises(ConfigError, match="allow_insecure"):
        connect_imap(settings.mailbox, "pw")


def test_tls_to_a_plain_server_fails_cleanly(imap_account: ImapAccount) -> None:
    settings = Settings(
        mailbox={"host": imap_account.host, "port": imap_account.port, "security": "tls",
                 "timeout_seconds": 5}
    )  # fmt: skip
    with pytest.raises(MailboxError):
        connect_imap(settings.mailbox, imap_account.password)


def test_wrong_password_names_app_passwords(imap_account: ImapAccount) -> None:
    mailbox = _mailbox(imap_account)
    mailbox._password = "wrong"
    with pytest.raises(MailboxAuthError, match="app password"):
        mailbox.connect()


def test_fetch_keeps_seen_flags_and_files_by_move(imap_account: ImapAccount) -> None:
    imap_account.append([make_email("a", "1"), make_email("b", "2"), make_email("c", "3")])
    mailbox = _mailbox(imap_account)
    try:
        assert mailbox.connect() > 0
        uids = mailbox.pending_uids()
        assert len(uids) == 3
        raws = mailbox.fetch(uids)
        assert b"Subject: a" in raws[uids[0]]
        assert all(b"\\Seen" not in f for f in _flags(imap_account))
        sizes = mailbox.sizes(uids)
        assert sizes[uids[0]] == len(raws[uids[0]])
        assert mailbox.fetch(uids[:1], headers_only=True)[uids[0]].endswith(b"\r\n\r\n")
        mailbox.file(uids[:2], "routed")
        mailbox.file(uids[2:], "spam")
        assert mailbox.pending_uids() == []
        filed = mailbox.fetch_filed("routed", "", "")
        assert filed is None
    finally:
        mailbox.close()
    assert len(_flags(imap_account, "MailRouter/Routed")) == 2
    assert len(_flags(imap_account, "MailRouter/Spam")) == 1


def test_copy_and_expunge_where_move_is_missing(imap_account: ImapAccount) -> None:
    raw = make_email("a", "1", message_id="<find-me@example.org>")
    imap_account.append([raw, make_email("keep", "2")])
    mailbox = _mailbox(imap_account)
    try:
        mailbox.connect()
        mailbox.capabilities = mailbox.capabilities - {"MOVE"}
        first, second = mailbox.pending_uids()
        mailbox.file([first], "triage")
        assert mailbox.pending_uids() == [second]
        assert mailbox.fetch_filed("triage", "<find-me@example.org>") == raw
        assert mailbox.pending_uids() == [second]  # the watched folder is selected again
    finally:
        mailbox.close()


def test_keyword_mode(imap_account: ImapAccount) -> None:
    imap_account.append([make_email("a", "1"), make_email("b", "2")])
    mailbox = _mailbox(imap_account, use_folders=False)
    try:
        mailbox.connect()
        first, second = mailbox.pending_uids()
        mailbox.file([first], "routed")
        assert mailbox.pending_uids() == [second]
    finally:
        mailbox.close()
    flags = _flags(imap_account)
    assert sum(b"$MailRouterRouted" in f for f in flags) == 1


def test_idle_wakes_on_new_mail_and_on_stop(imap_account: ImapAccount) -> None:
    mailbox = _mailbox(imap_account)
    try:
        mailbox.connect()
        assert "IDLE" in mailbox.capabilities
        started = time.monotonic()
        assert mailbox.wait_for_changes(1.0) is False
        assert 0.9 < time.monotonic() - started < 5
        timer = threading.Timer(0.5, imap_account.append, [[make_email("new", "x")]])
        timer.start()
        started = time.monotonic()
        assert mailbox.wait_for_changes(20) is True
        assert time.monotonic() - started < 10
        timer.join()
        stop = threading.Event()
        threading.Timer(0.3, stop.set).start()
        started = time.monotonic()
        assert mailbox.wait_for_changes(20, stop) is False
        assert time.monotonic() - started < 3
        assert len(mailbox.pending_uids()) == 1  # the connection is usable after IDLE
    finally:
        mailbox.close()


def test_idle_broken_by_the_server_means_look_now(
    dovecot: DovecotServer, imap_account: ImapAccount
) -> None:
    """A connection that breaks during IDLE may have carried the news of new mail: the wait
    ends at once (the caller looks at the folder) instead of waiting again on a new session."""
    mailbox = _mailbox(imap_account)
    try:
        mailbox.connect()
        threading.Timer(0.5, dovecot.kick, [imap_account.username]).start()
        started = time.monotonic()
        assert mailbox.wait_for_changes(20) is True
        assert time.monotonic() - started < 10
        assert mailbox.pending_uids() == []  # reconnected for the next command
    finally:
        mailbox.close()


def test_polling_without_idle(imap_account: ImapAccount) -> None:
    mailbox = _mailbox(imap_account, idle=False)
    try:
        started = time.monotonic()
        assert mailbox.wait_for_changes(30) is True
        assert time.monotonic() - started < 3  # poll_seconds = 1
    finally:
        mailbox.close()


def test_reconnects_after_kick_and_reports_uidvalidity_change(
    dovecot: DovecotServer, imap_account: ImapAccount
) -> None:
    imap_account.append([make_email("a", "1")])
    connections = []

    def factory(settings: Any, password: str) -> Any:
        connections.append(1)
        return connect_imap(settings, password)

    mailbox = _mailbox(imap_account)
    mailbox._factory = factory
    try:
        mailbox.connect()
        dovecot.kick(imap_account.username)
        assert len(mailbox.pending_uids()) == 1
        assert len(connections) == 2 and mailbox.reconnects >= 1
        dovecot.reset_uidvalidity(imap_account.username)
        with pytest.raises(UidValidityChanged):
            mailbox.pending_uids()
        assert len(mailbox.pending_uids()) == 1  # the new generation is used from now on
    finally:
        mailbox.close()
