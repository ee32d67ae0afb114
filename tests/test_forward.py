"""The forward: composition (headers, intact original, no header injection) and SMTP sending."""

from __future__ import annotations

import base64
import email
from email import policy

import pytest

from mailrouter.config import Settings
from mailrouter.corrections.tokens import check_token, make_token
from mailrouter.errors import ConfigError, SmtpError
from mailrouter.localservers import SmtpSink, free_port
from mailrouter.mail.parse import parse_email
from mailrouter.mail.smtp import SmtpSender, send_with_retry
from mailrouter.pipeline.compose import ForwardFacts, Notice, compose_forward
from tests.fixtures.mail import make_email

FACTS = ForwardFacts(
    forward_id="0123456789ab",
    message_id="<fwd-0123456789ab@corp.example>",
    token="deadbeefcafe",
    destination="rh@corp.example",
    department="RH",
    confidence=0.87,
    model="baseline@1234",
)


def _settings(**corrections: str) -> Settings:
    return Settings(
        smtp={"from_address": "contact@corp.example", "triage_address": "accueil@corp.example"},
        corrections=corrections or {},
    )


def _compose(raw: bytes, **kwargs: object) -> email.message.EmailMessage:
    settings = kwargs.pop("settings", None) or _settings()
    data = compose_forward(raw, parse_email(raw), FACTS, settings, **kwargs)  # type: ignore[arg-type]
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    return email.message_from_bytes(data, policy=policy.default)  # type: ignore[return-value]


def _attachment(message: email.message.EmailMessage) -> bytes:
    part = next(p for p in message.walk() if p.get_content_type() == "message/rfc822")
    payload = part.get_payload(decode=False)
    if part["Content-Transfer-Encoding"] == "base64":
        return base64.b64decode(part.as_bytes().split(b"\n\n", 1)[1])
    return payload[0].as_bytes() if isinstance(payload, list) else payload


def test_forward_headers() -> None:
    raw = make_email("Candidature stage", "Bonjour, voici mon CV.", sender="ana@example.org")
    msg = _compose(raw)
    assert msg["From"] == "contact@corp.example"
    assert msg["To"] == "rh@corp.example"
    assert msg["Reply-To"] == "ana@example.org"
    assert msg["Subject"] == "[RH] Candidature stage"
    assert msg["Message-ID"] == "<fwd-0123456789ab@corp.example>"
    assert msg["Auto-Submitted"] == "auto-forwarded"
    assert msg["X-MailRouter-Forward-Id"] == "0123456789ab"
    assert msg["X-MailRouter-Token"] == "deadbeefcafe"
    assert msg["X-MailRouter-Version"].startswith("mailrouter ")
    text = msg.get_body(("plain",)).get_content()
    for fact in ("ana@example.org", "RH (87%)", "baseline@1234", "Candidature stage"):
        assert fact in text
    assert text.index("transféré") < text.index("forwarded")  # French first


def test_non_ascii_headers_are_encoded_and_read_back() -> None:
    subject = "Réclamation : facture n° 42 — délai dépassé, 3ᵉ relance 😠 " * 3
    raw = make_email(subject, "Bonjour.", sender="zoé@example.org")
    data = compose_forward(raw, parse_email(raw), FACTS, _settings())
    head = data.split(b"\r\n\r\n", 1)[0]
    assert head.isascii() and max(map(len, head.split(b"\r\n"))) <= 998
    msg = email.message_from_bytes(data, policy=policy.default)
    assert msg["Subject"] == "[RH] " + " ".join(subject.split())


def test_original_is_attached_intact() -> None:
    raw = make_email("Facture", "Montant dû : 120 €", sender="b@example.org")
    msg = _compose(raw)
    part = next(p for p in msg.walk() if p.get_content_type() == "message/rfc822")
    assert part["Content-Transfer-Encoding"] == "8bit"
    sent = compose_forward(raw, parse_email(raw), FACTS, _settings())
    assert raw in sent  # byte for byte (the original already had CRLF line endings)


def test_unsafe_original_is_base64_and_still_intact() -> None:
    raw = b"From: x@example.org\r\nSubject: nul\r\n\r\nA\x00B " + b"y" * 2000 + b"\r\n"
    msg = _compose(raw)
    part = next(p for p in msg.walk() if p.get_content_type() == "message/rfc822")
    assert part["Content-Transfer-Encoding"] == "base64"
    body = part.as_bytes().split(b"\n\n", 1)[1]
    assert base64.b64decode(body) == raw


def test_no_header_injection_from_the_email() -> None:
    raw = (
        b"From: =?utf-8?q?Eve=0D=0ABcc=3A_victim=40evil=2Eexample?= <eve@example.org>\r\n"
        b"Subject: =?utf-8?q?Hello=0D=0ABcc=3A_victim=40evil=2Eexample?=\r\n\r\nhi\r\n"
    )
    data = compose_forward(raw, parse_email(raw), FACTS, _settings())
    head = data.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nBcc:" not in head and b"\nBcc:" not in head
    msg = email.message_from_bytes(data, policy=policy.default)
    assert msg["Bcc"] is None
    assert "\n" not in msg["Subject"] and "victim@evil.example" in msg["Subject"]


