"""Bounces of our forwards: the forward is marked failed and the triage address is told.

A department's server may accept a forward and refuse it later: the refusal comes back to the
router's address as a bounce, either a DSN (RFC 3464: ``multipart/report;
report-type=delivery-status`` with the returned message or its headers attached) or a plain
text message from ``MAILER-DAEMON``/``postmaster``. :func:`read_bounce` (pure) finds the
Message-ID of the returned message (our forwards' are ``<fwd-…@domain>``, stored in the
``forwards`` table) in the attached headers or the quoted text, whether delivery failed
(``Action: failed``; a delay notice is not a failure) and why (``Diagnostic-Code``/``Status``,
or the first lines of a plain bounce).

:class:`BounceHandler`, tried before every other handler, acts when the bounce names one of our
forwards and delivery failed: the forward is marked failed and the original, fetched back from
the folder it was filed in, goes to the triage address as a ``failure`` forward with the bounce's
reason. A bounce matched or not is never forwarded to a department: a matched one is filed here,
an unmatched one is left to :func:`mailrouter.router.screen`, which ignores bounces.

A bounce is easy to forge, and our forwards' Message-IDs reach customers (staff answers quote
them in ``References``). A forged bounce can at worst mark a forward failed and make the triage
address receive one more copy of a mail it may already have seen; it can send nothing to anyone
else, and only once per forward.

Idempotent after a crash: the key ``bounce:<forward id>`` records when the failure was noted and
then that the report was sent; a report interrupted after the server's "250" is recognised by
its ``failure`` forward, sent after that time, and one interrupted before it is sent again with
the same Message-ID (:meth:`Pipeline.send_forward` reuses a pending forward).
"""

from __future__ import annotations

import email as stdlib_email
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.message import Message
from email.parser import HeaderParser
from email.policy import compat32

from ..automated import bounce_signal, fold, is_delivery_report
from ..config import Settings
from ..errors import SmtpError
from ..logs import event
from ..mail.parse import decode_bytes
from ..message import Email
from ..state import ForwardRecord, MessageState, State, now_iso
from .types import Context, Incoming, Outcome

log = logging.getLogger(__name__)

#: Only the start of a bounce is read: the report comes first, the returned message after it.
MAX_BOUNCE_BYTES = 1024 * 1024
#: Characters of each text part searched for Message-IDs and a reason.
MAX_TEXT_CHARS = 64 * 1024
MAX_CANDIDATES = 10
MAX_DEPTH = 8
DONE = "done"
KEY_PREFIX = "bounce:"

_RETURNED = ("message/rfc822", "message/global")
_RETURNED_HEADERS = ("text/rfc822-headers", "message/global-headers")
_ID_LINE = re.compile(
    r"^[ \t>]*(?:x-original-|original[- ])?message[- ]id[ \t]*:[ \t]*(?:\r?\n[ \t>]+)?"
    r"(<[^<>\s]{1,250}>)",
    re.IGNORECASE | re.MULTILINE,
)
_ANGLE = re.compile(r"<[^<>\s]{1,250}>")
_SMTP_CODE = re.compile(r"\b[45]\d\d[ -]|\b[45]\.\d{1,3}\.\d{1,3}\b")
_DELAY = ("delay", "retard", "verzogert", "verzogerung", "retras", "still being retried", "warning")


@dataclass(frozen=True)
class Bounce:
    """What a bounce says. ``message_ids``: Message-IDs of the returned message that look like
    ours (``<fwd-…>``), best first; ``failed`` is false for a delay or success notice."""

    kind: str  # dsn | plain
    failed: bool
    message_ids: tuple[str, ...]
    reason: str


# --- reading a bounce (pure) ------------------------------------------------------------------


