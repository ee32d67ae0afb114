"""Sending by SMTP: the one adapter between the router and the outgoing mail server.

:class:`SmtpSender` keeps one connection for a round, TLS verified by default. Errors are mapped
to :class:`~mailrouter.errors.SmtpError`: ``permanent`` only for a 5xx answer about this message
(sender, recipient or content refused); 4xx answers, network and TLS failures, and a refused
login are temporary for the message (the configuration may be at fault, not the mail).
"""

from __future__ import annotations

import contextlib
import logging
import smtplib
import socket
import ssl
import time
from collections.abc import Callable

from ..backoff import backoff_delay
from ..config import Settings, SmtpSettings, smtp_password
from ..errors import SmtpError
from ..logs import event
from .tls import check_plaintext, tls_context

log = logging.getLogger(__name__)


# --- sending ---------------------------------------------------------------------------------


def _smtp_error(exc: BaseException, what: str) -> SmtpError:
    """Map an smtplib / socket / ssl error onto :class:`SmtpError`."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        code = max(codes) if codes else None
        detail = "; ".join(
            f"{rcpt}: {c} {m.decode(errors='replace') if isinstance(m, bytes) else m}"
            for rcpt, (c, m) in exc.recipients.items()
        )
        return SmtpError(
            f"{what}: recipient refused: {detail}",
            permanent=code is not None and 500 <= code < 600,
            code=code,
        )
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return SmtpError(
            f"{what}: SMTP login refused ({exc.smtp_code}): check smtp.username and the password "
            "(MAILROUTER_SMTP__PASSWORD or the Keychain); many providers need an app password",
            permanent=False,
            code=exc.smtp_code,
        )
    if isinstance(exc, smtplib.SMTPResponseException):
        message = exc.smtp_error
        text = message.decode(errors="replace") if isinstance(message, bytes) else str(message)
        code = int(exc.smtp_code)
        permanent = 500 <= code < 600 and not isinstance(exc, smtplib.SMTPHeloError)
        return SmtpError(f"{what}: {code} {text}", permanent=permanent, code=code)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return SmtpError(
            f"{what}: the SMTP server's certificate is not trusted ({exc.verify_message}): fix the "
            "server name or set smtp.ca_file",
        )
    if isinstance(exc, smtplib.SMTPServerDisconnected | smtplib.SMTPException):
        return SmtpError(f"{what}: {str(exc) or type(exc).__name__}")
    if isinstance(exc, socket.timeout | TimeoutError):
        return SmtpError(f"{what}: timed out")
    return SmtpError(f"{what}: {type(exc).__name__}: {exc}")


class SmtpSender:
    """One SMTP connection, opened on demand and kept for a round; :meth:`close` ends it."""

    def __init__(
        self,
        settings: SmtpSettings,
        password: str | None,
        *,
        factory: Callable[[SmtpSettings], smtplib.SMTP] | None = None,
    ) -> None:
        check_plaintext(settings.host, settings.security, settings.allow_insecure, "smtp")
        self.settings = settings
        self._password = password
        self._factory = factory or self._connect
        self._client: smtplib.SMTP | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> SmtpSender:
        return cls(settings.smtp, smtp_password(settings))

    def _connect(self, s: SmtpSettings) -> smtplib.SMTP:
        if s.security == "tls":
            client: smtplib.SMTP = smtplib.SMTP_SSL(
                s.host, s.port, timeout=s.timeout_seconds, context=tls_context(s.ca_file)
            )
        else:
            client = smtplib.SMTP(s.host, s.port, timeout=s.timeout_seconds)
            if s.security == "starttls":
                client.starttls(context=tls_context(s.ca_file))
        if client.sock is not None:
            with contextlib.suppress(OSError):
                client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client

    def connect(self) -> None:
        """Connect and log in now, sending nothing: a configuration check (``mailrouter doctor``).
        Raises :class:`SmtpError` like :meth:`send`; the connection is kept for later sends."""
        self._ensure()

    def _ensure(self) -> smtplib.SMTP:
        if self._client is None:
            where = f"{self.settings.host}:{self.settings.port}"
            try:
                client = self._factory(self.settings)
                client.ehlo_or_helo_if_needed()
                if self.settings.username:
                    client.login(self.settings.username, self._password or "")
            except (smtplib.SMTPException, OSError) as exc:
                raise _smtp_error(exc, f"connecting to {where}") from exc
            self._client = client
        return self._client

    def send(self, data: bytes, recipient: str, *, sender: str | None = None) -> None:
        """Send once; raises :class:`SmtpError`. The connection is dropped after any error."""
        client = self._ensure()
        options = ["BODY=8BITMIME"] if not data.isascii() and client.has_extn("8bitmime") else []
        try:
            refused = client.sendmail(
                sender or self.settings.from_address, [recipient], data, mail_options=options
            )
        except (smtplib.SMTPException, OSError) as exc:
            self.close()
            raise _smtp_error(exc, f"sending to {recipient}") from exc
        if refused:  # pragma: no cover - one recipient: refusal raises instead
            raise _smtp_error(smtplib.SMTPRecipientsRefused(refused), f"sending to {recipient}")

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.quit()
            except (smtplib.SMTPException, OSError):
                client.close()


def send_with_retry(
    sender: SmtpSender,
    data: bytes,
    recipient: str,
    *,
    attempts: int,
    backoff: float,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Send, retrying temporary failures ``attempts`` times in all; returns the attempts used.

    A permanent failure is raised at once; the last temporary one is raised when attempts run
    out (the caller defers the message).
    """
    for attempt in range(attempts):
        try:
            sender.send(data, recipient)
            return attempt + 1
        except SmtpError as exc:
            if exc.permanent or attempt + 1 >= attempts:
                raise
            delay = backoff_delay(attempt, backoff)
            event(
                log,
                "smtp_retry",
                logging.WARNING,
                recipient=recipient,
                attempt=attempt + 1,
                code=exc.code,
                error=str(exc),
                delay_s=round(delay, 2),
            )
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
