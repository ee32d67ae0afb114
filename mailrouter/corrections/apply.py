"""Applying an accepted correction: the original forwarded again to the right department, the
example recorded (or held for review when it contradicts one), and a one-line answer.

The original is fetched back from the folder it was filed in and sent through the outbox, whose
forward row is committed before sending; a correction recorded as applied is never applied
again, so a crash at any line neither forwards twice nor records twice.
"""

from __future__ import annotations

import logging
import time
from email.policy import SMTP

from ..config import Settings
from ..dataset import Dataset
from ..errors import SmtpError
from ..logs import event
from ..mail.parse import parse_email
from ..message import Email
from ..pipeline.compose import notice_message
from ..pipeline.types import Context, Outcome
from ..prediction import ClassifyInput
from ..router import department_route
from ..state import CorrectionRecord, MessageRecord, MessageState, State

log = logging.getLogger(__name__)

HELP_KEY = "help:"
ORIGINAL_MISSING = (
    "mailrouter : l'original est introuvable dans la boîte, rien n'a été changé. / "
    "The original could not be found in the mailbox; nothing was changed."
)


def filed(reason: str) -> Outcome:
    """A staff mail handled: it is filed with the routed mail."""
    return Outcome(MessageState.FILED, "routed", reason, "correction")


class Applier:
    """Applies one accepted correction to the message its forward carried."""

    def __init__(self, context: Context, row: CorrectionRecord, answer_to: Email) -> None:
        self.context = context
        self.settings = context.settings
        self.state = context.state
        self.row = row
        self.answer_to = answer_to
        self.record = context.state.message(row.message or 0)

    def apply(self) -> Outcome:
        row, record = self.row, self.record
        new_label, current = row.new_label or "", row.old_label
        raw = self.context.mailbox.fetch_filed(
            record.folder or "routed", record.message_id, record.content_hash
        )
        if raw is None:
            event(log, "correction_original_missing", logging.WARNING, id=record.id)
            self.state.update_correction(row.id, status="failed", reason="original not found")
            reply(self.context, self.answer_to, ORIGINAL_MISSING)
            return filed("original not found in the mailbox")
        if row.command == "route" and new_label != current and not self._already_sent(new_label):
            refused = self._resend(raw, new_label)
            if refused:
                self.state.update_correction(row.id, status="failed", reason=refused[:500])
                reply(self.context, self.answer_to, f"mailrouter : {refused}")
                return filed(f"correction to {new_label} failed: {refused}")
        source = "correction" if new_label != current else "confirmation"
        read = ClassifyInput.from_email(
            parse_email(raw, max_bytes=self.settings.mailbox.max_message_bytes)
        )
        result = Dataset.from_settings(self.settings).upsert_correction(
            text=read.text, label=new_label, subject=read.subject,
            sender_domain=read.sender_domain, mail_key=record.content_hash,
            corrected_from=current if source == "correction" else None, by=row.by, source=source,
        )  # fmt: skip
        status = "held" if result.held else "applied"
        self.state.update_correction(
            row.id, status=status, example_id=result.example.id, reason=result.reason or None
        )
        event(
            log,
            "correction_applied",
            id=record.id,
            by=row.by,
            old=current,
            new=new_label,
            kind=row.command,
            example=result.example.id,
            held=result.held,
            auth=row.auth,
        )
        reply(self.context, self.answer_to, self._line(source, result.held))
        return filed(
            f"correction by {row.by}: {current} -> {new_label}"
            + (" (example held for review)" if result.held else "")
        )

    def _resend(self, raw: bytes, department: str) -> str:
        """Forward the original to ``department``; ``""``, or why its server refused it.

        A temporary failure is raised: the pipeline keeps the mail and tries again next round.
        """
        reason = f"corrigé par / corrected by {self.row.by}"
        route = department_route(self.settings.department(department), reason, self.settings)
        destination = route.address or self.settings.smtp.triage_address
        try:
            self.context.outbox.send_forward(
                self.record, raw, destination=destination, department=department, reason=reason
            )
        except SmtpError as exc:
            event(log, "correction_deferred", logging.WARNING, id=self.row.id, error=str(exc))
            if not exc.permanent:
                raise
            return f"{destination} a refusé le renvoi / refused the forward: {exc}"
        return ""

    def _already_sent(self, department: str) -> bool:
        """A correction forward to ``department`` left after this correction was recorded."""
        return any(
            f.kind == "correction" and f.department == department and f.status == "sent"
            and f.created >= self.row.created
            for f in self.state.forwards_of(self.record.id)
        )  # fmt: skip

    def _line(self, source: str, held: bool) -> str:
        subject = self.record.subject[:80] or "(sans objet)"
        new, was = self.row.new_label, self.row.old_label or "triage"
        if source == "confirmation":
            line = f"mailrouter : merci, « {subject} » confirmé {new}. / Confirmed, thanks."
        elif self.row.command == "spam":
            line = f"mailrouter : « {subject} » noté comme spam. / Recorded as spam (was {was})."
        else:
            line = (
                f"mailrouter : « {subject} » renvoyé à {new} (était {was}). "
                f"/ Re-forwarded to {new} (was {was})."
            )
        if held:
            line += (
                "\nL'exemple contredit un exemple existant : il attend une revue "
                "(mailrouter corrections review). / The training example contradicts an "
                "existing one and waits for review."
            )
        return line


def current_label(state: State, record: MessageRecord) -> str | None:
    """The department a message is with now: its latest correction, else the route decided."""
    corrected = state.latest_correction_of([record.id])
    if corrected is not None:
        return corrected
    if record.route == "spam":
        return record.label
    return record.department if record.route == "department" else None


def help_reply(context: Context, email: Email) -> None:
    """One short help reply per sender per ``help_interval_seconds``."""
    key = HELP_KEY + email.sender
    last = float(context.state.get(key, "0") or 0)
    if time.time() - last < context.settings.corrections.help_interval_seconds:
        event(log, "correction_help_skipped", sender=email.sender)
        return
    names = ", ".join(d.name for d in context.settings.departments)
    reply(
        context,
        email,
        "mailrouter : je n'ai pas compris. Répondez avec le nom d'un service "
        f"({names}), « spam » ou « ok ».\n"
        f"I did not understand. Reply with a department ({names}), 'spam' or 'ok'.",
    )
    context.state.set(key, str(time.time()))


def reply(context: Context, to: Email, text: str) -> None:
    """A one-line answer to a staff mail; the correction stands even if the answer is lost."""
    try:
        context.outbox.send_plain(compose_reply(context.settings, to, text), to.sender)
    except SmtpError as exc:
        event(log, "correction_reply_failed", logging.WARNING, error=str(exc))


def compose_reply(settings: Settings, to: Email, text: str) -> bytes:
    """A short automatic answer to a staff mail, marked so it is never routed if it returns."""
    subject = " ".join(to.subject.split())[:150]
    msg = notice_message(
        settings,
        to=to.sender,
        subject=subject if subject.lower().startswith("re:") else f"Re: {subject}",
        notice="reply",
        auto_submitted="auto-replied",
    )
    if to.message_id:
        msg["In-Reply-To"] = to.message_id
        msg["References"] = to.message_id
    msg.set_content(text + "\n", charset="utf-8", cte="quoted-printable")
    return msg.as_bytes(policy=SMTP)
