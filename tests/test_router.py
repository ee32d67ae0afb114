"""The routing decision: pure, no I/O."""

from __future__ import annotations

import pytest

from mailrouter.config import Department, Settings
from mailrouter.message import Email
from mailrouter.prediction import Prediction
from mailrouter.router import decide, limit_rate, screen


def _settings(**mailbox: object) -> Settings:
    return Settings(
        mailbox={"automated": "ignore", **mailbox},
        smtp={"from_address": "contact@corp.example", "triage_address": "accueil@corp.example"},
        departments=[
            Department(name="RH", address="rh@corp.example"),
            Department(name="Support", address="support@corp.example"),
            Department(name="Accueil", action="triage"),
            Department(name="SPAM", action="spam"),
        ],
    )


def _email(
    *headers: tuple[str, str], sender: str = "client@example.org", body: str = "Bonjour"
) -> Email:
    return Email(
        raw_size=100,
        content_hash="0" * 64,
        sender=sender,
        subject="Une question",
        body=body,
        full_text=body,
        headers=tuple((k.lower(), v) for k, v in headers),
    )


def test_confident_prediction_goes_to_the_department() -> None:
    route = decide(Prediction("RH", 0.91, "m1"), _email(), _settings())
    assert (route.kind, route.department, route.address) == ("department", "RH", "rh@corp.example")
    assert route.forwards


@pytest.mark.parametrize(
    ("prediction", "why"),
    [
        (Prediction("RH", 0.4, "m1"), "low confidence 0.40 (RH < 0.60)"),
        (Prediction(None, 0.9, "m1", raw="Je ne sais pas"), "unknown answer 'Je ne sais pas'"),
        (Prediction("Compta", 0.9, "m1"), "label 'Compta' is not a configured department"),
        (None, "classifier error: timeout"),
    ],
)
def test_doubt_goes_to_triage(prediction: Prediction | None, why: str) -> None:
    route = decide(prediction, _email(), _settings(), error="timeout")
    assert (route.kind, route.address, route.reason) == ("triage", "accueil@corp.example", why)


def test_department_actions() -> None:
    spam = decide(Prediction("SPAM", 0.99, "m"), _email(), _settings())
    assert (spam.kind, spam.address, spam.forwards) == ("spam", None, False)
    desk = decide(Prediction("Accueil", 0.99, "m"), _email(), _settings())
    assert (desk.kind, desk.department, desk.address) == (
        "triage",
        "Accueil",
        "accueil@corp.example",
    )


@pytest.mark.parametrize(
    ("headers", "sender", "reason"),
    [
        ((("X-MailRouter-Forward-Id", "abc"),), "x@y.org",
         "sent by the router (x-mailrouter-forward-id)"),
        ((), "contact@corp.example", "sent from the router's own address"),
        ((("Auto-Submitted", "auto-replied"),), "x@y.org",
         "automated mail: auto-submitted: auto-replied"),
        ((("Precedence", "bulk"),), "x@y.org", "automated mail: precedence: bulk"),
        ((("Precedence", "junk"),), "x@y.org", "automated mail: precedence: junk"),
        ((("X-Autoreply", "yes"),), "x@y.org", "automated mail: auto-reply (x-autoreply)"),
        ((("Content-Type", "multipart/report; report-type=delivery-status"),), "x@y.org",
         "automated mail: bounce (delivery report)"),
        ((("Return-Path", "<>"),), "x@y.org", "automated mail: bounce (empty return path)"),
        ((), "mailer-daemon@mx.y.org", "automated mail: bounce (mailer-daemon@mx.y.org)"),
        ((("List-Id", "<news.y.org>"),), "x@y.org", "automated mail: mailing list"),
    ],
)  # fmt: skip
def test_machine_and_own_mail_is_ignored_before_any_model(
    headers: tuple[tuple[str, str], ...], sender: str, reason: str
) -> None:
    email = _email(*headers, sender=sender)
    route = screen(email, _settings())
    assert route is not None and (route.kind, route.reason) == ("ignore", reason)
    # even a confident prediction cannot forward it
    assert decide(Prediction("RH", 1.0, "m"), email, _settings()).kind == "ignore"


