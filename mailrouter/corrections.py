"""Corrections by reply: staff fix a route, mailrouter re-forwards and learns (DESIGN §5).

A mail to the router is a correction when it carries a valid ``[MR-<token>]`` (subject or own
text) or answers a forward directly (``In-Reply-To``). It is claimed before classification, so
it is never forwarded as customer mail. Then, in order:

1. trust: the sender is staff, and a passing aligned DKIM/SPF result from the trusted
   ``Authentication-Results`` server when one is configured; the token is the one of the forward
   the mail answers. Anything else is ignored and logged, with no reply (no backscatter);
2. the command: the subject after the token, else the first line of the reply's own text;
3. the daily cap per sender (a guard against poisoning the dataset);
4. applying: the original (fetched back from the folder it was filed in) is forwarded again to
   the right department through :meth:`Pipeline.send_forward` (a new forward id, stored before
   sending), the example is recorded in ``examples.jsonl`` (a later correction of the same
   message replaces it) and the sender gets a one-line confirmation.

Each correction mail is recorded by its Message-ID before anything is sent, so a crash between
sending and the commit of the outcome does not forward twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid
from typing import TYPE_CHECKING

from .bounces import BounceHandler
from .classify.base import ClassifyInput
from .commands import (
    Command,
    authenticated,
    find_tokens,
    first_command_line,
    is_staff,
    parse_command,
    subject_command,
)
from .config import Settings, token_key
from .dataset import Dataset
from .errors import SmtpError
from .forward import ForwardFacts, Notice, SmtpSender, address_domain, send_with_retry
from .logs import event
from .message import Email, parse_email, strip_quoted
from .notice import DigestItem, correction_block, spam_digest
from .pipeline import Context, Incoming, Outcome
from .router import screen
from .state import ForwardRecord, MessageRecord, MessageState, NewForward, State, now_iso
from .tokens import check_token, token_maker

if TYPE_CHECKING:
    from .pipeline import Handler

log = logging.getLogger(__name__)

HELP_KEY = "help:"
DIGEST_KEY = "last_spam_digest"


# --- what the pipeline calls ------------------------------------------------------------------


def forward_notice(settings: Settings, facts: ForwardFacts) -> Notice:
    """The correction block of every forward (the pipeline's ``notice`` seam)."""
    text, html = correction_block(
        settings,
        token=facts.token,
        department=facts.department,
        confidence=facts.confidence,
        model=facts.model or "?",
    )
    return Notice(text=text, html=html)


def pipeline_handlers(settings: Settings) -> list[Handler]:
    """The handlers the pipeline tries before classifying a message."""
    return [BounceHandler(settings), CorrectionHandler(settings)]


# --- recognising a correction ---------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """What a mail to the router refers to. ``forward`` is ``None`` when its token is invalid."""

    forward: ForwardRecord | None
    token_in_subject: bool
    problem: str = ""


def find_claim(email: Email, state: State, key: bytes) -> Claim | None:
    """The forward a mail answers, or ``None`` when it is not a correction at all.

    Tokens count in the subject and in the reply's own text, not in quoted text: a customer who
    answers a staff reply that quoted a forward is not correcting anything.
    """
    in_subject = find_tokens(email.subject)
    # Tokens typed by the writer, not quoted: stripping quotes is the costly part, and most
    # mail has no token anywhere.
    typed = find_tokens(own_text(email)) if find_tokens(email.full_text) else []
    tokens = in_subject + [t for t in typed if t not in in_subject]
    answered = state.forward_by(message_id=email.in_reply_to) if email.in_reply_to else None
    if not tokens:
        return Claim(answered, False) if answered is not None else None
    token = tokens[0]
    forward = state.forward_by(token=token.lower())
    if forward is None or not check_token(key, forward.forward_id, token):
        return Claim(None, bool(in_subject), f"unknown or altered token {token!r}")
    if answered is not None and answered.message != forward.message:
        return Claim(None, bool(in_subject), "the token names another message than the reply")
    return Claim(forward, bool(in_subject))


def command_of(email: Email, claim: Claim, settings: Settings) -> Command:
    """The subject after the token when there is one, else the reply's first own line."""
    if claim.token_in_subject:
        words = subject_command(email.subject)
        if words:
            return parse_command(words, settings.departments)
    return parse_command(first_command_line(own_text(email)), settings.departments)


def own_text(email: Email) -> str:
    """What the writer typed: no quoted text, no signature (``""`` for a bare quote)."""
    return strip_quoted(email.full_text)


# --- the handler ------------------------------------------------------------------------------


class CorrectionHandler:
    """Claims corrections before classification; see the module docstring for the order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._key: bytes | None = None

    @property
    def key(self) -> bytes:
        if self._key is None:
            self._key = token_key(self.settings)
        return self._key

    def __call__(self, context: Context, incoming: Incoming) -> Outcome | None:
        email = incoming.email
        screened = screen(email, self.settings)
        if screened is not None and screened.kind == "ignore":
            return None  # an auto-reply or our own mail: the router ignores it
        claim = find_claim(email, context.state, self.key)
        if claim is None:
            return None
        corr = self.settings.corrections
        staff = is_staff(email.sender, corr.staff_domains, corr.staff_addresses)
        if claim.forward is None:
            if not staff:
                return None  # customer mail that merely contains "[MR-": classified as usual
            return _ignored(email, claim.problem)
        if not staff:
            return _ignored(email, f"sender {email.sender or '(none)'} is not staff")
        if corr.trusted_authserv_id:
            ok, why = authenticated(
                email.header_all("authentication-results"),
                corr.trusted_authserv_id,
                email.sender_domain,
            )
            if not ok:
                return _ignored(email, f"not authenticated: {why}")
        if claim.problem:
            return _ignored(email, claim.problem)
        command = command_of(email, claim, self.settings)
        if context.dry_run:
            return Outcome(MessageState.IGNORED, None, f"correction: {command.kind}", "correction")
        return Applier(context, email, claim.forward).apply(command)


def _ignored(email: Email, why: str) -> Outcome:
    event(log, "correction_refused", logging.WARNING, sender=email.sender, reason=why,
          message_id=email.message_id)  # fmt: skip
    return Outcome(MessageState.IGNORED, "triage", f"correction refused: {why}", "correction")


# --- applying ---------------------------------------------------------------------------------


class Applier:
    """Applies one accepted correction mail to the message its forward carried."""

    def __init__(self, context: Context, email: Email, forward: ForwardRecord) -> None:
        self.context = context
        self.settings = context.settings
        self.state = context.state
        self.email = email
        self.forward = forward
        self.record = context.state.message(forward.message)
        self.mail_id = email.message_id or email.content_hash

    def apply(self, command: Command) -> Outcome:
        done = self._row()
        if done is not None and done["status"] == "applied":
            return self._outcome(f"correction already applied ({done['new_label']})")
        current = current_label(self.state, self.record)
        if command.kind == "unknown":
            self._help()
            return self._outcome(f"unreadable correction {command.text[:60]!r}")
        new_label = current if command.kind == "confirm" else command.department
        if new_label is None:
            self._help()
            return self._outcome("nothing to confirm: the message had no department")
        if done is None and self._over_cap():
            return _ignored(
                self.email, f"daily cap of {self.settings.corrections.daily_cap} reached"
            )
        if (
            done is None
            and last_applied(self.state, self.record.id) == new_label
            and command.kind != "confirm"
        ):
            return self._outcome(f"correction to {new_label} already applied")

        raw = self.context.mailbox.fetch_filed(
            self.record.folder or "routed", self.record.message_id, self.record.content_hash
        )
        if raw is None:
            event(log, "correction_original_missing", logging.WARNING, id=self.record.id)
            self._reply(
                "mailrouter : l'original est introuvable dans la boîte, rien n'a été changé. / "
                "The original could not be found in the mailbox; nothing was changed."
            )
            return self._outcome("original not found in the mailbox")
        row = done["id"] if done is not None else self._start(command, current, new_label)
        original = parse_email(raw, max_bytes=self.settings.mailbox.max_message_bytes)

        resend = command.kind == "route" and new_label != current
        if resend and not self._already_sent(new_label, row):
            dep = self.settings.department(new_label)
            to = dep.address if dep.action == "forward" and dep.address else None
            destination = to or self.settings.smtp.triage_address
            try:
                self.context.pipeline.send_forward(
                    self.record, raw, destination=destination, department=new_label,
                    reason=f"corrigé par / corrected by {self.email.sender}",
                )  # fmt: skip
            except SmtpError as exc:
                event(log, "correction_deferred", logging.WARNING, id=row, error=str(exc))
                raise  # the pipeline keeps the message and tries again next round
        source = "correction" if new_label != current else "confirmation"
        read = ClassifyInput.from_email(original)
        example = Dataset.from_settings(self.settings).upsert_correction(
            text=read.text,
            label=new_label,
            subject=read.subject,
            sender_domain=read.sender_domain,
            message_id=original.message_id or self.record.content_hash,
            corrected_from=current if source == "correction" else None,
            by=self.email.sender,
            source=source,
        )
        self.state.execute(
            "UPDATE corrections SET status = 'applied', example_id = ? WHERE id = ?",
            (example.id, row),
        )
        event(log, "correction_applied", id=self.record.id, by=self.email.sender,
              old=current, new=new_label, kind=command.kind, example=example.id)  # fmt: skip
        subject = self.record.subject[:80] or "(sans objet)"
        if source == "correction":
            line = (
                f"mailrouter : « {subject} » renvoyé à {new_label} (était {current or 'triage'}). "
                f"/ Re-forwarded to {new_label} (was {current or 'triage'})."
            )
            if command.kind == "spam":
                line = (
                    f"mailrouter : « {subject} » noté comme spam. / Recorded as spam (was "
                    f"{current or 'triage'})."
                )
        else:
            line = f"mailrouter : merci, « {subject} » confirmé {new_label}. / Confirmed, thanks."
        self._reply(line)
        return self._outcome(f"correction by {self.email.sender}: {current} -> {new_label}")

    # --- helpers ------------------------------------------------------------------------------

    def _outcome(self, reason: str) -> Outcome:
        return Outcome(MessageState.FILED, "routed", reason, "correction")

    def _row(self) -> dict[str, object] | None:
        rows = self.state.query(
            "SELECT * FROM corrections WHERE mail_id = ? ORDER BY id DESC LIMIT 1", (self.mail_id,)
        )
        return dict(rows[0]) if rows else None

    def _start(self, command: Command, current: str | None, new_label: str) -> int:
        return self.state.execute(
            "INSERT INTO corrections (forward_id, message, by, command, old_label, new_label, "
            "status, created, mail_id) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
            (self.forward.forward_id, self.record.id, self.email.sender, command.kind, current,
             new_label, now_iso(), self.mail_id),
        )  # fmt: skip

    def _already_sent(self, department: str, row: int) -> bool:
        """A correction forward to ``department`` left after this correction was recorded."""
        created = self.state.query("SELECT created FROM corrections WHERE id = ?", (row,))
        since = created[0]["created"] if created else ""
        return any(
            f.kind == "correction" and f.department == department and f.status == "sent"
            and f.created >= since
            for f in self.state.forwards_of(self.record.id)
        )  # fmt: skip

    def _over_cap(self) -> bool:
        midnight = datetime.now(UTC).strftime("%Y-%m-%dT00:00:00")
        rows = self.state.query(
            "SELECT COUNT(*) AS n FROM corrections WHERE by = ? AND status = 'applied' "
            "AND created >= ?",
            (self.email.sender, midnight),
        )
        return int(rows[0]["n"]) >= self.settings.corrections.daily_cap

    def _help(self) -> None:
        """One short help reply per sender per ``help_interval_seconds``."""
        key = HELP_KEY + self.email.sender
        last = float(self.state.get(key, "0") or 0)
        if time.time() - last < self.settings.corrections.help_interval_seconds:
            event(log, "correction_help_skipped", sender=self.email.sender)
            return
        names = ", ".join(d.name for d in self.settings.departments)
        self._reply(
            "mailrouter : je n'ai pas compris. Répondez avec le nom d'un service "
            f"({names}), « spam » ou « ok ».\n"
            f"I did not understand. Reply with a department ({names}), 'spam' or 'ok'."
        )
        self.state.set(key, str(time.time()))

    def _reply(self, text: str) -> None:
        data = compose_reply(self.settings, self.email, text)
        try:
            self.context.pipeline.send_plain(data, self.email.sender)
        except SmtpError as exc:  # the correction stands even if the answer is lost
            event(log, "correction_reply_failed", logging.WARNING, error=str(exc))


def last_applied(state: State, message: int) -> str | None:
    """The label of the latest applied correction of a message, if any."""
    rows = state.query(
        "SELECT new_label FROM corrections WHERE message = ? AND status = 'applied' "
        "ORDER BY id DESC LIMIT 1",
        (message,),
    )
    return rows[0]["new_label"] if rows else None


def current_label(state: State, record: MessageRecord) -> str | None:
    """The department a message is with now: its latest correction, else the route decided."""
    corrected = last_applied(state, record.id)
    if corrected is not None:
        return corrected
    if record.route == "spam":
        return record.label
    return record.department if record.route == "department" else None


def compose_reply(settings: Settings, to: Email, text: str) -> bytes:
    """A short automatic answer to a staff mail, marked so it is never routed if it returns."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = settings.smtp.from_address
    msg["To"] = to.sender
    subject = " ".join(to.subject.split())[:150]
    msg["Subject"] = subject if subject.lower().startswith("re:") else f"Re: {subject}"
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain=address_domain(settings.smtp.from_address) or None)
    if to.message_id:
        msg["In-Reply-To"] = to.message_id
        msg["References"] = to.message_id
    msg["Auto-Submitted"] = "auto-replied"
    msg["X-MailRouter-Notice"] = "reply"
    msg.set_content(text + "\n", charset="utf-8", cte="quoted-printable")
    return msg.as_bytes(policy=SMTP)


