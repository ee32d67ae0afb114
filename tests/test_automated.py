"""Machine-sent mail recognised by its headers and its subject: pure, table-driven."""

from __future__ import annotations

import pytest

from mailrouter.automated import (
    automated_reason,
    autoreply_subject,
    bounce_signal,
    bounce_subject,
    fold,
    header_reason,
    strip_prefixes,
)
from mailrouter.message import Email


def _email(
    *headers: tuple[str, str], sender: str = "client@example.org", subject: str = ""
) -> Email:
    return Email(
        raw_size=100,
        content_hash="0" * 64,
        sender=sender,
        subject=subject,
        body="Bonjour",
        full_text="Bonjour",
        headers=tuple((k.lower(), v) for k, v in headers),
    )


# --- subjects ---------------------------------------------------------------------------------

AUTOREPLIES = [
    # French
    ("Absent du bureau", "absent du bureau"),
    ("Absente du bureau jusqu'au 12 mai", "absente du bureau"),
    ("Réponse automatique : [Support] Erreur sur la facture", "reponse automatique"),
    ("RÉPONSE AUTOMATIQUE: Devis", "reponse automatique"),
    ("Reponse automatique d’absence", "reponse automatique d'absence"),
    ("Message automatique - merci de votre message", "message automatique"),
    ("En congé jusqu'au 2 septembre", "en conge"),
    ("En congés", "en conges"),
    ("RE : Absent du bureau", "absent du bureau"),
    ("Réf : [EXTERNE] Réponse automatique : Devis", "reponse automatique"),
    # English
    ("Out of Office", "out of office"),
    ("Out of Office AutoReply: [Commercial] Quote", "out of office autoreply"),
    ("Out of office until 5 May", "out of office"),
    ("Automatic reply: [Support] Invoice error", "automatic reply"),
    ("automatic reply", "automatic reply"),
    ("Autoreply: your message", "autoreply"),
    ("Auto-Reply: your message", "auto-reply"),
    ("Away from the office (back Monday)", "away from the office"),
    ("Re: Out of the office!", "out of the office"),
    ("[EXTERNAL] Automatic reply: Quote", "automatic reply"),
    # German
    ("Abwesenheitsnotiz: [Support] Rechnung", "abwesenheitsnotiz"),
    ("AW: Abwesenheitsnotiz", "abwesenheitsnotiz"),
    ("Automatische Antwort: Angebot", "automatische antwort"),
    ("Abwesend: Angebot", "abwesend"),
    ("Abwesend bis 3. Juni", "abwesend"),
    ("Antw: Abwesenheit vom 1. bis 5. Mai", "abwesenheit"),
    # Spanish
    ("Respuesta automática: Factura", "respuesta automatica"),
    ("RESPUESTA AUTOMATICA", "respuesta automatica"),
    ("Fuera de la oficina hasta el lunes", "fuera de la oficina"),
    ("Ausente: Presupuesto", "ausente"),
    ("RE: Respuesta de ausencia", "respuesta de ausencia"),
]

CUSTOMER_SUBJECTS = [
    "Question about your automatic reply settings",
    "Automatic reply settings",
    "Problème avec la réponse automatique de votre site",
    "Réponse automatique non reçue après ma commande",
    "Je serai absent du bureau la semaine prochaine, pouvez-vous livrer lundi ?",
    "En congé maternité : question sur mon salaire",
    "Ausente de la reunión",
    "Abwesenheitszeiten im Kundenservice?",
    "Fwd: Automatic reply: Quote",  # a person forwarding one: a person's mail
    "Devis pour 12 postes",
    "",
]


@pytest.mark.parametrize(("subject", "phrase"), AUTOREPLIES)
def test_autoreply_subjects_in_four_languages(subject: str, phrase: str) -> None:
    assert autoreply_subject(subject) == phrase


@pytest.mark.parametrize("subject", CUSTOMER_SUBJECTS)
def test_customer_subjects_are_not_autoreplies(subject: str) -> None:
    assert autoreply_subject(subject) is None


@pytest.mark.parametrize(
    ("subject", "left"),
    [
        ("Re: Re: AW: hello", "hello"),
        ("re : [ticket #12] [ext] sv: hej", "hej"),
        ("RE[2]: x", "x"),
        ("Fwd: x", "fwd: x"),
        ("Réf. : x", "ref. : x"),
    ],
)
def test_reply_prefixes_and_tags_are_stripped(subject: str, left: str) -> None:
    assert strip_prefixes(fold(subject)) == left


