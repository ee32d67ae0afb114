"""``mailrouter reprocess``: decide again the mail already in a folder, compare with what was
decided, and route what never was.

Two uses: comparing a candidate model with the one in service on real recent mail
(``--backend``), and a first install on a mailbox full of mail (``--forward``).

**Looking changes nothing.** The folder is opened read-only (``EXAMINE``) and read with
``BODY.PEEK``: no flag moves, not even ``\\Recent``. The mail is decided by the service's own
round (:func:`mailrouter.wiring.build_pipeline`) in dry-run mode, so what is shown is what the
service would decide (its screening, rules, handlers, the model and its calibrated thresholds),
and nothing is sent, moved or recorded. That round runs under a state key no record has, so
every message is decided afresh. Each decision is then compared, by content hash (the sha256
of the message's bytes), with what the state database recorded for the same mail, wherever it
was read (the inbox it was routed from, usually).

**Routing what never was** (``--forward``) sends the mail no record knows through the same
round for real, with this folder as its watched folder: the state records each message under
this folder's own key before anything is sent, so exactly-once and the message lifecycle hold
as in the service, and a second run finds it done. Nothing has to move for that: filing into
the folder a message is already in is nothing to do, so mail routed to a department stays
where it is; mail the router sends to triage or spam is filed there, as the service would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from .classify import make_classifier
from .classify.base import Classifier
from .config import MailboxSettings, Settings, imap_password
from .mail.imap import Mailbox
from .pipeline.types import Decision, RoundReport
from .state import MessageRecord, State
from .wiring import build_pipeline


class FolderView(Mailbox):
    """One folder of the contact mailbox, seen by a round as if it were the watched one: only
    its mail received since ``since`` (and in ``only``, when given), under the state key
    ``key`` (the folder's own by default). Remembers the content hash of each message read."""

    def __init__(
        self,
        settings: MailboxSettings,
        password: str,
        *,
        since: date,
        only: Iterable[int] | None = None,
        keep: Iterable[int] = (),
        key: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(settings, password, **kwargs)
        self.since = since
        self.only = None if only is None else frozenset(only)
        self.keep = frozenset(keep)  # left unfinished by an earlier run: resumed whatever its date
        self._key = key
        self.hashes: dict[int, str] = {}  # uid -> sha256 of the bytes read

    @property
    def key(self) -> str:
        return self._key or super().key

    def pending_uids(self) -> list[int]:
        found = set(self.uids_since(self.since))
        if self.only is not None:
            found &= self.only
        if self.keep:
            found |= self.keep & set(super().pending_uids())
        return sorted(found)

    def fetch(self, uids: Sequence[int], *, headers_only: bool = False) -> dict[int, bytes]:
        found = super().fetch(uids, headers_only=headers_only)
        self.hashes.update((uid, hashlib.sha256(raw).hexdigest()) for uid, raw in found.items())
        return found

    def file(self, uids: Iterable[int], target: str) -> None:
        """As the service files, except into the folder the mail is already in: nothing to do."""
        if self.settings.use_folders and self.folder_name(target) == self.settings.folder:
            return
        super().file(uids, target)


@dataclass(frozen=True)
class Comparison:
    """One message of the folder: what would be decided now, and what was recorded for it."""

    decision: Decision
    content_hash: str
    recorded: MessageRecord | None

    @property
    def changed(self) -> bool:
        """Recorded, and now going somewhere else (another department, triage, spam…)."""
        if self.recorded is None:
            return False
        before = outcome(self.recorded.route or "", self.recorded.department)
        return before != outcome(self.decision.route, self.decision.department)


@dataclass(frozen=True)
class Reprocessed:
    """What ``reprocess`` found, and with ``--forward`` what routing the never-routed did."""

    folder: str
    since: date
    report: RoundReport  # the dry round: every message seen and decided
    compared: list[Comparison]
    forwarded: RoundReport | None = None

    @property
    def changed(self) -> list[Comparison]:
        return [c for c in self.compared if c.changed]

    @property
    def unknown(self) -> list[Comparison]:
        return [c for c in self.compared if c.recorded is None]


def outcome(route: str, department: str | None) -> str:
    """Where a decision sends the mail: the department for a forward to one, else the route
    (a triage forward names a department only as a guess)."""
    return (department or route) if route == "department" else route


def default_folder(settings: Settings) -> str:
    """The routed folder, or the watched one when filing is by keyword (mail stays there)."""
    mailbox = settings.mailbox
    return mailbox.routed_folder if mailbox.use_folders else mailbox.folder


def reprocess(
    settings: Settings,
    *,
    since: date,
    folder: str | None = None,
    backend: str | None = None,
    forward: bool = False,
) -> Reprocessed:
    """Decide the mail of ``folder`` received since ``since`` again and compare (with
    ``backend``, else the configured one); with ``forward``, then route the mail no record
    knows."""
    name = folder or default_folder(settings)
    mailbox = settings.mailbox.model_copy(update={"folder": name, "backlog": "all"})
    view_settings = settings.model_copy(update={"mailbox": mailbox})
    model = make_classifier(settings, backend)
    password = imap_password(settings)
    look = FolderView(mailbox, password, since=since, readonly=True,
                      key=f"{mailbox.username}/{name} (reprocess)")  # fmt: skip
    report = _round(view_settings, look, model, dry_run=True)
    with State(settings.state_path) as state:
        records = state.with_contents(list(look.hashes.values()))
    compared = [
        Comparison(d, look.hashes[d.uid], recorded(records.get(look.hashes[d.uid], [])))
        for d in report.decisions
        if d.uid in look.hashes
    ]
    done = Reprocessed(name, since, report, compared)
    if not forward:
        return done
    key = f"{mailbox.username}/{name}"
    with State(settings.state_path) as state:
        unfinished = [r.uid for r in state.pending(key)]
    own = FolderView(mailbox, password, since=since, only=never_routed(look.hashes, records, key),
                     keep=unfinished, key=key)  # fmt: skip
    forwarded = _round(view_settings, own, model, dry_run=False)
    return Reprocessed(name, since, report, compared, forwarded)


def recorded(records: Sequence[MessageRecord]) -> MessageRecord | None:
    """The record a decision is compared with: the first of the mail that is no copy."""
    return next((r for r in records if r.duplicate_of is None), records[0] if records else None)


def never_routed(
    hashes: dict[int, str], records: dict[str, list[MessageRecord]], key: str
) -> list[int]:
    """UIDs whose content no record knows outside this folder's own key (the round itself
    skips what it finished under that key, and resumes what it left unfinished)."""
    return [
        uid
        for uid, digest in hashes.items()
        if all(r.mailbox == key for r in records.get(digest, []))
    ]


def _round(
    settings: Settings, view: FolderView, model: Classifier, *, dry_run: bool
) -> RoundReport:
    pipeline = build_pipeline(
        settings, dry_run=dry_run, mailbox=view, classifier=model, state=State(settings.state_path)
    )
    try:
        return pipeline.run_once()
    finally:
        pipeline.close()