def read_bounce(raw: bytes, email: Email) -> Bounce | None:
    """The bounce in ``raw`` (parsed as ``email``), or ``None`` when it is not one."""
    signal = bounce_signal(email)
    if signal is None or not signal.startswith("bounce"):
        return None  # a person's mail, or a report that is not about delivery (a read receipt)
    message = stdlib_email.message_from_bytes(raw[:MAX_BOUNCE_BYTES], policy=compat32)
    found = _Found()
    _collect(message, found, 0)
    ids = [i for i in found.header_ids + _ids_in("\n".join(found.texts)) if _ours(i)]
    unique = tuple(dict.fromkeys(ids))[:MAX_CANDIDATES]
    if is_delivery_report(email) and found.blocks:
        failed, reason = _dsn_verdict(found.blocks)
        return Bounce("dsn", failed, unique, reason or _text_reason(found.texts))
    delayed = any(word in fold(email.subject) for word in _DELAY)
    return Bounce("plain", not delayed, unique, _text_reason(found.texts))


@dataclass
class _Found:
    """What the walk over a bounce's parts gathers."""

    header_ids: list[str] = field(default_factory=list)  # the returned message's Message-IDs
    texts: list[str] = field(default_factory=list)  # the bounce's own text parts
    blocks: list[Message] = field(default_factory=list)  # the delivery-status field blocks


def _collect(part: Message, found: _Found, depth: int) -> None:
    """Gather the report's fields, the returned message's Message-ID and the bounce's own text,
    without reading inside the returned message (its text is the customer's, not the server's)."""
    if depth > MAX_DEPTH:
        return
    ctype = part.get_content_type()
    if part.is_multipart() and ctype.startswith("multipart/"):
        for child in part.get_payload() or []:
            if isinstance(child, Message):
                _collect(child, found, depth + 1)
    elif ctype in _RETURNED:
        inner = part.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], Message):
            found.header_ids += _angles(inner[0].get_all("message-id", []))
    elif ctype in _RETURNED_HEADERS:
        text = _text(part)
        found.header_ids += _angles(HeaderParser().parsestr(text).get_all("message-id", []))
        found.texts.append(text)
    elif ctype == "message/delivery-status":
        blocks = _status_blocks(part)
        found.blocks += blocks
        for name in ("x-original-message-id", "original-message-id"):
            found.header_ids += _angles(v for b in blocks for v in b.get_all(name, []))
    elif ctype == "text/plain":
        found.texts.append(_text(part))


def _text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        payload = str(part.get_payload()).encode("utf-8", "replace")
    text, _ = decode_bytes(payload[: MAX_TEXT_CHARS * 2], part.get_content_charset())
    return text[:MAX_TEXT_CHARS]


