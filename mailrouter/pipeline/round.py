"""One round of routing: every new message of the watched folder, exactly once.

For each message: parse → pre-classification handlers → screen/classify → route → record →
forward → mark forwarded → file → final state (DESIGN §4). Each arrow that changes something
outside the process is preceded by a commit, so :meth:`Pipeline.run_once` can be killed at any
instant and the next round resumes where the state says. Work goes by batches of
``mailbox.batch_size``: a batch's routes and forward rows are committed together, then a sending
thread forwards them (committing each as sent) while the main thread records the next batch; a
batch is filed once its sends are over. Each batch is read one step ahead, so that a backend
waiting on a server (Ollama) computes its predictions while the batch before it is recorded
and sent.

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
  With ``context.dry_run`` it must change nothing. Handlers send through ``context.outbox``
  (:class:`~.types.Outgoing`: a forward again, or a message they composed), never through the
  pipeline. :func:`mailrouter.wiring.build_pipeline` hands the service's handlers in.
* ``notice``: ``(Settings, ForwardFacts) -> Notice | None``, the block added to every forward
  (correction links), and ``token``, the correction token of each forward.
* A long-running loop calls :meth:`Pipeline.run_once` and :meth:`Pipeline.wait_for_changes`
  and finally :meth:`Pipeline.close`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from ..classify.base import Classifier
from ..config import Settings
from ..errors import ConfigError
from ..logs import event
from ..mail.imap import Mailbox, UidValidityChanged
from ..mail.smtp import SmtpSender
from ..state import KEYS, MessageRecord, MessageState, State, StateError
from .intake import Intake
from .outbox import Outbox, no_token
from .types import FORWARDING_ROUTES, Delivered, Filing, Handler, Incoming, NoticeMaker, RoundReport

log = logging.getLogger(__name__)

#: At most this many bytes of mail in a batch: three batches are in memory at once (one being
#: sent, one being classified and recorded, the next being read), whatever the size of the mail
#: in the folder.
BATCH_BYTES = 40 * 1024 * 1024
#: What a message too large to read whole weighs in a batch (only its header is fetched).
HEADER_BYTES = 64 * 1024
#: UIDs per size lookup: one FETCH command line stays well under servers' 64 KB limits.
SIZES_PER_FETCH = 1000


class Pipeline:
    """The router's loop body. Build one per process; it owns its IMAP and SMTP connections.

    Nothing is plugged in by default: :func:`mailrouter.wiring.build_pipeline` gives the service
    and the demo the same handlers, notice and tokens.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        dry_run: bool = False,
        handlers: Sequence[Handler] = (),
        notice: NoticeMaker | None = None,
        token: Callable[[str], str] = no_token,
        mailbox: Mailbox | None = None,
        sender: SmtpSender | None = None,
        state: State | None = None,
        classifier: Classifier | None = None,
    ) -> None:
        self.settings = settings
        self.dry_run = dry_run
        self.state = state or State(settings.state_path)
        self.mailbox = mailbox or Mailbox.from_settings(settings)
        if sender is None and not dry_run:
            sender = SmtpSender.from_settings(settings)
        self.outbox = Outbox(settings, self.state, sender, notice=notice, token=token)
        self.intake = Intake(settings, self.state, self.mailbox, self.outbox, handlers=handlers,
                             classifier=classifier, dry_run=dry_run)  # fmt: skip
        self._first_round = True

    def wait_for_changes(self, timeout: float, stop_event: threading.Event | None = None) -> bool:
        return self.mailbox.wait_for_changes(timeout, stop_event)

    def close(self) -> None:
        self.outbox.close()
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
        self.intake.reset()
        self.outbox.smtp_down = False
        try:
            uidvalidity = self.mailbox.connect()
            self._round(report, uidvalidity, stop or threading.Event())
        except UidValidityChanged as exc:
            event(log, "round_interrupted", logging.WARNING, reason=str(exc))
        finally:
            self.outbox.close()
            report.seconds = time.monotonic() - started
        if not self.dry_run:
            self.state.set(KEYS.LAST_POLL, str(time.time()))
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

    def _round(self, report: RoundReport, uidvalidity: int, stop: threading.Event) -> None:
        """Read batch k+2, record batch k+1 while batch k is being sent.

        Sending runs on one worker thread (SMTP is mostly waiting for the server's replies), in
        message order; each forward is committed as sent by the worker the moment the server
        accepts it. The main thread keeps IMAP to itself: it reads a batch (its predictions are
        asked for then), records the batch read before it, and files batch k once its sends
        are over.
        """
        key = self.mailbox.key
        in_box = self.mailbox.pending_uids()
        first_uid = self.intake.first_uid(uidvalidity)
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
        ahead: list[Incoming] | None = None  # read, its predictions under way, not recorded
        with ThreadPoolExecutor(1, thread_name_prefix="mailrouter-send") as worker:

            def record(incomings: list[Incoming]) -> None:
                nonlocal sending
                ready = self.intake.record_batch(incomings, resumable, uidvalidity, report, stop)
                queued = worker.submit(self._deliver, ready, uidvalidity, stop, halt)
                if sending is not None:
                    self._file(sending.result(), report)
                sending = queued

            try:
                for batch, sizes in self._batches(todo):
                    if stop.is_set():
                        break
                    read = self.intake.read_batch(batch, sizes, resumable)
                    if ahead is not None:
                        record(ahead)
                    ahead = read
                if ahead is not None and not stop.is_set():
                    record(ahead)
                if sending is not None:
                    self._file(sending.result(), report)
            finally:
                halt.set()
                self.intake.end_round()
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
                    sent = self.outbox.forward_pending(record, incoming, part)
                    if sent is None:
                        continue
                    record = sent
            except (StateError, ConfigError):
                raise
            except Exception as exc:  # a bug met by odd mail: file it for a human, go on
                quarantined = self.intake.quarantine(incoming, uidvalidity, exc)
                if quarantined is None:
                    continue
                record = quarantined
            if record.state in (MessageState.CLASSIFIED, MessageState.FORWARDED):
                final = MessageState(record.outcome or MessageState.FILED)
                filing.setdefault(record.folder, []).append((incoming.uid, record.id, final))
        return filing, part

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
