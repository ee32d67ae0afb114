"""The state database: what happened to every message, every forward, correction and model.

SQLite in WAL mode, one file (``settings.state_path``). The schema grows by ordered migrations
recorded in ``schema_migrations``; a database written by an older version is upgraded at open, a
newer one is refused. Every transition of a message is one committed transaction, so a crash at
any point leaves a state the next start resumes from (see :data:`FINAL` and :meth:`State.pending`).

The lifecycle (DESIGN §4)::

    new → classified → forwarding → forwarded → filed      (a department)
                                              → triaged    (sent to the triage address)
    new → spam | ignored                                    (filed, never forwarded)
    forwarding → failed                                     (permanent SMTP error: filed to triage)

A forward's Message-ID is stored (``forwarding``) before the SMTP transaction starts: a crash
between the server's "250" and the next commit re-sends the very same message, which receivers
deduplicate on its Message-ID.

Other parts own their rows but not the schema: the ``corrections``, ``models``,
``training_runs`` and ``kv`` tables are created here so migrations live in one place; their
owners read and write them through :meth:`State.execute` / :meth:`State.query` or their own
small helpers.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import MailRouterError

if TYPE_CHECKING:  # a typeshed-only name: "any dataclass"
    from _typeshed import DataclassInstance
from .files import private_dir, private_new_file, tighten


class StateError(MailRouterError):
    """The state database is unreadable, locked for too long, or newer than this program."""


class MessageState(StrEnum):
    NEW = "new"
    CLASSIFIED = "classified"
    FORWARDING = "forwarding"
    FORWARDED = "forwarded"
    FILED = "filed"
    TRIAGED = "triaged"
    SPAM = "spam"
    IGNORED = "ignored"
    FAILED = "failed"


FINAL = frozenset(
    {
        MessageState.FILED,
        MessageState.TRIAGED,
        MessageState.SPAM,
        MessageState.IGNORED,
        MessageState.FAILED,
    }
)

MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "messages, forwards, decisions",
        """
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            mailbox TEXT NOT NULL,
            uidvalidity INTEGER NOT NULL,
            uid INTEGER NOT NULL,
            message_id TEXT NOT NULL DEFAULT '',
            content_hash TEXT NOT NULL,
            fingerprint TEXT NOT NULL DEFAULT '',
            sender TEXT NOT NULL DEFAULT '',
            subject TEXT NOT NULL DEFAULT '',
            size INTEGER NOT NULL DEFAULT 0,
            state TEXT NOT NULL,
            route TEXT,
            label TEXT,
            department TEXT,
            destination TEXT,
            confidence REAL,
            model TEXT,
            reason TEXT,
            outcome TEXT,
            folder TEXT,
            duplicate_of INTEGER REFERENCES messages(id),
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL,
            last_error TEXT,
            created TEXT NOT NULL,
            updated TEXT NOT NULL,
            UNIQUE (mailbox, uidvalidity, uid)
        );
        CREATE INDEX messages_state ON messages(state);
        CREATE INDEX messages_hash ON messages(mailbox, content_hash);
        CREATE INDEX messages_fingerprint ON messages(mailbox, fingerprint);
        CREATE TABLE forwards (
            forward_id TEXT PRIMARY KEY,
            message INTEGER NOT NULL REFERENCES messages(id),
            kind TEXT NOT NULL,
            destination TEXT NOT NULL,
            department TEXT,
            message_id TEXT NOT NULL UNIQUE,
            token TEXT NOT NULL,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            created TEXT NOT NULL,
            sent TEXT
        );
        CREATE INDEX forwards_message ON forwards(message);
        CREATE INDEX forwards_token ON forwards(token);
        CREATE TABLE decisions (
            id INTEGER PRIMARY KEY,
            message INTEGER NOT NULL REFERENCES messages(id),
            at TEXT NOT NULL,
            state TEXT NOT NULL,
            route TEXT,
            label TEXT,
            confidence REAL,
            model TEXT,
            destination TEXT,
            reason TEXT
        );
        CREATE INDEX decisions_message ON decisions(message);
        """,
    ),
    (
        2,
        "corrections, models, training runs, key-value",
        """
        CREATE TABLE corrections (
            id INTEGER PRIMARY KEY,
            forward_id TEXT REFERENCES forwards(forward_id),
            message INTEGER REFERENCES messages(id),
            by TEXT NOT NULL,
            command TEXT NOT NULL,
            old_label TEXT,
            new_label TEXT,
            status TEXT NOT NULL,
            created TEXT NOT NULL
        );
        CREATE INDEX corrections_message ON corrections(message);
        CREATE INDEX corrections_by ON corrections(by, created);
        CREATE TABLE models (
            version TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            created TEXT NOT NULL,
            metrics TEXT NOT NULL DEFAULT '{}',
            status TEXT NOT NULL CHECK (status IN ('in_service', 'retired', 'rejected'))
        );
        CREATE TABLE training_runs (
            id INTEGER PRIMARY KEY,
            started TEXT NOT NULL,
            ended TEXT,
            dataset_hash TEXT,
            counts TEXT NOT NULL DEFAULT '{}',
            base_model TEXT,
            params TEXT NOT NULL DEFAULT '{}',
            metrics TEXT NOT NULL DEFAULT '{}',
            decision TEXT,
            reason TEXT,
            error TEXT
        );
        CREATE TABLE kv (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            updated TEXT NOT NULL
        );
        """,
    ),
    (
        3,
        "corrections: the correction mail and the example it recorded",
        """
        ALTER TABLE corrections ADD COLUMN mail_id TEXT;
        ALTER TABLE corrections ADD COLUMN example_id TEXT;
        ALTER TABLE corrections ADD COLUMN reason TEXT;
        CREATE INDEX corrections_mail ON corrections(mail_id);
        """,
    ),
    (
        4,
        "messages: the pending lookup indexed by mailbox and state",
        """
        DROP INDEX messages_state;
        CREATE INDEX messages_state ON messages(mailbox, state);
        """,
    ),
    (
        5,
        "corrections: how each was authenticated, and confirmation requests",
        """
        ALTER TABLE corrections ADD COLUMN auth TEXT;
        ALTER TABLE corrections ADD COLUMN domain TEXT;
        CREATE INDEX corrections_created ON corrections(created);
        CREATE TABLE confirmations (
            id INTEGER PRIMARY KEY,
            correction INTEGER NOT NULL UNIQUE REFERENCES corrections(id),
            ref_hash TEXT NOT NULL UNIQUE,
            address TEXT NOT NULL,
            status TEXT NOT NULL,
            created TEXT NOT NULL,
            expires TEXT NOT NULL,
            answered TEXT
        );
        """,
    ),
    (
        6,
        "messages: what the classifier read and answered; conversations by Message-ID",
        """
        ALTER TABLE messages ADD COLUMN explain TEXT;
        CREATE INDEX messages_message_id ON messages(message_id);
        """,
    ),
)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class MessageRecord:
    """One message of the watched mailbox and where it is in its lifecycle."""

    id: int
    mailbox: str
    uidvalidity: int
    uid: int
    message_id: str
    content_hash: str
    fingerprint: str
    sender: str
    subject: str
    size: int
    state: MessageState
    route: str | None
    label: str | None
    department: str | None
    destination: str | None
    confidence: float | None
    model: str | None
    reason: str | None
    outcome: str | None  # the final state this message reaches once filed
    folder: str | None  # the filing target: routed | triage | spam (None: left in place)
    duplicate_of: int | None
    attempts: int
    next_attempt_at: float | None
    last_error: str | None
    created: str
    updated: str
    #: JSON: the email text the prompt held, the model's answer and each label's probability.
    explain: str | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL


@dataclass(frozen=True)
class ForwardRecord:
    """One forward: its id, Message-ID and token exist before the message is sent."""

    forward_id: str
    message: int
    kind: str  # route | triage | failure | correction | notice
    destination: str
    department: str | None
    message_id: str
    token: str
    status: str  # pending | sent | failed
    attempts: int
    last_error: str | None
    created: str
    sent: str | None


@dataclass(frozen=True)
class HistoryEntry:
    """One recorded decision, with the message it concerns."""

    id: int
    message: int
    at: str
    state: str
    route: str | None
    label: str | None
    confidence: float | None
    model: str | None
    destination: str | None
    reason: str | None
    sender: str
    subject: str
    message_id: str


@dataclass(frozen=True)
class CorrectionRecord:
    """One correction mail from staff and what became of it.

    ``mail_id`` identifies the correction mail by the hash of its bytes as received (never by its
    sender-chosen Message-ID), so a mail handled again after a crash finds its row.
    ``status``: pending | awaiting (a confirmation was requested) | applied | held (the example
    waits for review) | unreadable | refused | declined | expired | reverted | rejected.
    """

    id: int
    forward_id: str | None
    message: int | None
    by: str
    command: str
    old_label: str | None
    new_label: str | None
    status: str
    created: str
    mail_id: str | None = None
    example_id: str | None = None
    reason: str | None = None
    auth: str | None = None
    domain: str | None = None


@dataclass(frozen=True)
class CorrectionRow:
    """A correction with the subject of the message it corrects, for listings."""

    id: int
    created: str
    by: str
    command: str
    old_label: str | None
    new_label: str | None
    status: str
    subject: str
    example_id: str | None
    auth: str | None = None


@dataclass(frozen=True)
class ConfirmationRecord:
    """A confirmation request sent to the claimed author of an unauthenticated correction.

    Only the hash of its reference is stored: the reference itself is derived from the token
    key (see :mod:`mailrouter.confirmations`) and travels only in the mail to that address.
    """

    id: int
    correction: int
    ref_hash: str
    address: str
    status: str  # new (not sent yet) | waiting | confirmed | declined | expired
    created: str
    expires: str
    answered: str | None = None


@dataclass(frozen=True)
class NewForward:
    """A forward to create: its id, Message-ID and token are derived when it is recorded.

    ``token`` is a callable ``forward_id -> str``
    (see :func:`mailrouter.corrections.tokens.token_maker`).
    """

    kind: str
    destination: str
    department: str | None
    domain: str
    token: Callable[[str], str]


@dataclass(frozen=True)
class NewMessage:
    """A message to record (see :meth:`State.add_messages`); ``extra`` holds the other columns."""

    mailbox: str
    uidvalidity: int
    uid: int
    content_hash: str
    fingerprint: str = ""
    message_id: str = ""
    sender: str = ""
    subject: str = ""
    size: int = 0
    state: MessageState = MessageState.NEW
    extra: dict[str, Any] = field(default_factory=dict)
    forward: NewForward | None = None


_T = TypeVar("_T", bound="DataclassInstance")


@functools.cache
def _names(cls: type[DataclassInstance]) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))


def _row(cls: type[_T], row: sqlite3.Row) -> _T:
    names = _names(cls)
    data = {k: row[k] for k in row.keys() if k in names}  # noqa: SIM118
    if cls is MessageRecord:
        data["state"] = MessageState(data["state"])
    return cls(**data)


class KEYS:
    """The service's heartbeat in the ``kv`` table: written by ``serve`` (the last poll by the
    pipeline), read by ``status``."""

    PID = "service.pid"
    STARTED = "service.started"
    HEARTBEAT = "service.heartbeat"  # unix time, every HEARTBEAT_SECONDS while running
    LAST_POLL = "last_poll"  # unix time of the last look at the mailbox (written by the pipeline)
    STOPPED = "service.stopped"  # ISO time of the last clean exit
    LAST_ERROR = "service.last_error"  # JSON {"at", "event", "error"}
    DRY_RUN = "service.dry_run"


def forward_id_for(mailbox: str, content_hash: str, kind: str, n: int) -> str:
    """The id of the ``n``-th forward of this ``kind`` of a message: derived, not random, so a
    forward re-created after a lost commit gets the same id and the same Message-ID."""
    seed = f"{mailbox}\0{content_hash}\0{kind}\0{n}".encode()
    return hashlib.sha256(seed).hexdigest()[:12]


class State:
    """The state database: thread-safe (one connection behind a lock); several processes may
    open the same file."""

    def __init__(self, path: Path | str, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        if str(path) != ":memory:":
            # Customer text: SQLite gives -wal and -shm the mode of the database file.
            private_new_file(private_dir(self.path.parent) / self.path.name)
        self._lock = threading.RLock()
        try:
            self.conn = sqlite3.connect(
                str(path), timeout=timeout, isolation_level=None, check_same_thread=False
            )
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")
            for suffix in ("-wal", "-shm"):  # left by an older version with a looser mode
                tighten(self.path.with_name(self.path.name + suffix))
            # NORMAL: in WAL mode a commit survives a crash of the process without an fsync. A
            # power cut may lose the last commits; forward ids are derived from the message, so
            # a forward re-created after one has the same Message-ID (see add_forward).
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot open the state database: {exc}") from exc

    # --- plumbing ---------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write (``BEGIN IMMEDIATE``): all of it is committed or none."""
        with self._lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._write_error(exc) from exc
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException as exc:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._write_error(exc) from exc
                raise

    def _write_error(self, exc: sqlite3.Error) -> StateError:
        """A failed write as one :class:`StateError` that says what to look at."""
        if isinstance(exc, sqlite3.IntegrityError):
            why = (
                "the database refused it; if another mailrouter process uses this data folder, "
                "stop it (one `mailrouter serve` per data folder)"
            )
        elif isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            why = f"another process held the database for more than {self.timeout:.0f} s"
        else:
            why = f"check the disk and the file (`sqlite3 {self.path} 'PRAGMA integrity_check'`)"
        return StateError(f"{self.path}: the write failed ({exc}): {why}")

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> int:
        """Run one write statement in its own transaction; returns ``lastrowid``."""
        with self.transaction() as conn:
            return int(conn.execute(sql, params).lastrowid or 0)

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self.conn.execute(sql, params))

    def schema_version(self) -> int:
        row = self.query("SELECT MAX(version) AS v FROM schema_migrations")
        return int(row[0]["v"] or 0)

    def _migrate(self) -> None:
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied TEXT NOT NULL)"
        )
        done = {r[0] for r in self.conn.execute("SELECT version FROM schema_migrations")}
        latest = MIGRATIONS[-1][0]
        if done and max(done) > latest:
            raise StateError(
                f"{self.path} has schema version {max(done)}, this program knows up to {latest}: "
                "upgrade mailrouter"
            )
        for version, name, sql in MIGRATIONS:
            if version in done:
                continue
            with self.transaction() as conn:
                for statement in sql.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied) VALUES (?, ?, ?)",
                    (version, name, now_iso()),
                )

    # --- messages ---------------------------------------------------------------------------

    def message(self, message_id: int) -> MessageRecord:
        rows = self.query("SELECT * FROM messages WHERE id = ?", (message_id,))
        if not rows:
            raise KeyError(message_id)
        return _row(MessageRecord, rows[0])

    def find(self, mailbox: str, uidvalidity: int, uid: int) -> MessageRecord | None:
        rows = self.query(
            "SELECT * FROM messages WHERE mailbox = ? AND uidvalidity = ? AND uid = ?",
            (mailbox, uidvalidity, uid),
        )
        return _row(MessageRecord, rows[0]) if rows else None

    def conversation(self, mailbox: str, message_ids: Sequence[str]) -> list[MessageRecord]:
        """The messages a follow-up answers, newest first: those routed to a department or to
        spam whose original Message-ID, or one of whose forwards' Message-ID, is in
        ``message_ids``."""
        wanted = [m for m in dict.fromkeys(message_ids) if m][:100]
        if not wanted:
            return []
        marks = ", ".join("?" for _ in wanted)
        rows = self.query(
            f"SELECT m.* FROM messages m WHERE m.mailbox = ? AND m.duplicate_of IS NULL "
            f"AND m.route IN ('department', 'spam') AND (m.message_id IN ({marks}) "
            f"OR m.id IN (SELECT f.message FROM forwards f WHERE f.message_id IN ({marks}))) "
            "ORDER BY m.id DESC LIMIT 20",
            (mailbox, *wanted, *wanted),
        )
        return [_row(MessageRecord, r) for r in rows]

    def corrected_senders(self) -> list[tuple[str, str]]:
        """(sender of the corrected mail, department it was corrected to), for each correction
        applied or held, oldest first (what ``rules suggest`` reads)."""
        rows = self.query(
            "SELECT m.sender, c.new_label FROM corrections c JOIN messages m ON m.id = c.message "
            "WHERE c.status IN ('applied', 'held') AND c.command = 'route' ORDER BY c.id"
        )
        return [(str(r["sender"]), str(r["new_label"])) for r in rows if r["new_label"]]

    def latest_correction_of(self, messages: Sequence[int]) -> str | None:
        """The label of the newest applied (or held) correction of any of ``messages``."""
        if not messages:
            return None
        marks = ", ".join("?" for _ in messages)
        rows = self.query(
            f"SELECT new_label FROM corrections WHERE message IN ({marks}) "
            "AND status IN ('applied', 'held') ORDER BY id DESC LIMIT 1",
            tuple(messages),
        )
        return rows[0]["new_label"] if rows else None

    def first_with_message_id(self, message_id: str) -> MessageRecord | None:
        """The first message recorded with this Message-ID (for displays, never for trust)."""
        rows = self.query(
            "SELECT * FROM messages WHERE message_id = ? ORDER BY id LIMIT 1", (message_id,)
        )
        return _row(MessageRecord, rows[0]) if rows else None

    def known_uids(
        self, mailbox: str, uidvalidity: int, since_uid: int = 0
    ) -> dict[int, MessageState]:
        """The UIDs (from ``since_uid`` on) of this mailbox generation the database knows."""
        rows = self.query(
            "SELECT uid, state FROM messages WHERE mailbox = ? AND uidvalidity = ? AND uid >= ?",
            (mailbox, uidvalidity, since_uid),
        )
        return {int(r["uid"]): MessageState(r["state"]) for r in rows}

    def find_copy(self, mailbox: str, content_hash: str, fingerprint: str) -> MessageRecord | None:
        """An earlier record of the same mail: the same bytes, or the same fingerprint (Message-ID,
        sender, subject, date and text: the same mail with other transport headers).

        This is what keeps a UIDVALIDITY reset (the mailbox recreated, the same mail under new
        UIDs) or a second delivery of one message from being forwarded twice. The Message-ID
        alone is not enough: some web forms send every message with the same one.
        """
        rows = self.query(
            "SELECT * FROM messages WHERE mailbox = ? AND content_hash = ? "
            "AND duplicate_of IS NULL ORDER BY id LIMIT 1",
            (mailbox, content_hash),
        )
        if not rows and fingerprint:
            rows = self.query(
                "SELECT * FROM messages WHERE mailbox = ? AND fingerprint = ? "
                "AND duplicate_of IS NULL ORDER BY id LIMIT 1",
                (mailbox, fingerprint),
            )
        return _row(MessageRecord, rows[0]) if rows else None

    def with_contents(self, hashes: Sequence[str]) -> dict[str, list[MessageRecord]]:
        """The records of each of these contents (sha256 of the bytes), in any mailbox, oldest
        first: what became of the same mail wherever it was read (``reprocess`` compares what
        it would decide now with it, and routes only mail no record knows)."""
        out: dict[str, list[MessageRecord]] = {}
        unique = sorted(set(hashes))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            sql = f"SELECT * FROM messages WHERE content_hash IN ({marks}) ORDER BY id"
            for row in self.query(sql, chunk):
                out.setdefault(row["content_hash"], []).append(_row(MessageRecord, row))
        return out

    def add_message(
        self,
        mailbox: str,
        uidvalidity: int,
        uid: int,
        *,
        content_hash: str,
        fingerprint: str = "",
        message_id: str = "",
        sender: str = "",
        subject: str = "",
        size: int = 0,
        state: MessageState = MessageState.NEW,
        **extra: Any,
    ) -> MessageRecord:
        """Record a message seen in the mailbox (``new`` unless said otherwise)."""
        new = NewMessage(
            mailbox, uidvalidity, uid, content_hash=content_hash, fingerprint=fingerprint,
            message_id=message_id, sender=sender, subject=subject, size=size, state=state,
            extra=extra,
        )  # fmt: skip
        return self.add_messages([new])[0][0]

    def add_messages(
        self, items: Sequence[NewMessage]
    ) -> list[tuple[MessageRecord, ForwardRecord | None]]:
        """Record several messages, each with its first forward when it has one, in one
        transaction: a batch costs one commit instead of two per message."""
        if not items:
            return []
        stamp = now_iso()
        ids = []
        with self.transaction() as conn:
            for item in items:
                values: dict[str, Any] = {
                    "mailbox": item.mailbox,
                    "uidvalidity": item.uidvalidity,
                    "uid": item.uid,
                    "content_hash": item.content_hash,
                    "fingerprint": item.fingerprint,
                    "message_id": item.message_id,
                    "sender": item.sender,
                    "subject": item.subject[:500],
                    "size": item.size,
                    "state": str(item.state),
                    "created": stamp,
                    "updated": stamp,
                    **item.extra,
                }
                columns = ", ".join(values)
                marks = ", ".join("?" for _ in values)
                rowid = conn.execute(
                    f"INSERT INTO messages ({columns}) VALUES ({marks})", tuple(values.values())
                ).lastrowid
                assert rowid is not None
                if item.state != MessageState.NEW:
                    self._decide(conn, rowid)
                forward_id = (
                    self._insert_forward(conn, rowid, item.forward, MessageState.FORWARDING)
                    if item.forward is not None
                    else None
                )
                ids.append((rowid, forward_id))
            messages = self._rows(MessageRecord, "messages", "id", [m for m, _ in ids])
            forwards = self._rows(ForwardRecord, "forwards", "forward_id", [f for _, f in ids if f])
        return [(messages[m], forwards[f] if f else None) for m, f in ids]

    def _rows(self, cls: type[_T], table: str, key: str, values: Sequence[Any]) -> dict[Any, _T]:
        """Records by key, read in chunks (SQLite allows 999 parameters in old versions)."""
        out: dict[Any, _T] = {}
        for start in range(0, len(values), 500):
            chunk = values[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            sql = f"SELECT * FROM {table} WHERE {key} IN ({marks})"
            for row in self.conn.execute(sql, chunk):
                out[row[key]] = _row(cls, row)
        return out

    def update(
        self, message: int, state: MessageState | None = None, **values: Any
    ) -> MessageRecord:
        """Change a message's fields and, with ``state``, record the transition in the history."""
        if state is not None:
            values["state"] = str(state)
        values["updated"] = now_iso()
        assignments = ", ".join(f"{k} = ?" for k in values)
        with self.transaction() as conn:
            conn.execute(
                f"UPDATE messages SET {assignments} WHERE id = ?", (*values.values(), message)
            )
            if state is not None:
                self._decide(conn, message)
        return self.message(message)

    def _decide(self, conn: sqlite3.Connection, message: int) -> None:
        conn.execute(
            "INSERT INTO decisions (message, at, state, route, label, confidence, model, "
            "destination, reason) SELECT id, ?, state, route, label, confidence, model, "
            "destination, reason FROM messages WHERE id = ?",
            (now_iso(), message),
        )

    def pending(self, mailbox: str | None = None, *, due: bool = False) -> list[MessageRecord]:
        """Messages in a non-final state, oldest first; with ``due``, only those whose retry time
        has come. These are resumed at start and at every round."""
        open_states = [str(s) for s in MessageState if s not in FINAL]
        marks = ", ".join("?" for _ in open_states)
        sql = f"SELECT * FROM messages WHERE state IN ({marks})"
        params: list[Any] = open_states
        if mailbox is not None:
            sql += " AND mailbox = ?"
            params.append(mailbox)
        if due:
            sql += " AND (next_attempt_at IS NULL OR next_attempt_at <= ?)"
            params.append(time.time())
        return [_row(MessageRecord, r) for r in self.query(sql + " ORDER BY id", params)]

    def finalize(self, items: Sequence[tuple[int, MessageState]]) -> None:
        """Move several messages to their final states in one transaction (after filing)."""
        if not items:
            return
        stamp = now_iso()
        with self.transaction() as conn:
            for message, state in items:
                conn.execute(
                    "UPDATE messages SET state = ?, next_attempt_at = NULL, updated = ? "
                    "WHERE id = ?",
                    (str(state), stamp, message),
                )
                self._decide(conn, message)

    def counts(self) -> dict[str, int]:
        """How many messages are in each state."""
        rows = self.query("SELECT state, COUNT(*) AS n FROM messages GROUP BY state")
        return {r["state"]: int(r["n"]) for r in rows}

    def has_messages(self, mailbox: str) -> bool:
        """Was anything ever recorded from ``mailbox`` (is this its very first start)?"""
        return bool(self.query("SELECT 1 FROM messages WHERE mailbox = ? LIMIT 1", (mailbox,)))

    def outcomes_since(self, since: str) -> list[tuple[str, str | None, int]]:
        """``(state, department, count)`` of the messages last updated since ``since`` (ISO
        time), copies not counted: what ``status`` reports for the day."""
        rows = self.query(
            "SELECT state, department, COUNT(*) AS n FROM messages WHERE updated >= ? "
            "AND duplicate_of IS NULL GROUP BY state, department",
            (since,),
        )
        return [(r["state"], r["department"], int(r["n"])) for r in rows]

    def last_message_error(self) -> tuple[str, int, str] | None:
        """``(updated, id, last_error)`` of the message whose error is the newest, if any."""
        rows = self.query(
            "SELECT id, updated, last_error FROM messages WHERE last_error IS NOT NULL "
            "AND last_error != '' ORDER BY updated DESC LIMIT 1"
        )
        return (rows[0]["updated"], int(rows[0]["id"]), rows[0]["last_error"]) if rows else None

    def routed_from(self, sender: str, within_seconds: float) -> int:
        """How many of ``sender``'s messages recorded in the last ``within_seconds`` were routed
        to be forwarded (to a department or triage; copies not counted): what a per-sender rate
        limit compares. Ids grow with time, so only the rows after the newest older one are
        read: the cost is that of the period, not of the whole history."""
        since = (datetime.now(UTC) - timedelta(seconds=within_seconds)).isoformat(
            timespec="seconds"
        )
        rows = self.query(
            "SELECT COUNT(*) AS n FROM messages WHERE id > COALESCE((SELECT id FROM messages "
            "WHERE created < ? ORDER BY id DESC LIMIT 1), 0) AND sender = ? AND created >= ? "
            "AND route IN ('department', 'triage') AND duplicate_of IS NULL",
            (since, sender, since),
        )
        return int(rows[0]["n"])

    # --- forwards ---------------------------------------------------------------------------

    def add_forward(
        self,
        message: int,
        spec: NewForward,
        *,
        state: MessageState | None = MessageState.FORWARDING,
    ) -> ForwardRecord:
        """Create a forward (status ``pending``) with its Message-ID and token, and move the
        message to ``state`` in the same transaction: both are on disk before anything is sent."""
        with self.transaction() as conn:
            forward_id = self._insert_forward(conn, message, spec, state)
        return self.forward(forward_id)

    def _insert_forward(
        self,
        conn: sqlite3.Connection,
        message: int,
        spec: NewForward,
        state: MessageState | None,
    ) -> str:
        stamp = now_iso()
        row = conn.execute(
            "SELECT mailbox, content_hash FROM messages WHERE id = ?", (message,)
        ).fetchone()
        n = conn.execute(
            "SELECT COUNT(*) FROM forwards WHERE message = ? AND kind = ?", (message, spec.kind)
        ).fetchone()[0]
        forward_id = forward_id_for(row["mailbox"], row["content_hash"], spec.kind, n)
        while conn.execute("SELECT 1 FROM forwards WHERE forward_id = ?", (forward_id,)).fetchone():
            n += 1
            forward_id = forward_id_for(row["mailbox"], row["content_hash"], spec.kind, n)
        conn.execute(
            "INSERT INTO forwards (forward_id, message, kind, destination, department, "
            "message_id, token, status, created) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
            (
                forward_id,
                message,
                spec.kind,
                spec.destination,
                spec.department,
                f"<fwd-{forward_id}@{spec.domain}>",
                spec.token(forward_id),
                stamp,
            ),
        )
        if state is not None:
            conn.execute(
                "UPDATE messages SET state = ?, updated = ? WHERE id = ?",
                (str(state), stamp, message),
            )
            self._decide(conn, message)
        return forward_id

    def forward(self, forward_id: str) -> ForwardRecord:
        rows = self.query("SELECT * FROM forwards WHERE forward_id = ?", (forward_id,))
        if not rows:
            raise KeyError(forward_id)
        return _row(ForwardRecord, rows[0])

    def forward_by(
        self, *, token: str | None = None, message_id: str | None = None
    ) -> ForwardRecord | None:
        """The forward with this token or this Message-ID header (``<fwd-…@…>``)."""
        if token is not None:
            rows = self.query("SELECT * FROM forwards WHERE token = ?", (token,))
        elif message_id is not None:
            rows = self.query("SELECT * FROM forwards WHERE message_id = ?", (message_id,))
        else:
            raise ValueError("give a token or a message_id")
        return _row(ForwardRecord, rows[0]) if rows else None

    def forwards_of(self, message: int) -> list[ForwardRecord]:
        rows = self.query(
            "SELECT * FROM forwards WHERE message = ? ORDER BY created, rowid", (message,)
        )
        return [_row(ForwardRecord, r) for r in rows]

    def open_forward(self, message: int) -> ForwardRecord | None:
        """The message's forward not yet sent, if any (the one to resume)."""
        rows = self.query(
            "SELECT * FROM forwards WHERE message = ? AND status = 'pending' "
            "ORDER BY created, rowid LIMIT 1",
            (message,),
        )
        return _row(ForwardRecord, rows[0]) if rows else None

    def forward_sent(
        self, forward_id: str, *, message_state: MessageState | None = None, **values: Any
    ) -> None:
        """Mark a forward sent and, in the same transaction, move its message on."""
        self._forward_done(forward_id, "sent", message_state, None, values)

    def forward_failed(
        self,
        forward_id: str,
        error: str,
        *,
        message_state: MessageState | None = None,
        **values: Any,
    ) -> None:
        self._forward_done(forward_id, "failed", message_state, error, values)

    def _forward_done(
        self,
        forward_id: str,
        status: str,
        message_state: MessageState | None,
        error: str | None,
        values: dict[str, Any],
    ) -> None:
        stamp = now_iso()
        with self.transaction() as conn:
            row = conn.execute(
                "UPDATE forwards SET status = ?, attempts = attempts + 1, last_error = ?, "
                "sent = CASE WHEN ? = 'sent' THEN ? ELSE sent END WHERE forward_id = ? "
                "RETURNING message",
                (status, error, status, stamp, forward_id),
            ).fetchone()
            if message_state is not None or values:
                updates = dict(values, updated=stamp)
                if message_state is not None:
                    updates["state"] = str(message_state)
                assignments = ", ".join(f"{k} = ?" for k in updates)
                conn.execute(
                    f"UPDATE messages SET {assignments} WHERE id = ?",
                    (*updates.values(), row["message"]),
                )
                if message_state is not None:
                    self._decide(conn, row["message"])

    def forward_attempted(self, forward_id: str, error: str) -> None:
        """A temporary failure: the forward stays pending."""
        self.execute(
            "UPDATE forwards SET attempts = attempts + 1, last_error = ? WHERE forward_id = ?",
            (error, forward_id),
        )

    # --- corrections and confirmations -------------------------------------------------------

    def correction(self, correction_id: int) -> CorrectionRecord | None:
        rows = self.query("SELECT * FROM corrections WHERE id = ?", (correction_id,))
        return _row(CorrectionRecord, rows[0]) if rows else None

    def correction_by_mail(self, mail_id: str) -> CorrectionRecord | None:
        """The latest correction recorded for this correction mail (by its content hash)."""
        rows = self.query(
            "SELECT * FROM corrections WHERE mail_id = ? ORDER BY id DESC LIMIT 1", (mail_id,)
        )
        return _row(CorrectionRecord, rows[0]) if rows else None

    def add_correction(self, **values: Any) -> CorrectionRecord:
        """Record a correction mail (``created`` defaults to now)."""
        values.setdefault("created", now_iso())
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        rowid = self.execute(
            f"INSERT INTO corrections ({columns}) VALUES ({marks})", tuple(values.values())
        )
        found = self.correction(rowid)
        assert found is not None
        return found

    def update_correction(self, correction_id: int, **values: Any) -> None:
        assignments = ", ".join(f"{k} = ?" for k in values)
        self.execute(
            f"UPDATE corrections SET {assignments} WHERE id = ?", (*values.values(), correction_id)
        )

    def corrections_count(
        self,
        since: str,
        *,
        by: str | None = None,
        domain: str | None = None,
        refused: bool = False,
    ) -> int:
        """Corrections recorded since ``since`` (ISO time), refused ones aside unless asked
        (caps count without them; ``status`` counts them all)."""
        sql = "SELECT COUNT(*) AS n FROM corrections WHERE created >= ?"
        if not refused:
            sql += " AND status != 'refused'"
        params: list[Any] = [since]
        if by is not None:
            sql += " AND by = ?"
            params.append(by)
        if domain is not None:
            sql += " AND domain = ?"
            params.append(domain)
        return int(self.query(sql, params)[0]["n"])

    def correction_rows(self, limit: int = 50) -> list[CorrectionRow]:
        rows = self.query(
            "SELECT c.id, c.created, c.by, c.command, c.old_label, c.new_label, c.status, "
            "c.example_id, c.auth, COALESCE(m.subject, '') AS subject FROM corrections c "
            "LEFT JOIN messages m ON m.id = c.message ORDER BY c.id DESC LIMIT ?",
            (limit,),
        )
        return [_row(CorrectionRow, r) for r in rows]

    def add_confirmation(
        self, correction: int, ref_hash: str, address: str, expires: str
    ) -> ConfirmationRecord:
        """The confirmation request of a correction; the same one when it already exists."""
        self.execute(
            "INSERT OR IGNORE INTO confirmations (correction, ref_hash, address, status, created, "
            "expires) VALUES (?, ?, ?, 'new', ?, ?)",
            (correction, ref_hash, address, now_iso(), expires),
        )
        rows = self.query("SELECT * FROM confirmations WHERE correction = ?", (correction,))
        return _row(ConfirmationRecord, rows[0])

    def confirmation_by_ref(self, ref_hash: str) -> ConfirmationRecord | None:
        rows = self.query("SELECT * FROM confirmations WHERE ref_hash = ?", (ref_hash,))
        return _row(ConfirmationRecord, rows[0]) if rows else None

    def update_confirmation(self, confirmation: int, status: str) -> None:
        self.execute(
            "UPDATE confirmations SET status = ?, answered = ? WHERE id = ?",
            (status, now_iso(), confirmation),
        )

    def spam_since(self, since: str) -> list[int]:
        """Ids of the messages filed as spam since ``since`` (for the spam digest)."""
        rows = self.query(
            "SELECT id FROM messages WHERE state = 'spam' AND duplicate_of IS NULL "
            "AND updated > ? ORDER BY id",
            (since,),
        )
        return [int(r["id"]) for r in rows]

    # --- history and key-value --------------------------------------------------------------

    def history(self, limit: int = 20) -> list[HistoryEntry]:
        """The latest recorded decisions, newest first."""
        rows = self.query(
            "SELECT d.*, m.sender, m.subject, m.message_id FROM decisions d "
            "JOIN messages m ON m.id = d.message ORDER BY d.id DESC LIMIT ?",
            (limit,),
        )
        return [_row(HistoryEntry, r) for r in rows]

    def get(self, key: str, default: str | None = None) -> str | None:
        rows = self.query("SELECT value FROM kv WHERE key = ?", (key,))
        return rows[0]["value"] if rows else default

    def set(self, key: str, value: str) -> None:
        self.execute(
            "INSERT INTO kv (key, value, updated) VALUES (?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated = excluded.updated",
            (key, value, now_iso()),
        )

    def record_error(self, name: str, error: str) -> None:
        """Keep the latest error for ``status`` (best effort: recording must not fail the
        caller)."""
        data = {"at": now_iso(), "event": name, "error": error[:500]}
        with contextlib.suppress(MailRouterError):
            self.set(KEYS.LAST_ERROR, json.dumps(data, ensure_ascii=False))

    def close_held_corrections(
        self, held_id: str, status: str, example_id: str | None = None
    ) -> None:
        """The review of a held example (``corrections review``) closes the rows waiting on it:
        ``applied`` (then pointing at ``example_id``, the example it changed) or ``rejected``."""
        self.execute(
            "UPDATE corrections SET status = ?, example_id = COALESCE(?, example_id) "
            "WHERE example_id = ? AND status = 'held'",
            (status, example_id, held_id),
        )


def open_state(settings: Any) -> State:
    """The state database of these settings (``data_dir/state.db``)."""
    return State(settings.state_path)