def test_reply_to_only_when_sender_is_a_clean_address_or_configured() -> None:
    raw = make_email("Q", "?", sender="ana@example.org")
    assert _compose(raw, settings=_settings(reply_to="router"))["Reply-To"] is None
    bad = b"From: not an address\r\nSubject: x\r\n\r\nbody\r\n"
    assert _compose(bad)["Reply-To"] is None


def test_notice_goes_into_text_and_html() -> None:
    raw = make_email("Devis", "Un devis svp")
    notice = Notice("Mauvais service ? Wrong department?", "<p class='mr'>Mauvais service ?</p>")
    msg = _compose(raw, notice=notice)
    assert "Wrong department?" in msg.get_body(("plain",)).get_content()
    assert "<p class='mr'>" in msg.get_body(("html",)).get_content()
    assert _attachment(msg)


def test_headers_only_attachment_for_too_large_mail() -> None:
    raw = make_email("Gros fichier", "x" * 100)
    head = raw.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    data = compose_forward(head, parse_email(raw), FACTS, _settings(), headers_only=True)
    msg = email.message_from_bytes(data, policy=policy.default)
    kinds = [p.get_content_type() for p in msg.walk()]
    assert "text/rfc822-headers" in kinds and "message/rfc822" not in kinds
    assert "Too large to forward" in msg.get_body(("plain",)).get_content()


def test_tokens() -> None:
    token = make_token(b"key", "0123456789ab")
    assert token == make_token(b"key", "0123456789ab") and len(token) == 12
    assert token != make_token(b"other", "0123456789ab")
    assert check_token(b"key", "0123456789ab", token)
    assert check_token(b"key", "0123456789ab", token.upper())
    assert not check_token(b"key", "0123456789ac", token)
    assert not check_token(b"key", "0123456789ab", token[:4])


# --- sending ---------------------------------------------------------------------------------


def _sender(sink: SmtpSink, **smtp: object) -> SmtpSender:
    settings = Settings(smtp={"host": sink.host, "port": sink.port, "security": "none", **smtp})
    return SmtpSender(settings.smtp, None)


def test_send_retries_temporary_failures(smtp_sink: SmtpSink) -> None:
    sender = _sender(smtp_sink)
    smtp_sink.fail_temporarily(2, "421 4.7.0 Try again")
    used = send_with_retry(sender, b"Subject: a\r\n\r\nb\r\n", "rh@x.org", attempts=3, backoff=0)
    sender.close()
    assert used == 3 and len(smtp_sink.delivered()) == 1


def test_send_gives_up_after_the_attempts(smtp_sink: SmtpSink) -> None:
    sender = _sender(smtp_sink)
    smtp_sink.fail_temporarily(5)
    with pytest.raises(SmtpError) as info:
        send_with_retry(sender, b"Subject: a\r\n\r\nb\r\n", "rh@x.org", attempts=2, backoff=0)
    assert not info.value.permanent and info.value.code == 451


def test_permanent_errors(smtp_sink: SmtpSink) -> None:
    sender = _sender(smtp_sink)
    smtp_sink.fail_permanently(1)
    with pytest.raises(SmtpError) as info:
        send_with_retry(sender, b"Subject: a\r\n\r\nb\r\n", "rh@x.org", attempts=3, backoff=0)
    assert info.value.permanent and info.value.code == 550
    smtp_sink.reject("nobody@x.org")
    with pytest.raises(SmtpError) as info:
        sender.send(b"Subject: a\r\n\r\nb\r\n", "nobody@x.org")
    assert info.value.permanent and info.value.code == 550
    sender.close()


def test_dropped_connection_and_closed_port_are_temporary(smtp_sink: SmtpSink) -> None:
    sender = _sender(smtp_sink)
    smtp_sink.drop_connections(1)
    with pytest.raises(SmtpError) as info:
        sender.send(b"Subject: a\r\n\r\nb\r\n", "rh@x.org")
    assert not info.value.permanent
    sender.send(b"Subject: a\r\n\r\nb\r\n", "rh@x.org")  # reconnects
    assert len(smtp_sink.delivered()) == 1
    closed = SmtpSender(
        Settings(smtp={"host": "127.0.0.1", "port": free_port(), "security": "none"}).smtp, None
    )
    with pytest.raises(SmtpError) as info:
        closed.send(b"Subject: a\r\n\r\nb\r\n", "rh@x.org")
    assert not info.value.permanent and info.value.code is None


def test_plaintext_only_to_loopback() -> None:
    remote = Settings(smtp={"host": "smtp.example.org", "security": "none"}).smtp
    with pytest.raises(ConfigError, match="allow_insecure"):
        SmtpSender(remote, None)
    allowed = Settings(
        smtp={"host": "smtp.example.org", "security": "none", "allow_insecure": True}
    ).smtp
    SmtpSender(allowed, None)


def test_connect_checks_without_sending(smtp_sink: SmtpSink) -> None:
    sender = _sender(smtp_sink)
    sender.connect()
    sender.close()
    assert smtp_sink.delivered() == []
    closed = SmtpSender(
        Settings(smtp={"host": "127.0.0.1", "port": free_port(), "security": "none"}).smtp, None
    )
    with pytest.raises(SmtpError) as info:
        closed.connect()
    assert not info.value.permanent