def test_automated_mail_can_be_triaged_instead() -> None:
    route = screen(_email(("Auto-Submitted", "auto-generated")), _settings(automated="triage"))
    assert route is not None and route.kind == "triage"
    # the router's own mail is never triaged: that would be a loop
    own = screen(_email(("X-MailRouter-Token", "t")), _settings(automated="triage"))
    assert own is not None and own.kind == "ignore"


def test_auto_submitted_no_is_a_person() -> None:
    assert screen(_email(("Auto-Submitted", "no")), _settings()) is None


def test_no_readable_text_goes_to_triage() -> None:
    email = Email(raw_size=10, content_hash="0" * 64, defects=("no body",))
    route = screen(email, _settings())
    assert route is not None and route.kind == "triage"
    assert route.reason == "no readable text (no body)"


# --- loops: our own addresses and the per-sender rate limit -----------------------------------


@pytest.mark.parametrize(
    ("sender", "who"),
    [
        ("rh@corp.example", "the address of department RH (rh@corp.example)"),
        ("support@corp.example", "the address of department Support (support@corp.example)"),
        ("accueil@corp.example", "the triage address accueil@corp.example"),
    ],
)
def test_mail_from_our_own_addresses_is_filed_not_forwarded(sender: str, who: str) -> None:
    """A person at a department writing to the contact address is kept (triage folder) and sent
    nowhere, whatever a model would say and whatever ``automated`` says."""
    for settings in (_settings(), _settings(automated="triage")):
        route = screen(_email(sender=sender), settings)
        assert route is not None and not route.forwards
        assert (route.kind, route.reason) == (
            "ignore",
            f"internal mail from {who}: filed, not forwarded",
        )
        assert decide(Prediction("RH", 1.0, "m"), _email(sender=sender), settings).kind == "ignore"


def test_an_auto_reply_from_a_department_is_never_triaged() -> None:
    """With ``automated = "triage"`` machine mail goes to the triage address, but not when it
    comes from one of our addresses: that could answer again."""
    auto = _email(("Auto-Submitted", "auto-replied"), sender="rh@corp.example")
    route = screen(auto, _settings(automated="triage"))
    assert route is not None and route.kind == "ignore"
    assert route.reason == "automated mail: auto-submitted: auto-replied"
    stranger = screen(_email(("Auto-Submitted", "auto-replied")), _settings(automated="triage"))
    assert stranger is not None and stranger.kind == "triage"


def test_subject_auto_reply_is_ignored() -> None:
    email = Email(
        raw_size=10, content_hash="0" * 64, sender="alice@corp.example", subject="Absent du bureau"
    )
    route = screen(email, _settings())
    assert route is not None and route.kind == "ignore"
    assert route.reason == "automated mail: auto-reply (subject: absent du bureau)"


@pytest.mark.parametrize(
    ("limit", "recent", "kind"),
    [(20, 0, "department"), (20, 19, "department"), (20, 20, "ignore"), (20, 500, "ignore"),
     (0, 10_000, "department"), (1, 1, "ignore")],
)  # fmt: skip
def test_rate_limit(limit: int, recent: int, kind: str) -> None:
    settings = _settings(max_forwards_per_sender_per_hour=limit)
    route = decide(Prediction("RH", 0.9, "m"), _email(), settings)
    limited = limit_rate(route, "client@example.org", recent, settings)
    assert limited.kind == kind
    if kind == "ignore":
        assert limited.reason == (
            f"rate limit: {recent} forwards of mail from client@example.org in the last hour "
            f"(max_forwards_per_sender_per_hour = {limit}): filed, not forwarded"
        )


def test_rate_limit_leaves_routes_that_send_nothing() -> None:
    settings = _settings(max_forwards_per_sender_per_hour=1)
    spam = decide(Prediction("SPAM", 0.99, "m"), _email(), settings)
    assert limit_rate(spam, "x@y.org", 99, settings) is spam
    triaged = decide(Prediction("RH", 0.1, "m"), _email(), settings)
    assert limit_rate(triaged, "x@y.org", 1, settings).kind == "ignore"
