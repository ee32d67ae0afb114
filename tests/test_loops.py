"""No mail loop, end to end on a real Dovecot and a real SMTP server: out-of-office replies
without ``Auto-Submitted`` in four languages, mail from our own addresses, the per-sender
forward limit, and a correction from a department address still applied."""

from __future__ import annotations

from collections.abc import Callable
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid
from pathlib import Path

import pytest

from mailrouter.config import Settings, load_settings
from mailrouter.localservers import Delivered, ImapAccount, SmtpSink
from mailrouter.state import State
from tests.fixtures.corrections import (
    AUTHSERV,
    INVOICE,
    Forced,
    forwards,
    route_invoice_to_support,
    run,
    staff_reply,
    to,
)
from tests.fixtures.mail import make_email

SUPPORT = "support@example.com"
ROUTER = "router@mailrouter.test"

#: Out-of-office subjects as Outlook/Exchange, Gmail and people write them, per language.
OUT_OF_OFFICE = {
    "fr": ("Réponse automatique : {subject}", "Je suis absente du bureau jusqu'au 12 mai."),
    "fr-custom": ("Absent du bureau", "Bonjour, je suis absent jusqu'au lundi 4."),
    "en": ("Automatic reply: {subject}", "I am out of the office until May 12."),
    "de": ("Abwesenheitsnotiz: {subject}", "Ich bin bis zum 12. Mai nicht im Büro."),
    "es": ("Respuesta automática: {subject}", "Estoy fuera de la oficina hasta el 12 de mayo."),
}


def out_of_office(forward: Delivered, replier: str, language: str) -> bytes:
    """An auto-reply to ``forward`` with none of the headers that would say so."""
    subject, text = OUT_OF_OFFICE[language]
    msg = EmailMessage()
    msg["From"] = replier
    msg["To"] = ROUTER
    msg["Subject"] = subject.format(subject=forward.header("Subject"))
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain="example.com")
    msg["In-Reply-To"] = forward.header("Message-ID")
    msg["X-Mailer"] = "Microsoft Outlook 16.0"
    msg.set_content(text)
    return msg.as_bytes(policy=SMTP)


def _states(settings: Settings) -> dict[str, int]:
    with State(settings.state_path) as state:
        return state.counts()


@pytest.mark.parametrize("language", sorted(OUT_OF_OFFICE))
@pytest.mark.parametrize("replier", [SUPPORT, "jean.martin@example.com"])
def test_out_of_office_ping_pong_stops_after_one_forward(
    language: str,
    replier: str,
    settings: Settings,
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
) -> None:
    """The department (its address, or a member's) answers every mail it receives with an
    auto-reply that only its subject betrays: the first forward is the only one."""
    imap_account.append([INVOICE])
    answered = 0
    for _ in range(4):
        run(settings, Forced("Support"))
        received = to(smtp_sink, SUPPORT)
        imap_account.append([out_of_office(d, replier, language) for d in received[answered:]])
        answered = len(received)
    assert len(smtp_sink.delivered()) == 1
    assert _states(settings) == {"filed": 1, "ignored": 1}


def test_a_department_address_writing_here_is_filed_not_forwarded(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink
) -> None:
    """A person at a department writing to the contact address: kept in the triage folder for a
    person to read, sent nowhere, with the reason in the log line."""
    mails = [
        make_email("Question sur un devis client", "Qui suit ce client ?", sender=s)
        for s in ("commercial@example.com", settings.smtp.triage_address)
    ]
    imap_account.append(mails)
    report = run(settings, Forced("Commercial"))
    assert [d.reason for d in report.decisions] == [
        "internal mail from the address of department Commercial (commercial@example.com): "
        "filed, not forwarded",
        f"internal mail from the triage address {settings.smtp.triage_address}: "
        "filed, not forwarded",
    ]
    assert smtp_sink.delivered() == []
    assert _states(settings) == {"ignored": 2}
    client = imap_account.client()
    try:
        client.select_folder("MailRouter/Triage", readonly=True)
        assert len(client.search()) == 2
    finally:
        client.logout()


def test_a_correction_from_a_department_address_is_still_applied(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink
) -> None:
    """Corrections are claimed before the screen: the loop guard does not block them."""
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    imap_account.append([staff_reply(forward, "Finance", sender=SUPPORT)])
    run(settings)
    assert [f.rcpt_tos for f in forwards(smtp_sink)] == [(SUPPORT,), ("finance@example.com",)]


def test_the_per_sender_limit_files_the_rest(
    dataset: object,
    make_mail_config: Callable[..., Path],
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
) -> None:
    """Three forwards an hour for one sender: the fourth and fifth mail are filed in the triage
    folder, in the same batch or a later round; another sender is not affected."""
    settings = load_settings(
        make_mail_config(
            mailbox={"max_forwards_per_sender_per_hour": 3},
            corrections={"trusted_authserv_id": AUTHSERV},
        )
    )
    flood = [make_email(f"Question {i}", f"Bonjour, question {i}.") for i in range(4)]
    imap_account.append(flood)
    report = run(settings, Forced("Support"))
    assert [d.route for d in report.decisions] == ["department"] * 3 + ["ignore"]
    assert report.decisions[-1].reason.startswith(
        "rate limit: 3 forwards of mail from client@example.org in the last hour"
    )
    imap_account.append(
        [
            make_email("Question 5", "Encore une."),
            make_email("Autre", "Bonjour.", sender="other@example.org"),
        ]
    )
    report = run(settings, Forced("Support"))
    assert [d.route for d in report.decisions] == ["ignore", "department"]
    assert len(smtp_sink.delivered()) == 4
    assert _states(settings) == {"filed": 4, "ignored": 2}
