"""The learning loop attacked as an outsider would, on a real Dovecot and a real SMTP server.

Every forgery must change nothing and send nothing to a department; the one mail it may cause
is a confirmation request to the address it claimed, which a spoofer never sees.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from mailrouter.config import Settings, load_settings
from mailrouter.corrections.review import list_corrections
from mailrouter.dataset import Dataset
from mailrouter.localservers import Delivered, ImapAccount, SmtpSink
from mailrouter.pipeline.types import Context, Incoming
from mailrouter.state import State
from mailrouter.status import collect
from mailrouter.wiring import build_pipeline
from tests.fixtures.corrections import (
    AUTHSERV,
    ROUTER,
    STAFF,
    Forced,
    forwards,
    inbox_count,
    route_invoice_to_support,
    run,
    staff_reply,
    statuses,
    to,
)
from tests.fixtures.mail import make_email

DEPARTMENTS = ("rh@example.com", "support@example.com", "commercial@example.com",
               "finance@example.com")  # fmt: skip
CONFIRM_RE = re.compile(r"\[MRC-([0-9a-f]{32})\]")


def department_mail(sink: SmtpSink) -> list[Delivered]:
    return [d for d in sink.delivered() if set(d.rcpt_tos) & set(DEPARTMENTS)]


def corrections_of(dataset: Dataset) -> list[object]:
    return [e for e in dataset.load() if e.source in ("correction", "confirmation")]


def confirmation_request(sink: SmtpSink, address: str = STAFF) -> Delivered:
    (request,) = [d for d in to(sink, address) if CONFIRM_RE.search(d.header("Subject") or "")]
    return request


def awaiting(settings: Settings, account: ImapAccount, sink: SmtpSink) -> Delivered:
    """The invoice routed to Support, corrected to Finance without proof: the request sent."""
    forward = route_invoice_to_support(settings, account, sink)
    account.append([staff_reply(forward, "Finance", auth=None)])
    run(settings)
    return confirmation_request(sink)


def nothing_applied(sink: SmtpSink, dataset: Dataset) -> None:
    assert to(sink, "finance@example.com") == []
    assert corrections_of(dataset) == []


def answer(request: Delivered, text: str, *, sender: str = STAFF) -> bytes:
    """A reply to a confirmation request, as a mail client writes it (no authentication)."""
    subject = f"Re: {request.header('Subject')}"
    headers = {"In-Reply-To": request.header("Message-ID")}
    body = f"{text}\n\n> {request.header('Subject')}"
    return make_email(subject, body, sender=sender, to=ROUTER, headers=headers)


FORGERIES = {
    "no authentication header": None,
    "a forged trusted result below a failing one": (
        f"{AUTHSERV}; dkim=fail header.d=example.com\r\n"
        f"Authentication-Results: {AUTHSERV}; dkim=pass header.d=example.com"
    ),
    "a forged trusted result below another server's": (
        f"other.mx.test; dkim=pass header.d=example.com\r\n"
        f"Authentication-Results: {AUTHSERV}; dkim=pass header.d=example.com"
    ),
    "header.d of another domain": f"{AUTHSERV}; dkim=pass header.d=evil.test",
    "a look-alike domain": f"{AUTHSERV}; dkim=pass header.d=example.com.evil.test",
    "a quoted smtp.mailfrom": (
        f'{AUTHSERV}; spf=pass smtp.mailfrom="eve@evil.test (x) example.com"'
    ),
    "a pass hidden in a comment": f"{AUTHSERV}; dkim=fail (dkim=pass header.d=example.com)",
}


@pytest.mark.parametrize("auth", list(FORGERIES.values()), ids=list(FORGERIES))
def test_a_spoofed_staff_correction_only_asks_the_claimed_address(
    auth: str | None,
    settings: Settings,
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
    dataset: Dataset,
) -> None:
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    before = len(smtp_sink.delivered())
    imap_account.append([staff_reply(forward, "Finance", auth=auth)])
    run(settings)

    new = smtp_sink.delivered()[before:]
    assert [d.rcpt_tos for d in new] == [(STAFF,)], "only a confirmation request, to STAFF"
    assert CONFIRM_RE.search(new[0].header("Subject"))
    assert new[0].header("Auto-Submitted") == "auto-generated"
    assert len(department_mail(smtp_sink)) == 1  # the original forward, nothing more
    assert corrections_of(dataset) == []
    assert statuses(settings) == ["awaiting"]


def test_with_confirmation_off_an_unauthenticated_correction_sends_nothing(
    dataset: Dataset,
    make_mail_config: Callable[..., Path],
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
) -> None:
    corrections = {"trusted_authserv_id": AUTHSERV, "confirm_unauthenticated": False}
    settings = load_settings(make_mail_config(corrections=corrections))
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    before = len(smtp_sink.delivered())
    imap_account.append([staff_reply(forward, "Finance", auth=None)])
    run(settings)
    assert len(smtp_sink.delivered()) == before
    assert corrections_of(dataset) == []


def test_an_unauthenticated_correction_applies_once_confirmed(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink, dataset: Dataset
) -> None:
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    imap_account.append([staff_reply(forward, "Finance", auth=None)])
    run(settings)
    request = confirmation_request(smtp_sink)
    text = request.message().get_content()
    assert "Finance" in text and "Support" in text, "the request says what will change"
    ref = CONFIRM_RE.search(request.header("Subject")).group(1)
    others = [d for d in smtp_sink.delivered() if d is not request]
    assert all(ref.encode() not in d.data for d in others), "the ref reaches only STAFF"

    imap_account.append([answer(request, "oui")])
    run(settings)
    assert len(to(smtp_sink, "finance@example.com")) == 1
    (example,) = corrections_of(dataset)
    assert (example.label, example.by) == ("Finance", STAFF)

    imap_account.append([answer(request, "oui")])  # answered twice: applied once
    run(settings)
    assert len(to(smtp_sink, "finance@example.com")) == 1
    with State(settings.state_path) as state:
        (row,) = list_corrections(state)
        assert (row.status, row.auth) == ("applied", f"confirmed by {STAFF}")


@pytest.mark.parametrize(
    ("text", "sender"), [("non", STAFF), ("oui", "paul@example.com"), ("oui", "eve@evil.test")]
)
def test_a_confirmation_declined_or_answered_by_someone_else_changes_nothing(
    text: str,
    sender: str,
    settings: Settings,
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
    dataset: Dataset,
) -> None:
    request = awaiting(settings, imap_account, smtp_sink)
    imap_account.append([answer(request, text, sender=sender)])
    run(settings)
    nothing_applied(smtp_sink, dataset)


def test_a_guessed_confirmation_reference_is_customer_mail_or_nothing(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink, dataset: Dataset
) -> None:
    awaiting(settings, imap_account, smtp_sink)
    guess = f"[MRC-{'0' * 32}] oui"
    imap_account.append([make_email(guess, "oui", sender=STAFF, to=ROUTER)])
    run(settings)
    nothing_applied(smtp_sink, dataset)


def test_an_expired_confirmation_applies_nothing(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink, dataset: Dataset
) -> None:
    request = awaiting(settings, imap_account, smtp_sink)
    with State(settings.state_path) as state:
        state.execute("UPDATE confirmations SET expires = '2000-01-01T00:00:00+00:00'")
    imap_account.append([answer(request, "oui")])
    run(settings)
    nothing_applied(smtp_sink, dataset)
    assert "expir" in to(smtp_sink, STAFF)[-1].message().get_content()


@pytest.mark.parametrize("authentic", [True, False], ids=["insider", "spoofer"])
def test_sixty_corrections_from_rotating_staff_addresses_stop_at_the_caps(
    authentic: bool,
    dataset: Dataset,
    make_mail_config: Callable[..., Path],
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
) -> None:
    caps = {"daily_cap": 2, "daily_domain_cap": 5, "daily_total_cap": 8}
    settings = load_settings(
        make_mail_config(corrections={"trusted_authserv_id": AUTHSERV, **caps})
    )
    mails = [make_email(f"Question {i}", f"Bonjour, question numéro {i} sur nos commandes.",
                        sender=f"c{i}@customer.test") for i in range(60)]  # fmt: skip
    imap_account.append(mails)
    run(settings, Forced("Support"))
    sent = forwards(smtp_sink)
    assert len(sent) == 60
    before = len(smtp_sink.delivered())
    auth = f"{AUTHSERV}; dkim=pass header.d=example.com" if authentic else None
    replies = [
        staff_reply(f, "Finance", sender=f"agent{i}@example.com", auth=auth)
        for i, f in enumerate(sent)
    ]
    imap_account.append(replies)
    run(settings)

    assert len(to(smtp_sink, "finance@example.com")) == (5 if authentic else 0)
    assert len(corrections_of(dataset)) == (5 if authentic else 0)
    new = smtp_sink.delivered()[before:]
    assert len(new) <= 2 * 5, "at most the domain cap's answers and re-forwards"


def test_a_customer_quoting_a_token_reaches_a_department(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink, dataset: Dataset
) -> None:
    """A staff answer quoted the forward's reference; the customer's follow-up is routed (to
    the conversation's department), never taken for a correction."""
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    token = forward.header("X-MailRouter-Token")
    follow_up = make_email(
        f"Re: [MR-{token}] Erreur sur la facture F-2026-114",
        f"Merci, mais la facture est toujours fausse.\n\n> Réf. / Ref. [MR-{token}]\n",
        sender="compta@client-sarl.test",
        headers={"In-Reply-To": forward.header("Message-ID")},
    )
    imap_account.append([follow_up])
    report = run(settings, Forced("Finance"))
    assert [d.route for d in report.decisions] == ["department"]
    assert len(to(smtp_sink, "support@example.com")) == 2
    assert corrections_of(dataset) == []


def test_a_subdomain_of_a_staff_domain_is_not_staff(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink, dataset: Dataset
) -> None:
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    news = f"{AUTHSERV}; dkim=pass header.d=news.example.com"
    imap_account.append(
        [staff_reply(forward, "Finance", sender="promo@news.example.com", auth=news)]
    )
    forced = Forced("Commercial")
    run(settings, forced)
    assert len(forced.seen) == 1, "classified as customer mail"
    assert to(smtp_sink, "finance@example.com") == []
    assert corrections_of(dataset) == []


def test_a_handler_error_leaves_the_mail_in_place_and_status_says_why(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink
) -> None:
    def broken(context: Context, incoming: Incoming) -> None:
        raise RuntimeError("disk on fire")

    imap_account.append([make_email("Bonjour", "Une question sur ma commande.")])
    pipeline = build_pipeline(settings, classifier=Forced("Support"), handlers=[broken])
    try:
        report = pipeline.run_once()
    finally:
        pipeline.close()
    assert (report.waiting, report.filed, report.forwarded) == (1, 0, 0)
    assert smtp_sink.delivered() == []
    assert inbox_count(imap_account) == 1
    with State(settings.state_path) as state:
        assert "disk on fire" in (collect(settings, state).last_error or "")

    report = run(settings, Forced("Support"))  # the bug fixed: the next round routes it
    assert report.forwarded == 1


def test_a_signed_staff_answer_replayed_by_the_customer_does_not_apply(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink, dataset: Dataset
) -> None:
    """Staff answered the customer (signed, In-Reply-To the forward); the customer sends that
    very mail to contact@, where it still shows dkim=pass: it is not addressed to the router."""
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    answer_to_customer = staff_reply(forward, "ok").replace(
        f"To: {ROUTER}".encode(), b"To: compta@client-sarl.test"
    )
    imap_account.append([answer_to_customer])
    run(settings)
    assert corrections_of(dataset) == []
    with State(settings.state_path) as state:
        (row,) = list_corrections(state)
        assert row.status == "awaiting" and "not addressed to the router" in (row.auth or "")


def test_a_correction_of_a_test_split_text_leaves_the_test_split_alone(
    settings: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink, dataset: Dataset
) -> None:
    """The starter data is public: a mail repeating a test example's text, then an authentic
    correction of it, must not move the gate's yardstick. The re-forward still happens."""
    test_before = {e.id: e.label for e in dataset.split("test")}
    target = next(e for e in dataset.split("test") if e.label not in ("Support", "SPAM"))
    other = next(d.name for d in settings.departments if d.name not in (target.label, "Support",
                                                                         "SPAM"))  # fmt: skip
    imap_account.append([make_email(target.subject, target.text, sender="eve@evil.test")])
    run(settings, Forced("Support"))
    (forward,) = forwards(smtp_sink)
    imap_account.append([staff_reply(forward, other)])
    run(settings)

    assert len(to(smtp_sink, settings.department(other).address or "")) == 1
    assert {e.id: e.label for e in dataset.split("test")} == test_before
    assert corrections_of(dataset) == []
    (held,) = dataset.held()
    assert (held.example.label, held.target.id, held.target.split) == (other, target.id, "test")
    assert statuses(settings) == ["held"]


@pytest.mark.parametrize("automated", ["ignore", "triage"])
def test_a_staffs_out_of_office_answering_a_forward_is_no_correction(
    automated: str,
    dataset: Dataset,
    make_mail_config: Callable[..., Path],
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
) -> None:
    """Whatever becomes of machine mail (filed, or sent to triage), it never asks STAFF to
    confirm anything, earns no help reply and records no correction."""
    corrections = {"trusted_authserv_id": AUTHSERV}
    settings = load_settings(
        make_mail_config(corrections=corrections, mailbox={"automated": automated})
    )
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    auto = staff_reply(forward, "Je suis absente jusqu'au 12.", subject="Réponse automatique : "
                       "[Support] Erreur sur la facture", auth=None)  # fmt: skip
    imap_account.append([auto])
    run(settings)
    assert to(smtp_sink, STAFF) == []
    assert statuses(settings) == []
    assert corrections_of(dataset) == []
