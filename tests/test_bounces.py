"""Bounces of our forwards: read (pure, on real-looking DSNs and plain bounces), then end to end
on a real Dovecot and a real SMTP server: the forward is marked failed, the triage address is
told once, nothing goes to a department."""

from __future__ import annotations

import email
import re

import pytest

from mailrouter.config import Settings
from mailrouter.localservers import Delivered, ImapAccount, SmtpSink
from mailrouter.mail.parse import parse_email
from mailrouter.pipeline.bounces import KEY_PREFIX, BounceHandler, read_bounce
from mailrouter.pipeline.types import Context, Incoming
from mailrouter.state import State
from mailrouter.wiring import build_pipeline
from tests.conftest import TEST_DATA
from tests.fixtures.corrections import Forced, forwards, route_invoice_to_support, run, to
from tests.fixtures.mail import attached, make_email

BOUNCES = TEST_DATA / "bounces"
PLACEHOLDER = b"<fwd-TEST@mailrouter.invalid>"
SUPPORT = "support@example.com"

#: file, kind, the reason read from it
FAILURES = [
    ("postfix-dsn.eml", "dsn", "550 5.1.1 <support@example.com>: Recipient address rejected: "
     "User unknown in virtual mailbox table"),
    ("exchange-ndr-fr.eml", "dsn", "554 5.2.2 mailbox full; STOREDRV.Deliver.Exception:"
     "QuotaExceededException.MapiExceptionShutoffQuotaExceeded"),
    ("gmail-dsn.eml", "dsn", "550-5.1.1 The email account that you tried to reach does not "
     "exist."),
    ("exim-plain.eml", "plain", "550 5.7.1 <support@example.com>: Relay access denied"),
    ("qmail-plain.eml", "plain", "Sorry, no mailbox here by that name. (#5.1.1)"),
]  # fmt: skip


def bounce_of(name: str, forward: Delivered | None = None, message_id: str = "") -> bytes:
    """A bounce fixture naming ``forward`` (or ``message_id``)."""
    named = message_id or (forward.header("Message-ID") if forward else "")
    return (BOUNCES / name).read_bytes().replace(PLACEHOLDER, named.encode())


def _folder_count(account: ImapAccount, folder: str) -> int:
    client = account.client()
    try:
        client.select_folder(folder, readonly=True)
        return len(client.search())
    finally:
        client.logout()


# --- reading (pure) ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kind", "reason"), FAILURES)
def test_each_bounce_names_the_forward_and_why(name: str, kind: str, reason: str) -> None:
    raw = bounce_of(name, message_id="<fwd-0123456789ab@mailrouter.test>")
    bounce = read_bounce(raw, parse_email(raw))
    assert bounce is not None
    assert (bounce.kind, bounce.failed) == (kind, True)
    assert bounce.message_ids == ("<fwd-0123456789ab@mailrouter.test>",)
    assert bounce.reason.startswith(reason)


def test_a_delay_notice_is_not_a_failure() -> None:
    raw = bounce_of("postfix-delay.eml", message_id="<fwd-0123456789ab@mailrouter.test>")
    bounce = read_bounce(raw, parse_email(raw))
    assert bounce is not None and not bounce.failed


def test_gmail_names_the_forward_in_the_report_alone() -> None:
    """Without the returned message, Gmail's ``X-Original-Message-ID`` report field names it."""
    raw = bounce_of("gmail-dsn.eml", message_id="<fwd-0123456789ab@mailrouter.test>")
    cut = raw.index(b"--000000000000a1b2c3d4e5f60718\nContent-Type: message/rfc822")
    raw = raw[:cut] + b"--000000000000a1b2c3d4e5f60718--\n"
    bounce = read_bounce(raw, parse_email(raw))
    assert bounce is not None and bounce.message_ids == ("<fwd-0123456789ab@mailrouter.test>",)