BOUNCES = [
    ("Undelivered Mail Returned to Sender", "undelivered mail returned to sender"),
    ("Delivery Status Notification (Failure)", "delivery status notification (failure)"),
    ("Mail delivery failed: returning message to sender", "mail delivery failed: returning "
     "message to sender"),
    ("failure notice", "failure notice"),
    ("Returned mail: see transcript for details", "returned mail"),
    ("Undeliverable: [Support] Invoice", "undeliverable"),
    ("Non remis : [Support] Facture", "non remis"),
    ("Notification d'état de distribution (échec)",
     "notification d'etat de distribution (echec)"),
    ("Unzustellbar: [Support] Rechnung", "unzustellbar"),
    ("No se puede entregar: [Support] Factura", "no se puede entregar"),
    ("Delayed Mail (still being retried)", "delayed mail (still being retried)"),
]  # fmt: skip


@pytest.mark.parametrize(("subject", "phrase"), BOUNCES)
def test_bounce_subjects(subject: str, phrase: str) -> None:
    assert bounce_subject(subject) == phrase


@pytest.mark.parametrize(
    "subject",
    [
        "Re: Undelivered Mail Returned to Sender",  # a person writing about a bounce
        "Mail delivery failed for my order",
        "Échec de la remise de 10 % sur ma commande",
        "Colis non remis",
        "Returned goods",
    ],
)
def test_customer_subjects_are_not_bounces(subject: str) -> None:
    assert bounce_subject(subject) is None


# --- headers ----------------------------------------------------------------------------------

HEADERS = [
    (("Auto-Submitted", "auto-replied"), "auto-submitted: auto-replied"),
    (("AUTO-SUBMITTED", "Auto-Generated; owner-email=x@y"), "auto-submitted: auto-generated"),
    (("Precedence", "Bulk"), "precedence: bulk"),
    (("Precedence", "auto_reply"), "precedence: auto_reply"),
    (("X-Precedence", "JUNK"), "x-precedence: junk"),
    (("X-Autoreply", "yes"), "auto-reply (x-autoreply)"),
    (("X-AutoRespond", "1"), "auto-reply (x-autorespond)"),
    (("X-Autoresponder", "vacation"), "auto-reply (x-autoresponder)"),
    (("X-Autogenerated", "Reply"), "auto-reply (x-autogenerated: reply)"),
    (("X-Auto-Response-Suppress", "All"), "auto-reply (x-auto-response-suppress: all)"),
    (("X-Auto-Response-Suppress", "DR, RN, NRN, OOF, AutoReply"),
     "auto-reply (x-auto-response-suppress: dr, rn, nrn, oof, autoreply)"),
    (("X-MS-Exchange-Inbox-Rules-Loop", "rh@example.com"),
     "sent on by a mailbox rule (x-ms-exchange-inbox-rules-loop)"),
    (("X-Loop", "support@example.com"), "loop marker (x-loop)"),
    (("List-Id", "<news.example.org>"), "mailing list"),
    (("List-Unsubscribe", "<mailto:u@example.org>"), "mailing list (list-unsubscribe)"),
]  # fmt: skip


@pytest.mark.parametrize(("header", "reason"), HEADERS)
def test_automated_headers(header: tuple[str, str], reason: str) -> None:
    assert header_reason(_email(header)) == reason
    assert automated_reason(_email(header)) == reason


@pytest.mark.parametrize(
    "header",
    [
        ("Auto-Submitted", "no"),
        ("Auto-Submitted", "No"),
        ("Precedence", "first-class"),
        ("X-Autoreply", "no"),
        ("X-Auto-Response-Suppress", "DR, RN"),  # read receipts suppressed: a person's client
        ("X-Mailer", "Microsoft Outlook 16.0"),
    ],
)
def test_person_headers(header: tuple[str, str]) -> None:
    assert automated_reason(_email(header, subject="Devis")) is None


@pytest.mark.parametrize(
    ("email", "reason"),
    [
        (_email(("Content-Type", "multipart/report; report-type=delivery-status; boundary=b")),
         "bounce (delivery report)"),
        (_email(("Content-Type", 'multipart/report; report-type="disposition-notification"')),
         "report (read receipt or other)"),
        (_email(("Return-Path", "<>")), "bounce (empty return path)"),
        (_email(sender="MAILER-DAEMON@mx.example.org".lower()),
         "bounce (mailer-daemon@mx.example.org)"),
        (_email(sender="postmaster@example.org"), "bounce (postmaster@example.org)"),
        (_email(sender="microsoftexchange329e71ec88ae4615bbc36ab6ce41109e@example.org"),
         "bounce (microsoftexchange329e71ec88ae4615bbc36ab6ce41109e@example.org)"),
        (_email(subject="Non remis : Facture"), "bounce (subject: non remis)"),
    ],
)  # fmt: skip
def test_bounces(email: Email, reason: str) -> None:
    assert bounce_signal(email) == reason
    assert automated_reason(email) == reason


def test_subject_rule_applies_when_headers_say_nothing() -> None:
    email = _email(("X-Mailer", "Microsoft Outlook"), subject="Réponse automatique : Devis")
    assert automated_reason(email) == "auto-reply (subject: reponse automatique)"
    assert automated_reason(_email(subject="Question about your automatic reply settings")) is None
