"""Corrections by reply, end to end on a real Dovecot and a real SMTP server.

The router's receiving server is ``AUTHSERV``: staff replies carry its passing result unless a
test says otherwise (the trust rules themselves are tested in test_corrections_trust.py).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pytest

from mailrouter.classify import make_classifier
from mailrouter.config import Settings, load_settings
from mailrouter.corrections.digest import send_spam_digest
from mailrouter.corrections.review import list_corrections, revert_correction
from mailrouter.dataset import Dataset
from mailrouter.localservers import Delivered, ImapAccount, SmtpSink
from mailrouter.prediction import ClassifyInput
from mailrouter.state import State
from tests.conftest import TEST_DATA
from tests.fixtures.corrections import (
    AUTHSERV,
    INVOICE,
    ROUTER,
    STAFF,
    Forced,
    authenticated,
    forwards,
    route_invoice_to_support,
    run,
    staff_reply,
    statuses,
    to,
)
from tests.fixtures.mail import make_email

REPLIES = TEST_DATA / "replies"


def fixture_reply(name: str, forward: Delivered) -> bytes:
    """A reply fixture, pointed at the forward the test made."""
    raw = (REPLIES / name).read_bytes()
    raw = raw.replace(b"@@TOKEN@@", forward.header("X-MailRouter-Token").encode())
    raw = raw.replace(b"<fwd-TEST@mailrouter.invalid>", forward.header("Message-ID").encode())
    raw = raw.replace(b"\nTo: contact@example.com", f"\nTo: {ROUTER}".encode(), 1)
    return authenticated(raw)


def _reply_cases() -> list[tuple[str, str | None]]:
    index = REPLIES / "index.json"
    if not index.exists():  # test_reply_fixtures_exist says so
        return []
    return [(name, case["expect"]) for name, case in sorted(json.loads(index.read_text()).items())]


def test_reply_fixtures_exist() -> None:
    assert len(_reply_cases()) >= 10, f"reply fixtures missing in {REPLIES}"


@pytest.mark.parametrize(("name", "expect"), _reply_cases())
def test_a_reply_from_each_mail_client_is_read_and_applied(
    name: str,
    expect: str | None,
    settings: Settings,
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
    dataset: Dataset,
) -> None:
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    imap_account.append([fixture_reply(name, forward)])
    report = run(settings)

    assert [d.route for d in report.decisions] == ["correction"]
    examples = [e for e in dataset.load() if e.source in ("correction", "confirmation")]
    replies = to(smtp_sink, STAFF)
    assert len(replies) == 1, "exactly one answer to the staff member"
    if expect in ("RH", "Support", "Commercial", "Finance") and expect != "Support":
        (again,) = [d for d in forwards(smtp_sink) if d is not forward and d != forward]
        assert again.rcpt_tos == (settings.department(expect).address,)
        assert again.data.count(b"F-2026-114") >= 1
        (example,) = examples
        assert (example.label, example.source) == (expect, "correction")
        assert (example.corrected_from, example.by) == ("Support", STAFF)
        assert example.subject == "Erreur sur la facture F-2026-114"
    elif expect in ("ok", "Support"):
        assert len(forwards(smtp_sink)) == 1
        (example,) = examples
        assert (example.label, example.source) == ("Support", "confirmation")
    elif expect == "spam":
        assert len(forwards(smtp_sink)) == 1
        (example,) = examples
        assert (example.label, example.source) == ("SPAM", "correction")
    else:  # unreadable: a help reply listing the departments, nothing else
        assert len(forwards(smtp_sink)) == 1
        assert examples == []
        assert b"Finance" in replies[0].data


def test_the_same_correction_twice_gives_one_example_and_one_forward(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink, dataset: Dataset
) -> None:
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    first = staff_reply(forward, "Finance")
    imap_account.append([first, staff_reply(forward, "-> compta")])
    run(settings)
    imap_account.append([first])  # the very same mail delivered again
    run(settings)

    assert len(to(smtp_sink, "finance@example.com")) == 1
    assert len([e for e in dataset.load() if e.source == "correction"]) == 1
    assert statuses(settings) == ["applied"]


def test_a_correction_between_batches_being_sent_is_applied_once(
    dataset: Dataset,
    make_mail_config: Callable[..., Path],
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
) -> None:
    """One message a batch: the correction's re-forward and confirmation are sent from the main
    thread while the sending thread forwards the batches around it, on the one connection."""
    settings = load_settings(
        make_mail_config(mailbox={"batch_size": 1}, corrections={"trusted_authserv_id": AUTHSERV})
    )
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    customers = [
        make_email(f"Question {i}", f"Bonjour, question {i} sur mon compte.", sender=f"c{i}@x.test")
        for i in range(6)
    ]
    imap_account.append([*customers[:3], staff_reply(forward, "Finance"), *customers[3:]])
    report = run(settings)

    assert sorted(d.route for d in report.decisions) == ["correction"] + ["department"] * 6
    assert len(to(smtp_sink, "finance@example.com")) == 1
    assert len(to(smtp_sink, STAFF)) == 1
    assert len(to(smtp_sink, "support@example.com")) == 1 + 6
    ids = [d.header("X-MailRouter-Forward-Id") for d in forwards(smtp_sink)]
    assert len(ids) == len(set(ids)) == 1 + 6 + 1
    assert statuses(settings) == ["applied"]
    with State(settings.state_path) as state:
        assert state.pending() == []


def test_a_later_correction_supersedes_the_earlier_one(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink, dataset: Dataset
) -> None:
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    imap_account.append([staff_reply(forward, "Commercial")])
    run(settings)
    imap_account.append([staff_reply(forward, "Finance")])
    run(settings)

    assert len(to(smtp_sink, "commercial@example.com")) == 1
    assert len(to(smtp_sink, "finance@example.com")) == 1
    (example,) = [e for e in dataset.load() if e.source == "correction"]
    assert (example.label, example.corrected_from) == ("Finance", "Commercial")


def test_the_correction_link_subject_works_without_reply_headers(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink, dataset: Dataset
) -> None:
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    link = _mailto(forward, "Finance")
    subject = unquote(parse_qs(urlparse(link).query)["subject"][0])
    assert subject == f"[MR-{forward.header('X-MailRouter-Token')}] Finance"
    imap_account.append([staff_reply(forward, "", subject=subject, in_reply_to=False)])
    run(settings)
    assert len(to(smtp_sink, "finance@example.com")) == 1


def _mailto(delivered: Delivered, department: str) -> str:
    text = delivered.message().get_body(("plain",)).get_content()
    match = re.search(rf"{department} : (mailto:\S+)", text)
    assert match, text
    return match.group(1)


def _refused(
    settings: Settings,
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
    dataset: Dataset,
    caplog: pytest.LogCaptureFixture,
    make: Callable[[Delivered], bytes],
) -> str:
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    before = len(smtp_sink.delivered())
    imap_account.append([make(forward)])
    with caplog.at_level(logging.INFO):
        run(settings)
    assert len(smtp_sink.delivered()) == before, "nothing is sent"
    assert [e for e in dataset.load() if e.source == "correction"] == []
    return "\n".join(r.getMessage() + str(getattr(r, "fields", "")) for r in caplog.records)


def test_an_outsiders_reply_is_customer_mail_not_a_correction(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink, dataset: Dataset
) -> None:
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    imap_account.append([staff_reply(forward, "Finance", sender="eve@evil.test")])
    forced = Forced("Support")
    report = run(settings, forced)
    assert [d.route for d in report.decisions] == ["department"]
    assert len(forced.seen) == 1
    assert to(smtp_sink, "finance@example.com") == []
    assert [e for e in dataset.load() if e.source == "correction"] == []


def test_a_forged_result_is_refused_when_confirmation_is_off(
    dataset: Dataset, make_mail_config: Callable[..., Path], imap_account: ImapAccount,
    smtp_sink: SmtpSink, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    corrections = {"trusted_authserv_id": "mx.example.com", "confirm_unauthenticated": False}
    settings = load_settings(make_mail_config(corrections=corrections))
    forged = "evil.test; dkim=pass header.d=example.com"
    headers = {"Authentication-Results": forged}
    logs = _refused(settings, imap_account, smtp_sink, dataset, caplog,
                    lambda f: staff_reply(f, "Finance", headers=headers, auth=None))  # fmt: skip
    assert "not authenticated" in logs


def test_an_authenticated_staff_reply_is_accepted(
    dataset: Dataset, make_mail_config: Callable[..., Path], imap_account: ImapAccount,
    smtp_sink: SmtpSink,
) -> None:  # fmt: skip
    settings = load_settings(
        make_mail_config(corrections={"trusted_authserv_id": "mx.example.com"})
    )
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    good = "mx.example.com; dkim=pass header.d=example.com; spf=pass smtp.mailfrom=example.com"
    imap_account.append([staff_reply(forward, "Finance", auth=good)])
    run(settings)
    assert len(to(smtp_sink, "finance@example.com")) == 1


def test_a_tampered_token_is_refused(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink, dataset: Dataset,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    def tampered(forward: Delivered) -> bytes:
        token = forward.header("X-MailRouter-Token")
        bad = ("0" if token[0] != "0" else "1") + token[1:]
        return staff_reply(forward, "", subject=f"[MR-{bad}] Finance", in_reply_to=False)

    logs = _refused(settings, imap_account, smtp_sink, dataset, caplog, tampered)
    assert "altered token" in logs


def test_a_token_for_another_message_is_refused(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink, dataset: Dataset,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    other = make_email("Candidature", "Bonjour, voici ma candidature.", sender="jean@gmail.test")
    imap_account.append([other])
    run(settings, Forced("Commercial"))
    other_token = forwards(smtp_sink)[0].header("X-MailRouter-Token")

    def crossed(forward: Delivered) -> bytes:  # answers one forward with the other's token
        return staff_reply(forward, "", subject=f"Re: [MR-{other_token}] Finance")

    logs = _refused(settings, imap_account, smtp_sink, dataset, caplog, crossed)
    assert "another message" in logs


def test_customer_mail_quoting_a_department_or_mr_text_is_classified(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink
) -> None:
    raw = make_email(
        "[MR-0123456789ab] Finance",
        "Bonjour, votre service Finance m'a dit d'écrire [MR-deadbeef00] ici. Commande 12.",
        sender="client@customer.test",
    )
    imap_account.append([raw])
    forced = Forced("Commercial")
    report = run(settings, forced)
    assert len(forced.seen) == 1
    assert [d.route for d in report.decisions] == ["department"]
    assert [d.rcpt_tos for d in forwards(smtp_sink)] == [("commercial@example.com",)]


def test_spam_digest_links_route_the_mail_and_record_the_example(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink, dataset: Dataset
) -> None:
    imap_account.append([INVOICE])
    run(settings, Forced("SPAM"))
    assert smtp_sink.delivered() == []
    assert send_spam_digest(settings) == 1
    assert send_spam_digest(settings) == 0, "each spam is listed once"
    (digest,) = to(smtp_sink, "triage@mailrouter.test")
    text = digest.message().get_body(("plain",)).get_content()
    assert "Erreur sur la facture F-2026-114" in text
    link = re.search(r"Finance : (mailto:\S+)", text).group(1)
    subject = unquote(parse_qs(urlparse(link).query)["subject"][0])
    imap_account.append([authenticated(make_email(subject, "Finance", sender=STAFF, to=ROUTER))])
    run(settings)

    (forward,) = forwards(smtp_sink)
    assert forward.rcpt_tos == ("finance@example.com",)
    (example,) = [e for e in dataset.load() if e.source == "correction"]
    assert (example.label, example.corrected_from) == ("Finance", "SPAM")


def test_revert_removes_the_example(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink, dataset: Dataset
) -> None:
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    imap_account.append([staff_reply(forward, "Finance")])
    run(settings)
    with State(settings.state_path) as state:
        (row,) = list_corrections(state)
        assert "removed" in revert_correction(settings, state, row.id)
        assert "already" in revert_correction(settings, state, row.id)
    assert [e for e in dataset.load() if e.source == "correction"] == []


def test_the_daily_cap_stops_a_flood_of_corrections(
    dataset: Dataset, make_mail_config: Callable[..., Path], imap_account: ImapAccount,
    smtp_sink: SmtpSink,
) -> None:  # fmt: skip
    settings = load_settings(
        make_mail_config(corrections={"daily_cap": 1, "trusted_authserv_id": AUTHSERV})
    )
    mails = [make_email(f"Question {i}", f"Bonjour, question numéro {i} sur nos commandes.",
                        sender=f"c{i}@customer.test") for i in range(2)]  # fmt: skip
    imap_account.append(mails)
    run(settings, Forced("Support"))
    first, second = forwards(smtp_sink)
    imap_account.append([staff_reply(first, "Finance"), staff_reply(second, "Finance")])
    run(settings)
    assert len(to(smtp_sink, "finance@example.com")) == 1


def test_the_baseline_learns_from_corrections(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink, dataset: Dataset
) -> None:
    """The embedded loop: corrections → examples → retrained baseline → the next one goes right."""

    def mail(i: int) -> bytes:
        return make_email(
            f"Borne Zorblax {i}",
            f"Bonjour, la borne Zorblax du site {i} affiche le code ZX-{i}. Merci de voir.",
            sender=f"site{i}@client-zorblax.test",
        )

    probe = ClassifyInput("Bonjour, la borne Zorblax du site 99 affiche le code ZX-99.",
                          "Borne Zorblax 99", "client-zorblax.test")  # fmt: skip
    before = make_classifier(settings, "baseline").classify(probe).label
    target = next(d.name for d in settings.departments if d.name not in (before, "SPAM"))

    imap_account.append([mail(i) for i in range(5)])
    run(settings, make_classifier(settings, "baseline"))
    for forward in forwards(smtp_sink):
        if forward.header("X-MailRouter-Department") != target:
            imap_account.append([staff_reply(forward, target)])
    run(settings)

    after = make_classifier(settings, "baseline").classify(probe)
    assert after.label == target, (before, after)


def test_a_reply_with_only_quoted_text_gets_help_not_a_guess(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink, dataset: Dataset
) -> None:
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    quoted = forward.message().get_body(("plain",)).get_content()
    body = "Le 3 nov. 2026, router a écrit :\n" + "".join(
        f"> {line}\n" for line in quoted.split("\n")
    )
    headers = {"In-Reply-To": forward.header("Message-ID")}
    subject = f"Re: {forward.header('Subject')}"
    imap_account.append([authenticated(make_email(subject, body, sender=STAFF, headers=headers))])
    run(settings)
    assert len(forwards(smtp_sink)) == 1
    assert [e for e in dataset.load() if e.source == "correction"] == []
    (help_reply,) = to(smtp_sink, STAFF)
    assert "pas compris" in help_reply.message().get_content()
