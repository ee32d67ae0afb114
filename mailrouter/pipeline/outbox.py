"""The outbox: every mail the router sends, each committed before it leaves (DESIGN §4).

A forward's row (its id, Message-ID and token) is on disk before the SMTP transaction starts,
so a crash between the server's "250" and the next commit re-sends the very same message. A
temporary failure defers the message with a growing delay; a permanent one marks the forward
failed and sends the original to the triage address instead. Handlers reach the outbox through
the narrow :class:`~.types.Outgoing` protocol, never the pipeline itself.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..backoff import backoff_delay
from ..config import Settings
from ..errors import SmtpError
from ..logs import event
from ..mail.parse import parse_safely
from ..mail.smtp import SmtpSender, send_with_retry
from ..message import address_domain
from ..state import ForwardRecord, MessageRecord, MessageState, NewForward, State
from .compose import ForwardFacts, Notice, compose_forward
from .types import Incoming, NoticeMaker, RoundReport

log = logging.getLogger(__name__)

#: A sent forward ends the message's retries: what is written, and what its record then holds.
RETRY_CLEARED: dict[str, Any] = {"attempts": 0, "next_attempt_at": None, "last_error": None}


def likeliest(record: MessageRecord, n: int = 3) -> tuple[tuple[str, float], ...]:
    """The ``n`` likeliest departments the classifier saw for this message, if it told."""
    try:
        probabilities = json.loads(record.explain or "{}").get("probabilities") or {}
    except (ValueError, AttributeError):
        return ()
    ranked = sorted(probabilities.items(), key=lambda kv: (-float(kv[1]), kv[0]))
    return tuple((str(name), float(p)) for name, p in ranked[:n])


def no_token(_forward_id: str) -> str:
    """The token of a forward when corrections are not wired in: none."""
    return ""


class Outbox:
    """Sends forwards and composed messages on one SMTP connection (``None`` in a dry run).

    ``token`` makes the correction token of each forward (the corrections package provides
    it); ``notice`` builds the block appended to every forward (its correction links).
    """

    def __init__(
        self,
        settings: Settings,
        state: State,
        sender: SmtpSender | None,
        *,
        notice: NoticeMaker | None = None,
        token: Callable[[str], str] = no_token,
    ) -> None:
        self.settings = settings
        self.state = state
        self.sender = sender
        self.notice = notice
        self.token = token
        self.domain = address_domain(settings.smtp.from_address)
        self.smtp_down = False  # set by a failure of the server itself: stop sending this round
        self._sending = threading.Lock()  # one SMTP conversation at a time on self.sender

    def close(self) -> None:
        """End the SMTP connection (a new one opens on the next send)."""
        if self.sender is not None:
            self.sender.close()

    def first_forward(self, route: str, department: str | None, address: str | None) -> NewForward:
        """The forward of routed mail: to its department's address, or to triage."""
        to_department = route == "department"
        return self.spec(
            "route" if to_department else "triage",
            address or self.settings.smtp.triage_address,
            department if to_department else None,
        )

    def spec(self, kind: str, destination: str, department: str | None) -> NewForward:
        return NewForward(kind, destination, department, self.domain, self.token)

    def facts(self, record: MessageRecord, forward: ForwardRecord, reason: str) -> ForwardFacts:
        return ForwardFacts(
            forward_id=forward.forward_id,
            message_id=forward.message_id,
            token=forward.token,
            destination=forward.destination,
            department=forward.department,
            confidence=record.confidence,
            model=record.model,
            reason=reason,
            likeliest=likeliest(record),
        )

    def forward_pending(
        self, record: MessageRecord, incoming: Incoming, report: RoundReport
    ) -> MessageRecord | None:
        """Send the message's open forward: its record once sending is over (sent or given
        up), ``None`` while it has to wait."""
        forward = self.state.open_forward(record.id)
        if forward is None:  # nothing left to send
            return self.state.update(record.id, MessageState.FORWARDED)
        if self.smtp_down or self.sender is None:
            report.waiting += 1
            return None
        reason = record.reason or ""
        if forward.kind == "failure":
            failed = [f for f in self.state.forwards_of(record.id) if f.status == "failed"]
            last = failed[-1] if failed else None
            reason = f"refused by {last.destination}: {last.last_error}" if last else reason
        data = compose_forward(
            incoming.raw,
            incoming.email,
            self.facts(record, forward, reason),
            self.settings,
            notice=self.notice_for(self.facts(record, forward, reason)),
            headers_only=incoming.headers_only,
            size=incoming.size,
        )
        try:
            self.send_plain(data, forward.destination)
        except SmtpError as exc:
            return self._send_failed(record, forward, incoming, exc, report)
        self.state.forward_sent(
            forward.forward_id, message_state=MessageState.FORWARDED, **RETRY_CLEARED
        )
        report.forwarded += 1
        event(
            log,
            "forwarded",
            id=record.id,
            forward_id=forward.forward_id,
            kind=forward.kind,
            to=forward.destination,
            message_id=forward.message_id,
        )
        return replace(record, state=MessageState.FORWARDED, **RETRY_CLEARED)

    def notice_for(self, facts: ForwardFacts) -> Notice | None:
        if self.notice is None:
            return None
        try:
            return self.notice(self.settings, facts)
        except Exception:  # the links are a convenience; the forward matters more
            log.exception("building the correction notice failed")
            return None

    def _send_failed(
        self,
        record: MessageRecord,
        forward: ForwardRecord,
        incoming: Incoming,
        exc: SmtpError,
        report: RoundReport,
    ) -> MessageRecord | None:
        if not exc.permanent:
            attempts = record.attempts + 1
            base = self.settings.smtp.defer_seconds
            delay = backoff_delay(attempts - 1, base, cap=3600.0)
            self.state.forward_attempted(forward.forward_id, str(exc))
            self.state.update(
                record.id,
                attempts=attempts,
                next_attempt_at=time.time() + delay,
                last_error=str(exc),
            )
            if exc.code is None or exc.code == 421:
                self.smtp_down = True  # the server, not this message: stop sending this round
            report.deferred += 1
            event(log, "forward_deferred", logging.WARNING, id=record.id, code=exc.code,
                  error=str(exc), retry_in_s=round(delay, 1))  # fmt: skip
            return None
        report.failed += 1
        triage_address = self.settings.smtp.triage_address
        event(log, "forward_failed", logging.ERROR, id=record.id, to=forward.destination,
              code=exc.code, error=str(exc))  # fmt: skip
        self.state.forward_failed(
            forward.forward_id,
            str(exc),
            outcome=str(MessageState.FAILED),
            folder="triage",
            last_error=str(exc),
        )
        if forward.kind != "failure" and forward.destination != triage_address:
            self.state.add_forward(
                record.id, self.spec("failure", triage_address, None), state=None
            )
            return self.forward_pending(self.state.message(record.id), incoming, report)
        return self.state.update(record.id, MessageState.FORWARDED)

    def send_forward(
        self,
        record: MessageRecord,
        raw: bytes,
        *,
        destination: str,
        department: str | None,
        kind: str = "correction",
        reason: str = "",
    ) -> ForwardRecord:
        """Forward ``record``'s original (``raw``) again, with a new forward id and token.

        The forward row is committed before sending; SMTP errors are raised (after the retries)
        as :class:`SmtpError` and the row stays ``pending`` (or ``failed`` when permanent). A
        pending forward of the same kind to the same place (a deferral, or a crash after the
        server's "250") is sent again as it was, with its Message-ID, instead of a new one.
        """
        if self.sender is None:
            raise SmtpError("dry run: nothing is sent")
        forward = next(
            (
                f
                for f in self.state.forwards_of(record.id)
                if f.status == "pending"
                and (f.kind, f.destination, f.department) == (kind, destination, department)
            ),
            None,
        ) or self.state.add_forward(record.id, self.spec(kind, destination, department), state=None)
        facts = self.facts(record, forward, reason)
        email = parse_safely(raw, self.settings.mailbox.max_message_bytes)
        data = compose_forward(raw, email, facts, self.settings, notice=self.notice_for(facts))
        try:
            self.send_plain(data, destination)
        except SmtpError as exc:
            if exc.permanent:
                self.state.forward_failed(forward.forward_id, str(exc))
            else:
                self.state.forward_attempted(forward.forward_id, str(exc))
            raise
        self.state.forward_sent(forward.forward_id)
        return self.state.forward(forward.forward_id)

    def send_plain(self, data: bytes, recipient: str) -> None:
        """Send a message the caller composed (a confirmation, a digest), with the retries.

        Thread-safe: a correction handler may send while the sending thread forwards a batch.
        """
        if self.sender is None:
            raise SmtpError("dry run: nothing is sent")
        smtp = self.settings.smtp
        with self._sending:
            send_with_retry(
                self.sender, data, recipient, attempts=smtp.max_attempts,
                backoff=smtp.backoff_seconds,
            )  # fmt: skip
