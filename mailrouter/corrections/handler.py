"""Corrections by reply: staff fix a route, mailrouter re-forwards and learns (DESIGN §5).

A mail to the router is a correction when it comes from staff and carries a valid ``[MR-<token>]``
(subject or own text) or answers a forward (``In-Reply-To``/``References``). Mail from anyone
else is customer mail, whatever token or reference it quotes: it is classified and forwarded as
usual. A staff correction is claimed before classification, then, in order:

1. the command: the subject after the token, else the first line of the reply's own text;
2. the caps: per sender, per domain and in total per day (a guard against poisoning the data);
3. trust: when the topmost ``Authentication-Results`` of the trusted server show the mail
   authentic (:mod:`.authentication`) it applies at once; otherwise the claimed author is
   asked to confirm (:mod:`mailrouter.confirmations`) and it applies when they answer, or, with
   ``confirm_unauthenticated = false``, it is refused. ``From:`` alone never applies anything;
4. applying: the original (fetched back from the folder it was filed in) is forwarded again to
   the right department through :meth:`Pipeline.send_forward` (a new forward id, stored before
   sending), the example is recorded in ``examples.jsonl`` (or held for review when it
   contradicts an existing example) and the author gets a one-line answer.

Each correction mail is recorded by the hash of its bytes before anything is sent, so a crash
between sending and the commit of the outcome neither forwards twice nor asks twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from ..automated import automated_reason
from ..config import Settings, token_key
from ..logs import event
from ..mail.parse import parse_addresses, strip_quoted
from ..message import Email
from ..pipeline.types import Context, Incoming, Outcome
from ..router import our_mark
from ..state import ConfirmationRecord, CorrectionRecord, ForwardRecord, MessageState, State
from .apply import Applier, current_label, filed, help_reply, reply
from .authentication import Verdict, verdict
from .confirmations import compose_request, declines, find_refs, make_ref, ref_hash, request_text
from .replies import (
    Command,
    find_tokens,
    first_command_line,
    is_staff,
    parse_command,
    subject_command,
)
from .tokens import check_token

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    """What a mail to the router refers to. ``forward`` is ``None`` when its token is invalid."""

    forward: ForwardRecord | None
    token_in_subject: bool
    problem: str = ""


def answered_forward(email: Email, state: State) -> ForwardRecord | None:
    """The forward that ``In-Reply-To`` (else the newest of ``References``) names, if any."""
    for message_id in (email.in_reply_to, *reversed(email.references)):
        if message_id:
            forward = state.forward_by(message_id=message_id)
            if forward is not None:
                return forward
    return None


def find_claim(email: Email, state: State, key: bytes) -> Claim | None:
    """The forward a mail answers, or ``None`` when it is not a correction at all.

    Tokens count in the subject and in the reply's own text, not in quoted text. A token must be
    the one of the forward the mail answers when it answers one: a token copied from another
    forward proves nothing about this one.
    """
    in_subject = find_tokens(email.subject)
    # Tokens typed by the writer, not quoted: stripping quotes is the costly part, and most
    # mail has no token anywhere.
    typed = find_tokens(own_text(email)) if find_tokens(email.full_text) else []
    tokens = in_subject + [t for t in typed if t not in in_subject]
    answered = answered_forward(email, state)
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


def addressed_to_router(email: Email, settings: Settings) -> bool:
    """Whether the router's address (or the mailbox's login) is among ``To:`` and ``Cc:``."""
    ours = {settings.smtp.from_address.strip().lower(), settings.mailbox.username.strip().lower()}
    copied = [address for _, address in parse_addresses(email.header_all("cc"))]
    return bool(ours & {*email.to, *copied})


def over_caps(state: State, settings: Settings, sender: str) -> str | None:
    """Which daily cap a new correction from ``sender`` would exceed, if any."""
    corr = settings.corrections
    since = datetime.now(UTC).strftime("%Y-%m-%dT00:00:00")
    domain = sender.rpartition("@")[2]
    if state.corrections_count(since, by=sender) >= corr.daily_cap:
        return f"daily cap of {corr.daily_cap} corrections for {sender} reached"
    if state.corrections_count(since, domain=domain) >= corr.daily_domain_cap:
        return f"daily cap of {corr.daily_domain_cap} corrections for @{domain} reached"
    if state.corrections_count(since) >= corr.daily_total_cap:
        return f"daily cap of {corr.daily_total_cap} corrections in total reached"
    return None


# --- the handler ------------------------------------------------------------------------------


class CorrectionHandler:
    """Claims staff corrections and confirmation answers before classification."""

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
        if our_mark(email) or automated_reason(email):
            return None  # our own mail, an auto-reply or a bounce: it corrects nothing
        corr = self.settings.corrections
        # The triage person routes what the model could not: staff, wherever their address is.
        staff = [*corr.staff_addresses, self.settings.smtp.triage_address]
        if not is_staff(email.sender, corr.staff_domains, staff):
            return None  # customer mail, even quoting a token: classified as usual
        for ref in confirmation_refs(email):
            confirmation = context.state.confirmation_by_ref(ref_hash(ref))
            if confirmation is not None:
                if context.dry_run:
                    return _dry("confirmation answer")
                return Corrector(context, email, self.key).answer(confirmation)
        claim = find_claim(email, context.state, self.key)
        if claim is None:
            return None
        if claim.forward is None:
            return _refused(email, claim.problem)
        command = command_of(email, claim, self.settings)
        if context.dry_run:
            return _dry(f"correction: {command.kind}")
        return Corrector(context, email, self.key).correct(claim.forward, command)


def confirmation_refs(email: Email) -> list[str]:
    """The ``[MRC-…]`` references the writer typed (subject or own text, not quoted text)."""
    if "[MRC-" not in email.subject and "[MRC-" not in email.full_text:
        return []  # most mail: no quote stripping
    return find_refs(email.subject, own_text(email))


def _dry(reason: str) -> Outcome:
    return Outcome(MessageState.IGNORED, None, reason, "correction")


def _refused(email: Email, why: str) -> Outcome:
    event(log, "correction_refused", logging.WARNING, sender=email.sender, reason=why,
          message_id=email.message_id)  # fmt: skip
    return Outcome(MessageState.IGNORED, "triage", f"correction refused: {why}", "correction")


class Corrector:
    """Handles one staff mail: a correction to record, or the answer to a confirmation."""

    def __init__(self, context: Context, email: Email, key: bytes) -> None:
        self.context = context
        self.settings = context.settings
        self.state = context.state
        self.email = email
        self.key = key

    def correct(self, forward: ForwardRecord, command: Command) -> Outcome:
        """Record a correction, then apply it, ask for confirmation or refuse it."""
        row = self.state.correction_by_mail(self.email.content_hash)
        if row is None:
            decided = self._record(forward, command)
            if isinstance(decided, Outcome):
                return decided
            row = decided
        if row.status == "pending":
            return Applier(self.context, row, self.email).apply()
        if row.status == "awaiting":
            return self._ask(row)
        return filed(f"correction already handled ({row.status})")

    def _record(self, forward: ForwardRecord, command: Command) -> CorrectionRecord | Outcome:
        sender = self.email.sender
        over = over_caps(self.state, self.settings, sender)
        if over is not None:
            self._add(forward, command, None, status="refused", reason=over)
            return _refused(self.email, over)
        record = self.state.message(forward.message)
        current = current_label(self.state, record)
        if command.kind == "unknown":
            self._add(forward, command, current, status="unreadable", reason=command.text[:200])
            help_reply(self.context, self.email)
            return filed(f"unreadable correction {command.text[:60]!r}")
        new_label = current if command.kind == "confirm" else command.department
        if new_label is None:
            help_reply(self.context, self.email)
            return filed("nothing to confirm: the message had no department")
        corrected = self.state.latest_correction_of([record.id])
        if command.kind != "confirm" and corrected == new_label:
            return filed(f"correction to {new_label} already applied")
        auth = verdict(
            self.email.auth_results,
            self.settings.corrections.trusted_authserv_id,
            self.email.sender_domain,
        )
        if auth.ok and not addressed_to_router(self.email, self.settings):
            # A staff answer to a customer is signed too: replayed to contact@ by that
            # customer, it would pass. A correction is written to the router.
            auth = Verdict(False, "signed, but not addressed to the router (a replayed mail?)")
        if auth.ok:
            return self._add(forward, command, current, new_label, "pending", auth.reason)
        if not self.settings.corrections.confirm_unauthenticated:
            why = f"not authenticated ({auth.reason}) and confirm_unauthenticated is off"
            self._add(forward, command, current, new_label, "refused", auth.reason, reason=why)
            return _refused(self.email, why)
        return self._add(forward, command, current, new_label, "awaiting", auth.reason)

    def _add(
        self,
        forward: ForwardRecord,
        command: Command,
        current: str | None,
        new_label: str | None = None,
        status: str = "pending",
        auth: str | None = None,
        *,
        reason: str | None = None,
    ) -> CorrectionRecord:
        return self.state.add_correction(
            forward_id=forward.forward_id, message=forward.message, by=self.email.sender,
            domain=self.email.sender_domain, command=command.kind, old_label=current,
            new_label=new_label, status=status, mail_id=self.email.content_hash, auth=auth,
            reason=reason,
        )  # fmt: skip

    def _ask(self, row: CorrectionRecord) -> Outcome:
        """Send the claimed author the confirmation request (again after a crash, same ref)."""
        ref = make_ref(self.key, row.id, row.mail_id or "")
        days = self.settings.corrections.confirm_days
        deadline = datetime.now(UTC) + timedelta(days=days)
        confirmation = self.state.add_confirmation(
            row.id, ref_hash(ref), row.by, deadline.isoformat(timespec="seconds")
        )
        # Sent again after a crash, the request states the deadline first recorded.
        expires = datetime.fromisoformat(confirmation.expires)
        if confirmation.status == "new":
            record = self.state.message(row.message or 0)
            text = request_text(
                subject=record.subject,
                sender=record.sender,
                old=row.old_label,
                new=row.new_label or "?",
                kind=row.command,
                expires=expires,
            )
            data = compose_request(
                self.settings, to=row.by, ref=ref, text=text, subject=record.subject
            )
            self.context.outbox.send_plain(data, row.by)  # a temporary error: retried later
            self.state.update_confirmation(confirmation.id, "waiting")
            event(log, "correction_confirmation_requested", id=row.id, to=row.by, auth=row.auth)
        return filed(f"correction by {row.by} awaiting confirmation ({row.auth})")

    def answer(self, confirmation: ConfirmationRecord) -> Outcome:
        """A reply carrying a confirmation reference: apply, cancel, or say it expired."""
        row = self.state.correction(confirmation.correction)
        if row is None or confirmation.status not in ("new", "waiting"):
            return filed(f"confirmation already {confirmation.status}")
        if self.email.sender != confirmation.address:
            return _refused(
                self.email,
                f"confirmation answered from {self.email.sender}, not {confirmation.address}",
            )
        if datetime.fromisoformat(confirmation.expires) < datetime.now(UTC):
            return self._close(
                confirmation,
                row,
                "expired",
                "mailrouter : cette demande a expiré, rien n'a été changé. / "
                "This request has expired; nothing was changed.",
            )
        if declines(first_command_line(own_text(self.email))):
            return self._close(
                confirmation,
                row,
                "declined",
                "mailrouter : correction annulée, rien n'a été changé. / "
                "Correction cancelled; nothing was changed.",
            )
        if row.status == "awaiting":
            self.state.update_correction(row.id, status="pending", auth=f"confirmed by {row.by}")
            row = self.state.correction(row.id) or row
        outcome = Applier(self.context, row, self.email).apply()
        self.state.update_confirmation(confirmation.id, "confirmed")
        return outcome

    def _close(
        self, confirmation: ConfirmationRecord, row: CorrectionRecord, status: str, line: str
    ) -> Outcome:
        self.state.update_confirmation(confirmation.id, status)
        self.state.update_correction(row.id, status=status)
        event(log, f"correction_{status}", id=row.id, by=row.by)
        reply(self.context, self.email, line)
        return filed(f"correction {status}")
