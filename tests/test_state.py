"""The state database: migrations, lifecycle transitions, forwards, history, resume."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from mailrouter.state import MIGRATIONS, MessageState, NewForward, State, StateError


def _add(db: State, uid: int = 1, **extra: object) -> int:
    return db.add_message(
        "contact/INBOX", 7, uid, content_hash=f"h{uid}", message_id=f"<{uid}@x>", **extra
    ).id


def test_migrations_are_recorded_and_wal_is_on(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with State(path) as state:
        assert state.schema_version() == MIGRATIONS[-1][0]
        rows = state.query("SELECT version, name FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == [m[0] for m in MIGRATIONS]
        assert state.query("PRAGMA journal_mode")[0][0] == "wal"
        tables = {r[0] for r in state.query("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {
        "messages",
        "forwards",
        "decisions",
        "corrections",
        "models",
        "training_runs",
        "kv",
    } <= tables
    with State(path) as again:  # reopening applies nothing twice
        assert len(again.query("SELECT * FROM schema_migrations")) == len(MIGRATIONS)


def test_an_older_database_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as conn:  # a database written by the version before migration 4
        conn.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT, applied TEXT)"
        )
        for version, name, sql in MIGRATIONS[:3]:
            conn.executescript(sql)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?, 'then')", (version, name))
        conn.execute(
            "INSERT INTO messages (mailbox, uidvalidity, uid, content_hash, state, created, "
            "updated) VALUES ('contact/INBOX', 7, 1, 'h1', 'forwarding', 'then', 'then')"
        )
    with State(path) as state:
        assert state.schema_version() == MIGRATIONS[-1][0]
        index = state.query("PRAGMA index_info('messages_state')")
        assert [r["name"] for r in index] == ["mailbox", "state"]
        assert [r.uid for r in state.pending("contact/INBOX")] == [1]


def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    State(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (999, 'future', 'now')")
    with pytest.raises(StateError, match="upgrade mailrouter"):
        State(path)


def test_lifecycle_and_history(tmp_path: Path) -> None:
    with State(tmp_path / "s.db") as state:
        mid = _add(state, state=MessageState.CLASSIFIED, route="department", department="RH",
                   destination="rh@x.org", outcome="filed", folder="routed")  # fmt: skip
        spec = NewForward("route", "rh@x.org", "RH", "corp.example", lambda fid: f"t-{fid}")
        forward = state.add_forward(mid, spec)
        assert forward.message_id == f"<fwd-{forward.forward_id}@corp.example>"
        assert forward.token == f"t-{forward.forward_id}" and forward.status == "pending"
        assert state.message(mid).state == MessageState.FORWARDING
        assert state.open_forward(mid) == forward
        assert state.forward_by(token=forward.token) == forward
        assert state.forward_by(message_id=forward.message_id) == forward
        state.forward_sent(forward.forward_id, message_state=MessageState.FORWARDED)
        assert state.open_forward(mid) is None
        assert state.forward(forward.forward_id).status == "sent"
        assert [r.id for r in state.pending()] == [mid]
        state.finalize([(mid, MessageState.FILED)])
        assert state.pending() == [] and state.counts() == {"filed": 1}
        assert [h.state for h in state.history(10)] == [
            "filed",
            "forwarded",
            "forwarding",
            "classified",
        ]


def test_pending_respects_retry_time(tmp_path: Path) -> None:
    with State(tmp_path / "s.db") as state:
        mid = _add(state, state=MessageState.CLASSIFIED)
        state.update(mid, next_attempt_at=4102444800.0)  # 2100
        assert state.pending(due=True) == []
        assert [r.id for r in state.pending()] == [mid]


def test_copies_are_found_by_bytes_or_fingerprint(tmp_path: Path) -> None:
    with State(tmp_path / "s.db") as state:
        mid = state.add_message("c/INBOX", 1, 5, content_hash="abc", fingerprint="fp").id
        assert state.find_copy("c/INBOX", "abc", "other").id == mid
        assert state.find_copy("c/INBOX", "zzz", "fp").id == mid
        assert state.find_copy("c/INBOX", "zzz", "") is None
        assert state.find_copy("other/INBOX", "abc", "fp") is None
        assert state.known_uids("c/INBOX", 1) == {5: MessageState.NEW}
        assert state.find("c/INBOX", 1, 5).id == mid


def test_identity_is_unique(tmp_path: Path) -> None:
    """A refused write is a StateError that names the likely cause, and is rolled back."""
    with State(tmp_path / "s.db") as state:
        _add(state)
        with pytest.raises(StateError, match=r"UNIQUE constraint.*one `mailrouter serve`"):
            _add(state)
        assert not state.conn.in_transaction
        with pytest.raises(StateError, match="FOREIGN KEY"):
            state.execute("INSERT INTO decisions (message, at, state) VALUES (999, 'now', 'new')")
        state.set("still", "writable")
        assert state.get("still") == "writable"


def test_database_files_are_private(tmp_path: Path) -> None:
    """The database, its -wal and -shm hold customer text: owner only, even under umask 022,
    and even when an older version left them readable."""
    folder = tmp_path / "data"
    folder.mkdir(mode=0o755)
    (folder / "s.db-wal").write_bytes(b"")
    os.chmod(folder / "s.db-wal", 0o644)
    with State(folder / "s.db") as state:
        _add(state)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {"s.db": 0o600, "s.db-wal": 0o600, "s.db-shm": 0o600}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_key_value(tmp_path: Path) -> None:
    with State(tmp_path / "s.db") as state:
        assert state.get("last_poll") is None
        state.set("last_poll", "1")
        state.set("last_poll", "2")
        assert state.get("last_poll") == "2"


def test_two_connections_see_each_other(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with State(path) as one, State(path) as two:
        mid = _add(one)
        assert two.message(mid).uid == 1
