"""What flows through a round: the mail read, what handlers decide, what a round reports.

These types are shared by the round (:mod:`.round`), its intake (:mod:`.intake`), its outbox
(:mod:`.outbox`) and the handlers other packages plug in (corrections, bounces).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..config import Settings
from ..mail.imap import Mailbox
from ..message import Email
from ..state import ForwardRecord, MessageRecord, MessageState, State
from .compose import ForwardFacts, Notice

#: For each route: the final state once filed, and the filing target.
ROUTE_END = {
    "department": (MessageState.FILED, "routed"),
    "triage": (MessageState.TRIAGED, "triage"),
    "spam": (MessageState.SPAM, "spam"),
    "ignore": (MessageState.IGNORED, "triage"),
}
FORWARDING_ROUTES = ("department", "triage")


class HandlerFailed(Exception):
    """A pre-classification handler raised: the message is left in place for a later round."""


@dataclass(frozen=True)
class Incoming:
    """A message read from the watched folder."""

    uid: int
    raw: bytes
    email: Email
    size: int
    headers_only: bool = False  # too large: only the header was fetched


@dataclass(frozen=True)
class Outcome:
    """What a handler decided for a message it claimed.

    ``state`` is the final state to record (``ignored``, ``filed``…); ``target`` the folder the
    original goes to (``routed``, ``triage``, ``spam``) or ``None`` to leave it in place.
    """

    state: MessageState
    target: str | None
    reason: str
    route: str = "handled"


class Outgoing(Protocol):
    """What a handler may send: a forward of a message again, or a message it composed.

    Both commit before sending and raise :class:`~mailrouter.errors.SmtpError` (after the
    retries): a temporary one leaves the handled mail in the folder for the next round.
    """

    def send_forward(
        self,
        record: MessageRecord,
        raw: bytes,
        *,
        destination: str,
        department: str | None,
        kind: str = "correction",
        reason: str = "",
    ) -> ForwardRecord: ...

    def send_plain(self, data: bytes, recipient: str) -> None: ...


@dataclass
class Context:
    """What a handler may use. With ``dry_run`` nothing may be sent, moved or written."""

    settings: Settings
    state: State
    mailbox: Mailbox
    outbox: Outgoing
    dry_run: bool


Handler = Callable[[Context, Incoming], "Outcome | None"]
NoticeMaker = Callable[["Settings", "ForwardFacts"], "Notice | None"]
#: Per target folder: (uid, message record id, final state) of the messages to file there.
Filing = dict[str | None, list[tuple[int, int, MessageState]]]


@dataclass(frozen=True)
class Decision:
    """One line of a round's report."""

    uid: int
    message_id: str
    sender: str
    subject: str
    route: str
    department: str | None
    address: str | None
    confidence: float | None
    model: str | None
    reason: str


@dataclass
class RoundReport:
    """What a round did (in dry-run: what it would do)."""

    decisions: list[Decision] = field(default_factory=list)
    seen: int = 0
    forwarded: int = 0
    filed: int = 0
    deferred: int = 0
    failed: int = 0
    duplicates: int = 0
    waiting: int = 0  # left for a later round (classifier down, SMTP down, a copy in flight)
    seconds: float = 0.0


#: What the sending thread hands back for a batch: what to file, and its counts.
Delivered = tuple[Filing, RoundReport]