# --- the daily spam digest --------------------------------------------------------------------


def send_spam_digest(settings: Settings, *, sender: SmtpSender | None = None) -> int:
    """Mail the triage address the list of mail filed as spam since the last digest.

    Each entry gets a token of its own (a ``digest`` forward row), so "not spam → department"
    links are corrections like any other. Returns how many messages were listed.
    """
    state = State(settings.state_path)
    try:
        since = state.get(DIGEST_KEY) or ""
        rows = state.query(
            "SELECT id FROM messages WHERE state = 'spam' AND duplicate_of IS NULL "
            "AND updated > ? ORDER BY id",
            (since,),
        )
        stamp = now_iso()
        if not rows:
            state.set(DIGEST_KEY, stamp)
            return 0
        maker = token_maker(settings)
        domain = address_domain(settings.smtp.from_address)
        forwards = []
        items = []
        for row in rows:
            record = state.message(row["id"])
            spec = NewForward("digest", settings.smtp.triage_address, None, domain, maker)
            forward = state.add_forward(record.id, spec, state=None)
            forwards.append(forward)
            items.append(DigestItem(forward.token, record.sender, record.subject,
                                    _parse_iso(record.created)))  # fmt: skip
        subject, text, html = spam_digest(settings, items)
        msg = EmailMessage(policy=SMTP)
        msg["From"] = settings.smtp.from_address
        msg["To"] = settings.smtp.triage_address
        msg["Subject"] = subject
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = make_msgid(domain=domain or None)
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-MailRouter-Notice"] = "spam-digest"
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