def test_only_our_forward_ids_are_candidates() -> None:
    """The Message-ID of a customer's mail quoted in a bounce names no forward."""
    raw = bounce_of("qmail-plain.eml", message_id="<CAF=abc@mail.gmail.com>")
    bounce = read_bounce(raw, parse_email(raw))
    assert bounce is not None and bounce.message_ids == ()


@pytest.mark.parametrize(
    "raw",
    [
        make_email("Undelivered parcel", "My parcel never arrived. Message-ID: <fwd-1@x.test>"),
        b"From: postmaster@example.org\r\nSubject: Read: Devis\r\nContent-Type: multipart/report;"
        b' report-type="disposition-notification"; boundary=b\r\n\r\n--b\r\n'
        b"Content-Type: text/plain\r\n\r\nLu\r\n--b--\r\n",
    ],
)
def test_a_persons_mail_or_a_read_receipt_is_no_bounce(raw: bytes) -> None:
    assert read_bounce(raw, parse_email(raw)) is None


# --- end to end -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kind", "reason"), FAILURES)
def test_a_bounce_marks_its_forward_failed_and_tells_triage_once(
    name: str,
    kind: str,
    reason: str,
    settings: Settings,
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
) -> None:
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    imap_account.append([bounce_of(name, forward)])
    report = run(settings)
    (decision,) = report.decisions
    assert decision.route == "bounce" and reason[:30] in decision.reason
    with State(settings.state_path) as state:
        record = state.forward_by(message_id=forward.header("Message-ID"))
        assert record is not None and record.status == "failed"
        assert record.last_error is not None and reason[:30] in record.last_error
    triage = settings.smtp.triage_address
    (told,) = to(smtp_sink, triage)
    assert told.header("Message-ID") != forward.header("Message-ID")
    assert attached(told)["Message-ID"] == attached(forward)["Message-ID"]  # the original
    text = " ".join(told.message().get_body(("plain",)).get_content().split())
    assert f"undeliverable to {SUPPORT}: {reason[:30]}" in text
    assert len(to(smtp_sink, SUPPORT)) == 1  # nothing more to the department
    assert _folder_count(imap_account, "MailRouter/Triage") == 1  # the bounce, kept
    # A second round, and another bounce of the same forward, send nothing more.
    other = "qmail-plain.eml" if name != "qmail-plain.eml" else "postfix-dsn.eml"
    imap_account.append([bounce_of(other, forward)])
    run(settings)
    run(settings)
    assert len(smtp_sink.delivered()) == 2
    assert _folder_count(imap_account, "MailRouter/Triage") == 2


def test_a_delay_notice_or_an_unknown_forward_changes_nothing(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink
) -> None:
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    delayed = bounce_of("postfix-delay.eml", forward)
    forged = bounce_of("postfix-dsn.eml", message_id="<fwd-0123456789ab@mailrouter.test>")
    imap_account.append([delayed, forged])
    report = run(settings)
    assert [d.route for d in report.decisions] == ["ignore", "ignore"]
    assert all(d.reason.startswith("automated mail: auto-submitted") for d in report.decisions)
    with State(settings.state_path) as state:
        record = state.forward_by(message_id=forward.header("Message-ID"))
        assert record is not None and record.status == "sent"
    assert len(smtp_sink.delivered()) == 1
    assert _folder_count(imap_account, "MailRouter/Triage") == 2


def test_a_bounce_of_a_forward_to_triage_tells_nobody(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink
) -> None:
    """The triage address bouncing: marked failed, and no report that would bounce again."""
    imap_account.append([make_email("Bonjour", "Une question pour vous.")])
    run(settings, Forced(None))
    (forward,) = forwards(smtp_sink)
    assert forward.rcpt_tos == (settings.smtp.triage_address,)
    imap_account.append([bounce_of("postfix-dsn.eml", forward)])
    (decision,) = run(settings).decisions
    assert decision.route == "bounce" and "nobody else to tell" in decision.reason
    with State(settings.state_path) as state:
        record = state.forward_by(message_id=forward.header("Message-ID"))
        assert record is not None and record.status == "failed"
    assert len(smtp_sink.delivered()) == 1