def _status_blocks(part: Message) -> list[Message]:
    """The field blocks of a ``message/delivery-status`` part (per message, per recipient)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [b for b in payload if isinstance(b, Message)]
    text = _text(part).replace("\r\n", "\n")
    return [HeaderParser().parsestr(b.strip() + "\n") for b in re.split(r"\n\s*\n", text) if b]


def _angles(values: Iterable[object]) -> list[str]:
    """The ``<…>`` of each header value (folded, or with a comment around it)."""
    found = (_ANGLE.search(str(v)) for v in values)
    return [m.group(0) for m in found if m]


def _ids_in(text: str) -> list[str]:
    return _ID_LINE.findall(text)


def _ours(message_id: str) -> bool:
    return message_id.lower().startswith("<fwd-")


def _dsn_verdict(blocks: list[Message]) -> tuple[bool, str]:
    """(delivery failed, why) from the recipient fields: ``Action: failed``, or a 5.x.x
    ``Status`` when no action is given."""
    recipients = [b for b in blocks if b.get("action") or b.get("status")]
    failed = [
        b
        for b in recipients
        if _flat(b.get("action")).lower() == "failed"
        or (not b.get("action") and _flat(b.get("status")).startswith("5"))
    ]
    if not failed:
        return False, ""
    block = failed[0]
    diagnostic = re.sub(
        r"^\s*(smtp|x-[a-z-]+)\s*;\s*", "", _flat(block.get("diagnostic-code")), flags=re.I
    )
    status = _flat(block.get("status"))
    if diagnostic and status and status not in diagnostic:
        return True, f"{diagnostic} (status {status})"
    return True, diagnostic or (f"status {status}" if status else "delivery failed")


def _flat(value: object) -> str:
    return " ".join(str(value or "").split())


def _text_reason(texts: list[str]) -> str:
    """The first line with an SMTP code, else the first three lines of the bounce's text."""
    lines = [ln.strip(" >\t") for text in texts[:2] for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    coded = next((ln for ln in lines if _SMTP_CODE.search(ln)), None)
    return " ".join((coded or " ".join(lines[:3])).split())[:300]


# --- acting on it -----------------------------------------------------------------------------


class BounceHandler:
    """Claims the bounces of our forwards (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def __call__(self, context: Context, incoming: Incoming) -> Outcome | None:
        try:
            bounce = read_bounce(incoming.raw, incoming.email)
        except Exception:  # an unreadable bounce is left to screen(), which ignores it
            log.exception("reading a bounce failed (uid %s)", incoming.uid)
            return None
        if bounce is None:
            return None
        forward = next(
            (f for i in bounce.message_ids if (f := context.state.forward_by(message_id=i))),
            None,
        )
        if forward is None or forward.status == "pending":
            return None  # not one of our forwards (or not sent yet): ignored by screen()
        if not bounce.failed:
            event(log, "forward_delayed", forward_id=forward.forward_id, to=forward.destination)
            return None
        where = f"forward {forward.forward_id} to {forward.destination}"
        if context.dry_run:
            return Outcome(MessageState.IGNORED, None, f"bounce of {where}: {bounce.reason}",
                           "bounce")  # fmt: skip
        told = _report(context, forward, bounce.reason, incoming.raw)
        return Outcome(
            MessageState.IGNORED, "triage", f"bounce of {where}: {bounce.reason} ({told})", "bounce"
        )


def _report(context: Context, forward: ForwardRecord, why: str, bounce_raw: bytes) -> str:
    """Mark ``forward`` failed and tell the triage address, once: what was done."""
    state, triage = context.state, context.settings.smtp.triage_address
    key = KEY_PREFIX + forward.forward_id
    noted = state.get(key)
    if noted == DONE:
        return "already reported"
    if noted is None:
        if forward.status == "failed":  # refused when sent: the pipeline told triage then
            state.set(key, DONE)
            return "already reported when it was refused"
        noted = now_iso()
        state.set(key, noted)
    if forward.status != "failed":
        state.forward_failed(forward.forward_id, f"bounced: {why}"[:500])
    event(log, "forward_bounced", logging.WARNING, forward_id=forward.forward_id,
          to=forward.destination, reason=why)  # fmt: skip
    if forward.destination == triage or forward.kind in ("failure", "triage", "digest"):
        state.set(key, DONE)
        return "the triage address itself bounced: nobody else to tell"
    record = state.message(forward.message)
    if not _told_since(state, record.id, triage, noted):
        raw = context.mailbox.fetch_filed(
            record.folder or "routed", record.message_id, record.content_hash
        )
        reason = f"non distribué à / undeliverable to {forward.destination}: {why}"
        if raw is None:  # the original left the mailbox: the bounce itself shows what it was
            raw, reason = bounce_raw, f"{reason} (original not found: the bounce is attached)"
        try:
            context.outbox.send_forward(
                record, raw, destination=triage, department=None, kind="failure", reason=reason
            )
        except SmtpError as exc:
            if not exc.permanent:
                raise  # the bounce stays in the folder and is handled again next round
            event(log, "bounce_report_refused", logging.ERROR, to=triage, error=str(exc))
            state.set(key, DONE)
            return f"the triage address refused the report: {exc}"
    state.set(key, DONE)
    return f"reported to {triage}"


def _told_since(state: State, message: int, triage: str, since: str) -> bool:
    """A failure forward of this message reached the triage address after ``since``."""
    return any(
        f.kind == "failure"
        and f.destination == triage
        and f.status == "sent"
        and f.created >= since
        for f in state.forwards_of(message)
    )