# --- the corrections command ------------------------------------------------------------------


@dataclass(frozen=True)
class CorrectionRow:
    id: int
    created: str
    by: str
    command: str
    old_label: str | None
    new_label: str | None
    status: str
    subject: str
    example_id: str | None


def list_corrections(state: State, limit: int = 50) -> list[CorrectionRow]:
    rows = state.query(
        "SELECT c.id, c.created, c.by, c.command, c.old_label, c.new_label, c.status, "
        "c.example_id, m.subject FROM corrections c LEFT JOIN messages m ON m.id = c.message "
        "ORDER BY c.id DESC LIMIT ?",
        (limit,),
    )
    return [CorrectionRow(**{k: r[k] for k in r.keys()}) for r in rows]  # noqa: SIM118


def revert_correction(settings: Settings, state: State, correction_id: int) -> str:
    """Remove the example a correction recorded; returns what was done, for the user."""
    rows = state.query("SELECT * FROM corrections WHERE id = ?", (correction_id,))
    if not rows:
        return f"no correction #{correction_id}"
    row = rows[0]
    if row["status"] == "reverted":
        return f"correction #{correction_id} was already reverted"
    removed = bool(row["example_id"]) and Dataset.from_settings(settings).remove(row["example_id"])
    state.execute("UPDATE corrections SET status = 'reverted' WHERE id = ?", (correction_id,))
    event(log, "correction_reverted", id=correction_id, example=row["example_id"])
    if removed:
        return f"reverted correction #{correction_id}: example {row['example_id']} removed"
    return f"reverted correction #{correction_id}: it had no example left in the dataset"
