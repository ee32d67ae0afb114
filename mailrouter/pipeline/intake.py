"""Intake: read a batch, recognise copies, let handlers claim mail, classify and route the rest.

What a new message becomes is decided here and recorded by the round, a batch at a time: a
route with its first forward, a copy of mail already known (filed like the first, never
forwarded again), or a handler's outcome (a correction, a bounce).

A backend that waits on a server (Ollama: ``classifier.concurrency``) is asked for a batch's
predictions as soon as the batch is read, up to ``concurrency`` requests in flight while the
round records and sends the batch before it; each answer is used when its email is decided, in
UID order, so decisions and records are those of a sequential round. An in-process backend is
called once per batch when it can (``classify_many``). A request the server refused affects its
email only; a server that cannot be reached (or a timeout, or no model) makes the rest of the
round wait (``on_error = "wait"``), or each email goes to triage (``on_error = "triage"``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TypedDict

from ..classify import make_classifier
from ..classify.base import Classifier
from ..classify.concurrent import ConcurrentClassifier, Lookahead
from ..config import Settings
from ..errors import (
    ClassifierError,
    ClassifierRequestError,
    ConfigError,
    MailboxError,
    SmtpError,
)
from ..logs import event
from ..mail.imap import Mailbox
from ..mail.parse import parse_safely
from ..message import Email
from ..prediction import ClassifyInput, Prediction
from ..prompt import PromptOptions, prefix
from ..router import (
    Conversation,
    Route,
    decide,
    limit_rate,
    rule_route,
    screen,
    thread_route,
    triage,
)
from ..rules import first_match
from ..state import MessageRecord, MessageState, NewMessage, State, StateError
from .outbox import Outbox
from .types import (
    FORWARDING_ROUTES,
    ROUTE_END,
    Context,
    Decision,
    Handler,
    HandlerFailed,
    Incoming,
    Outcome,
    RoundReport,
)

log = logging.getLogger(__name__)


class _Identity(TypedDict):
    """What identifies a mail, recorded with it whatever becomes of it (copy detection reads it)."""

    content_hash: str
    fingerprint: str
    message_id: str
    sender: str
    subject: str
    size: int


class Intake:
    """The reading and deciding half of a round (the main thread's work)."""

    def __init__(
        self,
        settings: Settings,
        state: State,
        mailbox: Mailbox,
        outbox: Outbox,
        *,
        handlers: Sequence[Handler] = (),
        classifier: Classifier | None = None,
        dry_run: bool = False,
    ) -> None:
        self.settings = settings
        self.state = state
        self.mailbox = mailbox
        self.outbox = outbox
        self.handlers = list(handlers)
        self.dry_run = dry_run
        self._model = classifier
        self._classifier_down = False
        self._predictions: dict[int, Prediction] = {}
        self._batch_routed: Counter[str] = Counter()  # forwards decided per sender, unrecorded
        self._early: dict[int, Route | None] = {}  # decided before the model, by uid
        self._ahead: Lookahead | None = None  # predictions asked for ahead of their decisions

    def reset(self) -> None:
        """A new round: the classifier gets another chance."""
        self._classifier_down = False

    def end_round(self) -> None:
        """Drop the predictions asked for and not used (the round stopped before their mail)."""
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None

    def read_batch(
        self, uids: Sequence[int], sizes: dict[int, int], resumable: dict[int, MessageRecord]
    ) -> list[Incoming]:
        """Read a batch and, for a backend that waits on a server, ask at once for the
        predictions its new mail will need, so they are computed while the batch before it is
        recorded and sent."""
        incomings = self.read(uids, sizes)
        if not self._classifier_down:
            self._ask_ahead([i for i in incomings if i.uid not in resumable])
        return incomings

    def _ask_ahead(self, incomings: Sequence[Incoming]) -> None:
        """Submit the mail the model will decide: not what ``screen``, a rule or a conversation
        decides, nor a copy of mail already known. (Both are looked at again when the mail is
        decided; a prediction asked for in vain is only dropped.)"""
        key = self.mailbox.key
        wanted = [
            i
            for i in incomings
            if self._before_model(i.email) is None
            and self.state.find_copy(key, i.email.content_hash, fingerprint(i)) is None
        ]
        if not wanted:
            return
        classifier = self._classifier()
        if not isinstance(classifier, ConcurrentClassifier):
            return  # in-process: classified a batch at a time when it is recorded
        if self._ahead is None:
            self._ahead = Lookahead(classifier)
        for incoming in wanted:
            self._ahead.submit(incoming.uid, ClassifyInput.from_email(incoming.email))

    def record_batch(
        self,
        incomings: Sequence[Incoming],
        resumable: dict[int, MessageRecord],
        uidvalidity: int,
        report: RoundReport,
        stop: threading.Event,
    ) -> list[tuple[Incoming, MessageRecord]]:
        """Decide and record a batch read by :meth:`read_batch`: what is left to send and file,
        in order."""
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
                looked = self.quarantine(incoming, uidvalidity, exc)
            if isinstance(looked, NewMessage):
                plans.append(looked)
                planned.update(k for k in (looked.content_hash, looked.fingerprint) if k)
            elif looked is not None:
                records[incoming.uid] = looked
        for record, _ in self.state.add_messages(plans):
            records[record.uid] = record
        return [(i, records[i.uid]) for i in incomings if i.uid in records]

    def first_uid(self, uidvalidity: int) -> int:
        """With ``backlog = "none"``, the first UID to route: what arrived after the very first
        start (recorded then). Any other case: 1."""
        marker_key = f"start:{self.mailbox.key}"
        marker = self.state.get(marker_key)
        if marker is None:
            if self.settings.mailbox.backlog == "all" or self.state.has_messages(self.mailbox.key):
                return 1
            if self.dry_run:
                return self.mailbox.uidnext
            marker = f"{uidvalidity}:{self.mailbox.uidnext}"
            self.state.set(marker_key, marker)
            event(log, "backlog_skipped", mailbox=self.mailbox.key, first_uid=self.mailbox.uidnext)
        started_in, _, first = marker.partition(":")
        return int(first) if int(started_in) == uidvalidity else 1

    def read(self, uids: Sequence[int], sizes: dict[int, int]) -> list[Incoming]:
        limit = self.settings.mailbox.max_message_bytes
        large = [u for u in uids if sizes.get(u, 0) > limit]
        raws = self.mailbox.fetch([u for u in uids if u in sizes and u not in large])
        heads = self.mailbox.fetch(large, headers_only=True)
        out = []
        for uid in uids:
            raw = raws.get(uid, heads.get(uid))
            if raw is None:
                continue  # gone meanwhile
            out.append(Incoming(uid, raw, parse_safely(raw, limit), sizes[uid], uid in heads))
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
            spec = self.outbox.first_forward(record.route, record.department, record.destination)
            self.state.add_forward(record.id, spec)
            record = self.state.message(record.id)
        return record

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
        identity: _Identity = {
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
                self.state.record_error("handler_failed", f"uid {incoming.uid}: {exc}")
            return None
        if outcome is not None:
            return self._claimed(incoming, uidvalidity, report, outcome, identity)
        return self._routed(incoming, uidvalidity, report, identity)

    def _claimed(
        self,
        incoming: Incoming,
        uidvalidity: int,
        report: RoundReport,
        outcome: Outcome,
        identity: _Identity,
    ) -> MessageRecord | None:
        """Record at once a message a handler claimed (the handler has already acted)."""
        self._report(report, incoming, outcome.route, None, None, None, outcome.reason)
        if self.dry_run:
            return None
        state = MessageState.CLASSIFIED if outcome.target else outcome.state
        return self.state.add_message(
            self.mailbox.key, uidvalidity, incoming.uid, state=state, route=outcome.route,
            reason=outcome.reason, outcome=str(outcome.state), folder=outcome.target,
            **identity,
        )  # fmt: skip

    def _routed(
        self, incoming: Incoming, uidvalidity: int, report: RoundReport, identity: _Identity
    ) -> NewMessage | None:
        """Classify and route a message no handler claimed: what to record for it, with its
        forward when it goes to a department or triage (``None`` while the classifier waits)."""
        email = incoming.email
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
            forward = self.outbox.first_forward(route.kind, route.department, route.address)
        return NewMessage(
            self.mailbox.key,
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
                "explain": explain(email, prediction, self.settings) if prediction else None,
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
        identity: _Identity,
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
        context = Context(self.settings, self.state, self.mailbox, self.outbox, self.dry_run)
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

    def _classifier(self) -> Classifier:
        if self._model is None:
            self._model = make_classifier(self.settings)
        return self._model

    def _classify_batch(self, incomings: Sequence[Incoming]) -> dict[int, Prediction]:
        """Predictions for the new messages of a batch that need one, in one call when an
        in-process classifier has ``classify_many`` (classifying is pure, so a message later
        claimed by a handler or found to be a copy only wastes its share). Empty on any error:
        then each message is classified alone and its error handled as usual. (A backend that
        waits on a server was asked when the batch was read: :meth:`_ask_ahead`.)"""
        self._early = {i.uid: self._before_model(i.email) for i in incomings}
        if self._classifier_down:
            return {}
        wanted = [i for i in incomings if self._early[i.uid] is None]
        if len(wanted) < 2:
            return {}
        try:
            classifier = self._classifier()
            many = getattr(classifier, "classify_many", None)
            if many is None or isinstance(classifier, ConcurrentClassifier):
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

    def _before_model(self, email: Email) -> Route | None:
        """What is decided without a model: our own and machine mail (``screen``), then the
        first matching ``[[rules]]`` entry, then the conversation a follow-up belongs to."""
        screened = screen(email, self.settings)
        if screened is not None:
            return screened
        rule = first_match(self.settings.rules, email)
        if rule is not None:
            return rule_route(rule, self.settings)
        if not self.settings.routing.follow_threads:
            return None
        named = [email.in_reply_to, *reversed(email.references)]
        records = self.state.conversation(self.mailbox.key, named)
        if not records:
            return None
        conversation = [Conversation(r.id, r.sender, r.department or r.label) for r in records]
        corrected = self.state.latest_correction_of([r.id for r in records])
        return thread_route(email, conversation, corrected, self.settings)

    def _classified_route(self, incoming: Incoming) -> tuple[Route, Prediction | None] | None:
        email = incoming.email
        if incoming.uid in self._early:
            early = self._early.pop(incoming.uid)
        else:
            early = self._before_model(email)
        if early is not None:
            return early, None
        prediction = self._predictions.pop(incoming.uid, None)
        if prediction is not None:
            return decide(prediction, email, self.settings), prediction
        asked = self._ahead.take(incoming.uid) if self._ahead is not None else None
        if asked is not None and asked.cancelled():
            asked = None
        if self._classifier_down and not answered(asked):
            return None
        try:
            if asked is not None:
                prediction = asked.result()  # in flight since the batch was read
            else:
                prediction = self._classifier().classify(ClassifyInput.from_email(email))
        except ClassifierError as exc:
            return self._classifier_failed(incoming, exc)
        except Exception as exc:  # a backend bug: this message goes to a human
            log.exception("classifier failed on uid %s", incoming.uid)
            return decide(None, email, self.settings, error=f"{type(exc).__name__}: {exc}"), None
        return decide(prediction, email, self.settings), prediction

    def _classifier_failed(
        self, incoming: Incoming, exc: ClassifierError
    ) -> tuple[Route, Prediction | None] | None:
        """Triage with ``on_error = "triage"``; else the message waits for a later round, and
        when the server itself failed (unreachable, timeout, no model), so does the rest of the
        round: the requests not started are cancelled, none is sent until the next round."""
        if self.settings.classifier.on_error == "triage":
            return decide(None, incoming.email, self.settings, error=str(exc)), None
        if isinstance(exc, ClassifierRequestError):
            event(log, "classify_failed", logging.WARNING, uid=incoming.uid, error=str(exc))
            return None
        self._classifier_down = True
        if self._ahead is not None:
            self._ahead.cancel()
        event(log, "classifier_unavailable", logging.WARNING, error=str(exc))
        return None

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

    def quarantine(
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


def answered(asked: Future[Prediction] | None) -> bool:
    """A request that has already brought its prediction: usable even once the server is down."""
    return asked is not None and asked.done() and asked.exception() is None


def explain(email: Email, prediction: Prediction, settings: Settings) -> str:
    """What ``history --explain`` shows: the email as the prompt held it, the model's answer and
    each label's probability (JSON, kept with the message in the private state database)."""
    options = PromptOptions.from_settings(settings)
    prompt = ClassifyInput.from_email(email).prompt(settings.departments, options)
    text = prompt.removeprefix(prefix(settings.departments, strip_accents=options.strip_accents))
    data = {
        "text": text,
        "answer": prediction.raw,
        "model": prediction.model,
        "probabilities": dict(prediction.likeliest(len(prediction.probabilities))),
    }
    return json.dumps(data, ensure_ascii=False)


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
