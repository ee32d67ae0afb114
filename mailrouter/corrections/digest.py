"""The daily spam digest: what was filed as spam, mailed to the triage address with one
"not spam → department" link per message (each a correction token of its own)."""

from __future__ import annotations

import logging
from datetime import datetime
from email.policy import SMTP

from ..config import Settings
from ..logs import event
from ..mail.smtp import SmtpSender, send_with_retry
from ..message import address_domain
from ..pipeline.compose import notice_message
from ..state import NewForward, State, now_iso
from .links import DigestItem, spam_digest
from .tokens import token_maker

log = logging.getLogger(__name__)

DIGEST_KEY = "last_spam_digest"


def send_spam_digest(settings: Settings, *, sender: SmtpSender | None = None) -> int:
    """Mail the triage address the list of mail filed as spam since the last digest.

    Each entry gets a token of its own (a ``digest`` forward row), so "not spam → department"
    links are corrections like any other. Returns how many messages were listed.
    """
    state = State(settings.state_path)
    try:
        since = state.get(DIGEST_KEY) or ""
        spam = state.spam_since(since)
        stamp = now_iso()
        if not spam:
            state.set(DIGEST_KEY, stamp)
            return 0
        maker = token_maker(settings)
        domain = address_domain(settings.smtp.from_address)
        forwards = []
        items = []
        for message in spam:
            record = state.message(message)
            spec = NewForward("digest", settings.smtp.triage_address, None, domain, maker)
            forward = state.add_forward(record.id, spec, state=None)
            forwards.append(forward)
            items.append(DigestItem(forward.token, record.sender, record.subject,
                                    _parse_iso(record.created)))  # fmt: skip
        subject, text, html = spam_digest(settings, items)
        msg = notice_message(
            settings, to=settings.smtp.triage_address, subject=subject, notice="spam-digest"
        )
        msg.set_content(text, charset="utf-8", cte="quoted-printable")
        msg.add_alternative(html, subtype="html", charset="utf-8", cte="quoted-printable")
        own = sender is None
        smtp = sender or SmtpSender.from_settings(settings)
        try:
            send_with_retry(
                smtp, msg.as_bytes(policy=SMTP), settings.smtp.triage_address,
                attempts=settings.smtp.max_attempts, backoff=settings.smtp.backoff_seconds,
            )  # fmt: skip
        finally:
            if own:
                smtp.close()
        for forward in forwards:
            state.forward_sent(forward.forward_id)
        state.set(DIGEST_KEY, stamp)
        event(log, "spam_digest_sent", count=len(items), to=settings.smtp.triage_address)
        return len(items)
    finally:
        state.close()


def _parse_iso(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None