def test_triage_down_then_up_gets_one_report_with_one_message_id(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink
) -> None:
    """SMTP refusing for a while: the bounce waits in the folder, then one report is sent, with
    the Message-ID recorded before the first attempt."""
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    imap_account.append([bounce_of("postfix-dsn.eml", forward)])
    smtp_sink.fail_temporarily(settings.smtp.max_attempts)
    report = run(settings)
    assert report.waiting == 1 and _folder_count(imap_account, "INBOX") == 1
    with State(settings.state_path) as state:
        record = state.message(state.forward_by(message_id=forward.header("Message-ID")).message)
        (pending,) = [f for f in state.forwards_of(record.id) if f.kind == "failure"]
        assert pending.status == "pending"
    smtp_sink.clear_faults()
    run(settings)
    (told,) = to(smtp_sink, settings.smtp.triage_address)
    assert told.header("Message-ID") == pending.message_id
    run(settings)
    assert len(to(smtp_sink, settings.smtp.triage_address)) == 1


def test_a_bounce_handled_again_after_a_crash_sends_one_report(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink
) -> None:
    """The handler run again for the same bounce (a crash before the pipeline recorded it),
    even after the report left but before it was noted as done: one report."""
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    raw = bounce_of("gmail-dsn.eml", forward)
    incoming = Incoming(uid=99, raw=raw, email=parse_email(raw), size=len(raw))
    pipeline = build_pipeline(settings, classifier=Forced("Support"))
    try:
        pipeline.mailbox.connect()
        context = Context(settings, pipeline.state, pipeline.mailbox, pipeline.outbox, False)
        handler = BounceHandler(settings)
        first = handler(context, incoming)
        assert first is not None and f"reported to {settings.smtp.triage_address}" in first.reason
        key = KEY_PREFIX + forward.header("X-MailRouter-Forward-Id")
        # the crash: the report was sent, "done" never written
        pipeline.state.set(key, "2000-01-01T00:00:00+00:00")
        again = handler(context, incoming)
        assert again is not None and "reported" in again.reason
        assert handler(context, incoming) is not None
    finally:
        pipeline.close()
    assert len(to(smtp_sink, settings.smtp.triage_address)) == 1


def test_dry_run_reads_the_bounce_and_changes_nothing(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink
) -> None:
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    imap_account.append([bounce_of("exim-plain.eml", forward)])
    pipeline = build_pipeline(settings, dry_run=True, classifier=Forced("Support"))
    try:
        (decision,) = pipeline.run_once().decisions
    finally:
        pipeline.close()
    assert decision.route == "bounce"
    assert re.search(r"bounce of forward \w+ to support@example.com: 550 5.7.1", decision.reason)
    with State(settings.state_path) as state:
        record = state.forward_by(message_id=forward.header("Message-ID"))
        assert record is not None and record.status == "sent"
    assert len(smtp_sink.delivered()) == 1
    assert email.message_from_bytes(smtp_sink.delivered()[0].data)["To"] == SUPPORT


def test_a_folded_message_id_with_a_comment_and_a_bare_status() -> None:
    raw = (
        b"From: MAILER-DAEMON@mx.example.org\nSubject: Undelivered Mail Returned to Sender\n"
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n"
        b"--b\nContent-Type: text/plain\n\nThe mail system\n"
        b"--b\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx\n\n"
        b"Final-Recipient: rfc822; support@example.com\nAction: failed\nStatus: 5.0.0\n\n"
        b"--b\nContent-Type: message/rfc822\n\nMessage-ID:\n (ours) <fwd-0123456789ab@x.test>\n"
        b"From: router@x.test\n\nMessage recu.\n--b--\n"
    )
    bounce = read_bounce(raw, parse_email(raw))
    assert bounce is not None
    assert (bounce.failed, bounce.message_ids, bounce.reason) == (
        True,
        ("<fwd-0123456789ab@x.test>",),
        "status 5.0.0",
    )
