"""One round of routing: every new message of the watched folder, exactly once.

For each message: parse → pre-classification handlers → screen/classify → route → record →
forward → mark forwarded → file → final state (DESIGN §4). Each arrow that changes something
outside the process is preceded by a commit, so :meth:`Pipeline.run_once` can be killed at any
instant and the next round resumes where the state says. Work goes by batches of
``mailbox.batch_size``: a batch's routes and forward rows are committed together, then a sending
thread forwards them (committing each as sent) while the main thread reads and classifies the
next batch; a batch is filed once its sends are over.

* ``classified``: the route is on disk; a forward is created (or, for spam and ignored mail, the
  message is filed).
* ``forwarding``: the forward's Message-ID is on disk; the same message is (re)sent.
* ``forwarded``: sent; the original is filed.

The identity of a message is (mailbox, UIDVALIDITY, UID); its content hash and Message-ID find
an earlier record of the same mail, so a recreated mailbox (new UIDVALIDITY) or a second copy
is filed like the first, never forwarded again.

**Seams for other parts**

* ``handlers``: callables ``(Context, Incoming) -> Outcome | None`` tried in order before
  classification; the first that returns an :class:`Outcome` claims the message (staff
  corrections). A handler that raises a temporary :class:`SmtpError` (``permanent=False``)
  leaves the message unrecorded in the folder, tried again next round; so does any other
  exception (it is logged and shown by ``mailrouter status``), since filing the mail without a
  forward could swallow it. A handler may run twice for the same message after a crash
  (between its action and the commit of its outcome): make it idempotent, keyed on what the
  sender cannot choose, e.g. ``incoming.email.content_hash``.
  With ``context.dry_run`` it must change nothing. The default list comes from
  ``mailrouter.corrections.pipeline_handlers(settings)`` when that module defines it.
* ``notice``: ``(Settings, ForwardFacts) -> Notice | None``, the block added to every forward
  (correction links); default ``mailrouter.corrections.forward_notice`` when defined.
* :meth:`Pipeline.send_forward` forwards a message again (a correction) with a new forward
  record, and :meth:`Pipeline.send_plain` sends a message the caller composed (a confirmation).
* A long-running loop calls :meth:`Pipeline.run_once` and :meth:`Pipeline.wait_for_changes`
  and finally :meth:`Pipeline.close`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .classify import ClassifyInput, Prediction, make_classifier
from .errors import ClassifierError, ConfigError, MailboxError, SmtpError
from .forward import (
    ForwardFacts,
    Notice,
    SmtpSender,
    address_domain,
    backoff_delay,
    compose_forward,
    send_with_retry,
)
from .logs import event
from .mailbox import Mailbox, UidValidityChanged
from .message import Email, parse_email
from .router import Route, decide, limit_rate, screen, triage
from .state import (
    ForwardRecord,
    MessageRecord,
    MessageState,
    NewForward,
    NewMessage,
    State,
    StateError,
)
from .status import record_error

if TYPE_CHECKING:
    from .classify import Classifier
    from .config import Settings

log = logging.getLogger(__name__)

#: For each route: the final state once filed, and the filing target.
ROUTE_END = {
    "department": (MessageState.FILED, "routed"),
    "triage": (MessageState.TRIAGED, "triage"),
    "spam": (MessageState.SPAM, "spam"),
    "ignore": (MessageState.IGNORED, "triage"),
}
FORWARDING_ROUTES = ("department", "triage")
#: A sent forward ends the message's retries: what is written, and what its record then holds.
RETRY_CLEARED: dict[str, Any] = {"attempts": 0, "next_attempt_at": None, "last_error": None}
#: At most this many bytes of mail in a batch: two batches are in memory at once (one being
#: sent, the next being read), whatever the size of the mail in the folder.
BATCH_BYTES = 64 * 1024 * 1024
#: What a message too large to read whole weighs in a batch (only its header is fetched).
HEADER_BYTES = 64 * 1024
#: UIDs per size lookup: one FETCH command line stays well under servers' 64 KB limits.
SIZES_PER_FETCH = 1000


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


@dataclass
class Context:
    """What a handler may use. With ``dry_run`` nothing may be sent, moved or written."""

    settings: Settings
    state: State
    mailbox: Mailbox
    pipeline: Pipeline
    dry_run: bool


Handler = Callable[[Context, Incoming], "Outcome | None"]
NoticeMaker = Callable[["Settings", ForwardFacts], "Notice | None"]
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


def _optional(module: str, name: str) -> Any:
    """An attribute of an optional sibling module, or ``None`` when either is absent."""
    full = f"{__package__}.{module}"
    if importlib.util.find_spec(full) is None:
        return None
    return getattr(importlib.import_module(full), name, None)


def default_handlers(settings: Settings) -> list[Handler]:
    factory = _optional("corrections", "pipeline_handlers")
    return list(factory(settings)) if factory is not None else []


def default_notice() -> NoticeMaker | None:
    return _optional("corrections", "forward_notice")


class Pipeline:
    """The router's loop body. Build one per process; it owns its IMAP and SMTP connections."""

    def __init__(
        self,
        settings: Settings,
        *,
        dry_run: bool = False,
        handlers: Sequence[Handler] | None = None,
        notice: NoticeMaker | None = None,
        mailbox: Mailbox | None = None,
        sender: SmtpSender | None = None,
        state: State | None = None,
        classifier: Classifier | None = None,
    ) -> None:
        self.settings = settings
        self.dry_run = dry_run
        self.state = state or State(settings.state_path)
        self.mailbox = mailbox or Mailbox.from_settings(settings)
        self.sender = (
            sender if sender is not None or dry_run else SmtpSender.from_settings(settings)
        )
        self.handlers = list(handlers) if handlers is not None else default_handlers(settings)
        self.notice = notice if notice is not None else default_notice()
        self.domain = address_domain(settings.smtp.from_address)
        self._classifier = classifier
        self._token: Callable[[str], str] | None = None
        self._classifier_down = False
        self._smtp_down = False
        self._first_round = True
        self._predictions: dict[int, Prediction] = {}
        self._batch_routed: Counter[str] = Counter()  # forwards decided per sender, unrecorded
        self._sending = threading.Lock()  # one SMTP conversation at a time on self.sender

    # --- the loop API -----------------------------------------------------------------------

    def wait_for_changes(self, timeout: float, stop_event: threading.Event | None = None) -> bool:
        return self.mailbox.wait_for_changes(timeout, stop_event)

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
        self.mailbox.close()
        self.state.close()

    def run_once(self, stop: threading.Event | None = None) -> RoundReport:
        """Process the folder once: resume unfinished messages, then the new ones.

        ``stop`` is checked between messages: once set, the round files what it finished and
        returns, leaving the rest untouched for the next round (a service stopping on SIGTERM
        finishes the message in hand, not the whole backlog).
        """
        started = time.monotonic()
        report = RoundReport()
        self._classifier_down = self._smtp_down = False
        try:
            uidvalidity = self.mailbox.connect()
            self._round(report, uidvalidity, stop or threading.Event())
        except UidValidityChanged as exc:
            event(log, "round_interrupted", logging.WARNING, reason=str(exc))
        finally:
            if self.sender is not None:
                self.sender.close()
            report.seconds = time.monotonic() - started
        if not self.dry_run:
            self.state.set("last_poll", str(time.time()))
        event(
            log,
            "round",
            seen=report.seen,
            forwarded=report.forwarded,
            filed=report.filed,
            deferred=report.deferred,
            failed=report.failed,
            duplicates=report.duplicates,
            waiting=report.waiting,
            seconds=round(report.seconds, 3),
            dry_run=self.dry_run,
        )
        return report

    # --- a round ----------------------------------------------------------------------------

    def _round(self, report: RoundReport, uidvalidity: int, stop: threading.Event) -> None:
        """Read, classify and record batch k+1 while batch k is being sent.

        Sending runs on one worker thread (SMTP is mostly waiting for the server's replies), in
        message order; each forward is committed as sent by the worker the moment the server
        accepts it. The main thread keeps IMAP to itself: it files batch k once its sends are
        over, then reads the next batch.
        """
        key = self.mailbox.key
        in_box = self.mailbox.pending_uids()
        first_uid = self._first_uid(uidvalidity)
        in_box = [u for u in in_box if u >= first_uid]
        known = self.state.known_uids(key, uidvalidity, min(in_box, default=0))
        # The first round of a process resumes everything unfinished, deferred or not.
        due = not self._first_round
        self._first_round = False
        resumable = {
            r.uid: r for r in self.state.pending(key, due=due) if r.uidvalidity == uidvalidity
        }
        todo = [u for u in in_box if u not in known or (u in resumable and not self.dry_run)]
        halt = threading.Event()  # set when the main thread fails: the worker stops early
        sending: Future[Delivered] | None = None
        with ThreadPoolExecutor(1, thread_name_prefix="mailrouter-send") as worker:
            try:
                for batch, sizes in self._batches(todo):
                    if stop.is_set():
                        break
                    ready = self._prepare_batch(batch, sizes, resumable, uidvalidity, report, stop)
                    queued = worker.submit(self._deliver, ready, uidvalidity, stop, halt)
                    if sending is not None:
                        self._file(sending.result(), report)
                    sending = queued
                if sending is not None:
                    self._file(sending.result(), report)
            finally:
                halt.set()
        if not self.dry_run and not stop.is_set():
            self._settle(set(in_box), uidvalidity)

    def _batches(self, todo: Sequence[int]) -> Iterator[tuple[list[int], dict[int, int]]]:
        """``todo`` cut in batches of at most ``mailbox.batch_size`` messages and
        :data:`BATCH_BYTES` bytes (a larger message goes alone), with the sizes of their
        messages. A message read only by its header counts for :data:`HEADER_BYTES`. UIDs that
        left the folder meanwhile are dropped."""
        count, limit = self.settings.mailbox.batch_size, self.settings.mailbox.max_message_bytes
        for start in range(0, len(todo), SIZES_PER_FETCH):
            sizes = self.mailbox.sizes(todo[start : start + SIZES_PER_FETCH])
            batch: list[int] = []
            total = 0
            for uid in todo[start : start + SIZES_PER_FETCH]:
                if uid not in sizes:
                    continue
                weight = sizes[uid] if sizes[uid] <= limit else HEADER_BYTES
                if batch and (len(batch) >= count or total + weight > BATCH_BYTES):
                    yield batch, sizes
                    batch, total = [], 0
                batch.append(uid)
                total += weight
            if batch:
                yield batch, sizes

    def _prepare_batch(
        self,
        uids: Sequence[int],
        sizes: dict[int, int],
        resumable: dict[int, MessageRecord],
        uidvalidity: int,
        report: RoundReport,
        stop: threading.Event,
    ) -> list[tuple[Incoming, MessageRecord]]:
        """Read, classify and record a batch: what is left to send and file, in order."""
        incomings = self._read(uids, sizes)
        self._predictions = self._classify_batch([i for i in incomings if i.uid not in resumable])
        self._batch_routed.clear()  # routes of this batch not yet in the database
        records: dict[int, MessageRecord] = {}
        plans: list[NewMessage] = []
        planned: set[str] = set()  # content hashes and fingerprints of this batch's new mail
        for incoming in incomings:
            if stop.is_set():
                break
            report.seen += 1
            try:
                looked = self._prepare(
                    incoming, resumable.get(incoming.uid), uidvalidity, report, planned
                )
            except (MailboxError, StateError, ConfigError):
                raise  # the mailbox, the database or the configuration: not this message
            except Exception as exc:  # a bug met by odd mail: file it for a human, go on
                looked = self._quarantine(incoming, uidvalidity, exc)
            if isinstance(looked, NewMessage):
                plans.append(looked)
                planned.update(k for k in (looked.content_hash, looked.fingerprint) if k)
            elif looked is not None:
                records[incoming.uid] = looked
        for record, _ in self.state.add_messages(plans):
            records[record.uid] = record
        return [(i, records[i.uid]) for i in incomings if i.uid in records]

    def _first_uid(self, uidvalidity: int) -> int:
        """With ``backlog = "none"``, the first UID to route: what arrived after the very first
        start (recorded then). Any other case: 1."""
        marker_key = f"start:{self.mailbox.key}"
        marker = self.state.get(marker_key)
        if marker is None:
            if self.settings.mailbox.backlog == "all" or self.state.query(
                "SELECT 1 FROM messages WHERE mailbox = ? LIMIT 1", (self.mailbox.key,)
            ):
                return 1
            if self.dry_run:
                return self.mailbox.uidnext
            marker = f"{uidvalidity}:{self.mailbox.uidnext}"
            self.state.set(marker_key, marker)
            event(log, "backlog_skipped", mailbox=self.mailbox.key, first_uid=self.mailbox.uidnext)
        started_in, _, first = marker.partition(":")
        return int(first) if int(started_in) == uidvalidity else 1

    def _read(self, uids: Sequence[int], sizes: dict[int, int]) -> list[Incoming]:
        limit = self.settings.mailbox.max_message_bytes
        large = [u for u in uids if sizes.get(u, 0) > limit]
        raws = self.mailbox.fetch([u for u in uids if u in sizes and u not in large])
        heads = self.mailbox.fetch(large, headers_only=True)
        out = []
        for uid in uids:
            raw = raws.get(uid, heads.get(uid))
            if raw is None:
                continue  # gone meanwhile
            out.append(Incoming(uid, raw, _parse(raw, limit), sizes[uid], uid in heads))
        return out

    def _prepare(
        self,
        incoming: Incoming,
        record: MessageRecord | None,
        uidvalidity: int,
        report: RoundReport,
        planned: set[str],
    ) -> MessageRecord | NewMessage | None:
        """A resumed message's record (with its forward created if it lacks one), what to
        record for a new message, or ``None`` when there is nothing to send or file now."""
        if record is None:
            return self._first_look(incoming, uidvalidity, report, planned)
        if record.state == MessageState.CLASSIFIED and record.route in FORWARDING_ROUTES:
            spec = self._first_forward(record.route, record.department, record.destination)
            self.state.add_forward(record.id, spec)
            record = self.state.message(record.id)
        return record

    def _deliver(
        self,
        ready: Sequence[tuple[Incoming, MessageRecord]],
        uidvalidity: int,
        stop: threading.Event,
        halt: threading.Event,
    ) -> Delivered:
        """(On the sending thread.) Send what each message has to send; what to file, and the
        counts. A message left unsent (stop, SMTP down) stays ``forwarding`` for a later round."""
        filing: Filing = {}
        part = RoundReport()
        for incoming, record in ready:
            if stop.is_set() or halt.is_set():
                break
            try:
                if record.state == MessageState.FORWARDING:
                    sent = self._forward_pending(record, incoming, part)
                    if sent is None:
                        continue
                    record = sent
            except (StateError, ConfigError):
                raise
            except Exception as exc:  # a bug met by odd mail: file it for a human, go on
                quarantined = self._quarantine(incoming, uidvalidity, exc)
                if quarantined is None:
                    continue
                record = quarantined
            if record.state in (MessageState.CLASSIFIED, MessageState.FORWARDED):
                final = MessageState(record.outcome or MessageState.FILED)
                filing.setdefault(record.folder, []).append((incoming.uid, record.id, final))
        return filing, part

    def _first_look(
        self, incoming: Incoming, uidvalidity: int, report: RoundReport, planned: set[str]
    ) -> MessageRecord | NewMessage | None:
        """Decide a message never seen in this mailbox generation: what to record for it.

        Routed mail is recorded by the caller, a batch at a time, each with its forward; a
        message a handler claimed is recorded at once, since the handler has already acted.
        """
        email, key = incoming.email, self.mailbox.key
        mail_fingerprint = fingerprint(incoming)
        if email.content_hash in planned or (mail_fingerprint and mail_fingerprint in planned):
            report.waiting += 1  # a copy of a message of this batch: next round files it
            return None
        identity = {
            "content_hash": email.content_hash,
            "fingerprint": mail_fingerprint,
            "message_id": email.message_id,
            "sender": email.sender,
            "subject": email.subject,
            "size": incoming.size,
        }
        copy = self.state.find_copy(key, email.content_hash, mail_fingerprint)
        if copy is not None:
            return self._copy_of(copy, incoming, uidvalidity, report, identity)
        try:
            outcome = self._handle(incoming)
        except SmtpError as exc:  # a temporary one: the handler could not send yet
            report.waiting += 1
            event(log, "handler_deferred", logging.WARNING, uid=incoming.uid, code=exc.code,
                  error=str(exc))  # fmt: skip
            return None
        except HandlerFailed as exc:  # the mail stays in the folder, tried again next round
            report.waiting += 1
            log.error("handler failed on uid %s: %s", incoming.uid, exc, exc_info=exc.__cause__)
            if not self.dry_run:
                record_error(self.state, "handler_failed", f"uid {incoming.uid}: {exc}")
            return None
        if outcome is not None:
            self._report(report, incoming, outcome.route, None, None, None, outcome.reason)
            if self.dry_run:
                return None
            state = MessageState.CLASSIFIED if outcome.target else outcome.state
            return self.state.add_message(
                key, uidvalidity, incoming.uid, state=state, route=outcome.route,
                reason=outcome.reason, outcome=str(outcome.state), folder=outcome.target,
                **identity,
            )  # fmt: skip
        decided = self._route(incoming)
        if decided is None:
            report.waiting += 1
            return None
        route, prediction = decided
        if incoming.headers_only and route.kind == "department":
            route = triage(self.settings, f"too large to forward ({incoming.size} bytes)")
        self._report(report, incoming, route.kind, route.department, route.address, prediction,
                     route.reason)  # fmt: skip
        if self.dry_run:
            return None
        forward = None
        if route.kind in FORWARDING_ROUTES:
            forward = self._first_forward(route.kind, route.department, route.address)
        return NewMessage(
            key,
            uidvalidity,
            incoming.uid,
            state=MessageState.CLASSIFIED,
            forward=forward,
            extra={
                "route": route.kind,
                "label": prediction.label if prediction else None,
                "department": route.department,
                "destination": route.address,
                "confidence": prediction.confidence if prediction else None,
                "model": prediction.model if prediction else None,
                "reason": route.reason,
                "outcome": str(ROUTE_END[route.kind][0]),
                "folder": ROUTE_END[route.kind][1],
            },
            **identity,
        )

    def _copy_of(
        self,
        copy: MessageRecord,
        incoming: Incoming,
        uidvalidity: int,
        report: RoundReport,
        identity: dict[str, Any],
    ) -> MessageRecord | NewMessage | None:
        """Another copy of mail already known: adopt it, file it like the first, or wait."""
        if not copy.final and copy.uidvalidity != uidvalidity:
            # The mailbox was recreated while this message was in flight: same mail, new UID.
            event(log, "message_adopted", id=copy.id, old_uid=copy.uid, uid=incoming.uid)
            if self.dry_run:
                return None
            return self.state.update(copy.id, uidvalidity=uidvalidity, uid=incoming.uid)
        if not copy.final:
            report.waiting += 1  # the first copy is still being processed
            return None
        report.duplicates += 1
        reason = f"copy of message {copy.id} (already {copy.state})"
        self._report(report, incoming, "duplicate", copy.department, None, None, reason)
        if self.dry_run:
            return None
        return NewMessage(
            self.mailbox.key, uidvalidity, incoming.uid, state=MessageState.CLASSIFIED, extra={
                "route": "duplicate", "reason": reason, "department": copy.department,
                "duplicate_of": copy.id, "outcome": str(MessageState.IGNORED),
                "folder": copy.folder,
            }, **identity,
        )  # fmt: skip

    def _handle(self, incoming: Incoming) -> Outcome | None:
        if not self.handlers:
            return None
        context = Context(self.settings, self.state, self.mailbox, self, self.dry_run)
        for handler in self.handlers:
            try:
                outcome = handler(context, incoming)
            except (MailboxError, StateError, ConfigError):
                raise  # the mailbox, the database or the configuration: not this message
            except Exception as exc:
                if isinstance(exc, SmtpError) and not exc.permanent:
                    raise  # nothing final: the message waits in the folder for a later round
                # Filing it anyway could swallow a correction or a customer's mail without a
                # forward: it stays where it is, and ``status`` shows why.
                raise HandlerFailed(f"{type(exc).__name__}: {exc}") from exc
            if outcome is not None:
                return outcome
        return None

    def _classifier_or_none(self) -> Classifier:
        if self._classifier is None:
            self._classifier = make_classifier(self.settings)
        return self._classifier

    def _classify_batch(self, incomings: Sequence[Incoming]) -> dict[int, Prediction]:
        """Predictions for the new messages of a batch that need one, in one call when the
        classifier has ``classify_many`` (classifying is pure, so a message later claimed by a
        handler or found to be a copy only wastes its share). Empty on any error: then each
        message is classified alone and its error handled as usual."""
        if self._classifier_down:
            return {}
        wanted = [i for i in incomings if screen(i.email, self.settings) is None]
        if len(wanted) < 2:
            return {}
        try:
            many = getattr(self._classifier_or_none(), "classify_many", None)
            if many is None:
                return {}
            predictions = many([ClassifyInput.from_email(i.email) for i in wanted])
        except Exception as exc:  # each message meets it again alone, and is handled then
            event(log, "batch_classify_failed", logging.WARNING, error=str(exc))
            return {}
        return {i.uid: p for i, p in zip(wanted, predictions, strict=True)}

    def _route(self, incoming: Incoming) -> tuple[Route, Prediction | None] | None:
        """The route, or ``None`` when the classifier is down and ``on_error = "wait"``; a
        forward over the sender's hourly limit (``limit_rate``) is filed instead."""
        decided = self._classified_route(incoming)
        limit = self.settings.mailbox.max_forwards_per_sender_per_hour
        if decided is None or not decided[0].forwards or limit == 0:
            return decided
        sender = incoming.email.sender
        recent = self.state.routed_from(sender, 3600) + self._batch_routed[sender]
        route = limit_rate(decided[0], sender, recent, self.settings)
        if route.forwards:
            self._batch_routed[sender] += 1
        else:
            event(log, "forward_rate_limited", logging.WARNING, uid=incoming.uid, sender=sender,
                  recent=recent, limit=limit)  # fmt: skip
        return route, decided[1]

    def _classified_route(self, incoming: Incoming) -> tuple[Route, Prediction | None] | None:
        email = incoming.email
        screened = screen(email, self.settings)
        if screened is not None:
            return screened, None
        prediction = self._predictions.pop(incoming.uid, None)
        if prediction is not None:
            return decide(prediction, email, self.settings), prediction
        if self._classifier_down:
            return None
        try:
            prediction = self._classifier_or_none().classify(ClassifyInput.from_email(email))
        except ClassifierError as exc:
            if self.settings.classifier.on_error == "triage":
                return decide(None, email, self.settings, error=str(exc)), None
            self._classifier_down = True
            event(log, "classifier_unavailable", logging.WARNING, error=str(exc))
            return None
        except Exception as exc:  # a backend bug: this message goes to a human
            log.exception("classifier failed on uid %s", incoming.uid)
            return decide(None, email, self.settings, error=f"{type(exc).__name__}: {exc}"), None
        return decide(prediction, email, self.settings), prediction

    def _report(
        self,
        report: RoundReport,
        incoming: Incoming,
        route: str,
        department: str | None,
        address: str | None,
        prediction: Prediction | None,
        reason: str,
    ) -> None:
        email = incoming.email
        decision = Decision(
            uid=incoming.uid,
            message_id=email.message_id,
            sender=email.sender,
            subject=email.subject,
            route=route,
            department=department,
            address=address,
            confidence=prediction.confidence if prediction else None,
            model=prediction.model if prediction else None,
            reason=reason,
        )
        report.decisions.append(decision)
        event(
            log,
            "decision",
            mailbox=self.mailbox.key,
            uid=incoming.uid,
            message_id=email.message_id,
            sender=email.sender,
            route=route,
            department=department,
            address=address,
            confidence=round(decision.confidence, 3) if decision.confidence is not None else None,
            model=decision.model,
            reason=reason,
            dry_run=self.dry_run,
        )

    # --- forwarding -------------------------------------------------------------------------

    def _token_of(self, forward_id: str) -> str:
        if self._token is None:
            from .tokens import token_maker

            self._token = token_maker(self.settings)
        return self._token(forward_id)

    def _first_forward(self, route: str, department: str | None, address: str | None) -> NewForward:
        """The forward of routed mail: to its department's address, or to triage."""
        to_department = route == "department"
        return self._spec(
            "route" if to_department else "triage",
            address or self.settings.smtp.triage_address,
            department if to_department else None,
        )

    def _spec(self, kind: str, destination: str, department: str | None) -> NewForward:
        return NewForward(kind, destination, department, self.domain, self._token_of)

    def _facts(self, record: MessageRecord, forward: ForwardRecord, reason: str) -> ForwardFacts:
        return ForwardFacts(
            forward_id=forward.forward_id,
            message_id=forward.message_id,
            token=forward.token,
            destination=forward.destination,
            department=forward.department,
            confidence=record.confidence,
            model=record.model,
            reason=reason,
        )

    def _forward_pending(
        self, record: MessageRecord, incoming: Incoming, report: RoundReport
    ) -> MessageRecord | None:
        """Send the message's open forward: its record once sending is over (sent or given
        up), ``None`` while it has to wait."""
        forward = self.state.open_forward(record.id)
        if forward is None:  # nothing left to send
            return self.state.update(record.id, MessageState.FORWARDED)
        if self._smtp_down or self.sender is None:
            report.waiting += 1
            return None
        reason = "" if forward.kind == "route" else (record.reason or "")
        if forward.kind == "failure":
            failed = [f for f in self.state.forwards_of(record.id) if f.status == "failed"]
            last = failed[-1] if failed else None
            reason = f"refused by {last.destination}: {last.last_error}" if last else reason
        data = compose_forward(
            incoming.raw,
            incoming.email,
            self._facts(record, forward, reason),
            self.settings,
            notice=self._notice(self._facts(record, forward, reason)),
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

    def _notice(self, facts: ForwardFacts) -> Notice | None:
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
                self._smtp_down = True  # the server, not this message: stop sending this round
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
                record.id, self._spec("failure", triage_address, None), state=None
            )
            return self._forward_pending(self.state.message(record.id), incoming, report)
        return self.state.update(record.id, MessageState.FORWARDED)

    def _quarantine(
        self, incoming: Incoming, uidvalidity: int, exc: Exception
    ) -> MessageRecord | None:
        """Record a message that met a bug as failed, to be filed in triage."""
        log.exception("processing uid %s failed", incoming.uid)
        if self.dry_run:
            return None
        key, email = self.mailbox.key, incoming.email
        reason = f"internal error: {type(exc).__name__}: {exc}"[:500]
        record = self.state.find(key, uidvalidity, incoming.uid)
        values = {"route": "error", "reason": reason, "outcome": "failed", "folder": "triage"}
        if record is None:
            return self.state.add_message(
                key, uidvalidity, incoming.uid, state=MessageState.CLASSIFIED,
                content_hash=email.content_hash, message_id=email.message_id,
                sender=email.sender, subject=email.subject, size=incoming.size, **values,
            )  # fmt: skip
        return self.state.update(record.id, MessageState.CLASSIFIED, **values)

    # --- filing -----------------------------------------------------------------------------

    def _file(self, delivered: Delivered, report: RoundReport) -> None:
        filing, part = delivered
        for name in ("forwarded", "deferred", "failed", "waiting"):
            setattr(report, name, getattr(report, name) + getattr(part, name))
        for target, items in filing.items():
            if target is not None:
                self.mailbox.file([uid for uid, _, _ in items], target)
            self.state.finalize([(message, final) for _, message, final in items])
            report.filed += len(items)

    def _settle(self, in_box: set[int], uidvalidity: int) -> None:
        """Close the records of messages that left the folder (filed before a crash, or removed)."""
        for record in self.state.pending(self.mailbox.key):
            if record.uidvalidity == uidvalidity and record.uid in in_box:
                continue
            if record.state == MessageState.FORWARDED or (
                record.state == MessageState.CLASSIFIED and record.route not in FORWARDING_ROUTES
            ):
                self.state.finalize([(record.id, MessageState(record.outcome or "filed"))])
            elif record.state in (MessageState.CLASSIFIED, MessageState.FORWARDING):
                reason = "removed from the mailbox before it was forwarded"
                event(log, "message_vanished", logging.WARNING, id=record.id, uid=record.uid)
                self.state.update(record.id, MessageState.FAILED, reason=reason)

    # --- for other parts --------------------------------------------------------------------

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
        ) or self.state.add_forward(
            record.id, self._spec(kind, destination, department), state=None
        )
        facts = self._facts(record, forward, reason)
        email = _parse(raw, self.settings.mailbox.max_message_bytes)
        data = compose_forward(raw, email, facts, self.settings, notice=self._notice(facts))
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


def fingerprint(incoming: Incoming) -> str:
    """The same mail with other transport headers: same Message-ID and same body bytes.

    Empty without a Message-ID: then only identical bytes make a copy. (A Message-ID alone is
    not enough: some web forms send every message with the same one.)
    """
    email = incoming.email
    if not email.message_id:
        return ""
    if incoming.headers_only:
        body = f"size:{incoming.size}".encode()
    else:
        match = re.search(rb"\r?\n\r?\n", incoming.raw)
        body = incoming.raw[match.end() :] if match else b""
    digest = hashlib.sha256(email.message_id.encode("utf-8", "surrogatepass") + b"\0" + body)
    return digest.hexdigest()


def _parse(raw: bytes, limit: int) -> Email:
    try:
        return parse_email(raw, max_bytes=limit)
    except Exception:  # parse_email never raises; if it ever does, the mail goes to triage
        log.exception("parse_email raised")
        return Email(raw_size=len(raw), content_hash=hashlib.sha256(raw).hexdigest(),
                     defects=("unparseable",))  # fmt: skip
