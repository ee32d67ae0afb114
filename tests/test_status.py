"""``mailrouter status``: the report built from the state database."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from typer.testing import CliRunner

from mailrouter.cli import app
from mailrouter.config import load_settings
from mailrouter.state import KEYS, MessageState, State, now_iso
from mailrouter.status import collect, format_lines


def _message(state: State, uid: int, final: MessageState, department: str | None = None) -> None:
    record = state.add_message("INBOX", 1, uid, content_hash=f"h{uid}", sender=f"s{uid}@x.test")
    state.update(record.id, final, department=department, label=department)


def _fill(state: State) -> None:
    _message(state, 1, MessageState.FILED, "RH")
    _message(state, 2, MessageState.FILED, "RH")
    _message(state, 3, MessageState.FILED, "Finance")
    _message(state, 4, MessageState.TRIAGED)
    _message(state, 5, MessageState.SPAM, "SPAM")
    state.add_message("INBOX", 1, 6, content_hash="h6")  # new: the backlog
    state.update(6, last_error="SMTP 451 try again later", attempts=1)
    state.execute(
        "INSERT INTO corrections (by, command, old_label, new_label, status, created) "
        "VALUES ('boss@example.com', 'Finance', 'RH', 'Finance', 'applied', ?)",
        (now_iso(),),
    )
    state.execute(
        "INSERT INTO models (version, name, created, metrics, status) VALUES "
        "('v2', 'mailrouter:v2', ?, ?, 'in_service')",
        (now_iso(), json.dumps({"test": {"accuracy": 0.9375, "macro_f1": 0.93}})),
    )
    state.execute(
        "INSERT INTO training_runs (started, ended, decision, reason) VALUES (?, ?, ?, ?)",
        (now_iso(), now_iso(), "published", "accuracy 0.94 >= 0.88"),
    )
    state.set(KEYS.PID, str(os.getpid()))
    state.set(KEYS.STARTED, now_iso())
    state.set(KEYS.HEARTBEAT, f"{time.time():.3f}")
    state.set(KEYS.LAST_POLL, f"{time.time():.3f}")
    state.set(KEYS.STOPPED, "")


def test_collect_reads_everything(data_dir: Path) -> None:
    settings = load_settings(None)
    with State(settings.state_path) as state:
        _fill(state)
        status = collect(settings, state)
    assert status.service.state == "running"
    assert status.service.pid == os.getpid()
    assert status.backlog == 1
    assert status.routed_today == {"RH": 2, "Finance": 1}
    assert (status.triaged_today, status.spam_today, status.failed_today) == (1, 1, 0)
    assert status.corrections_7d == 1
    assert status.model is not None and status.model.accuracy == 0.9375
    assert status.last_training is not None
    assert status.last_training.outcome.startswith("published")
    assert status.next_training is not None and "T02:00" in status.next_training
    assert status.last_error is not None and "SMTP 451" in status.last_error
    text = "\n".join(format_lines(status))
    assert "service: running" in text
    assert "routed today: Finance 1, RH 2" in text
    assert "test accuracy 93.8%" in text


def test_stale_heartbeat_and_dead_pid(data_dir: Path) -> None:
    settings = load_settings(None)
    with State(settings.state_path) as state:
        state.set(KEYS.PID, str(os.getpid()))
        state.set(KEYS.HEARTBEAT, f"{time.time() - 3600:.3f}")
        assert collect(settings, state).service.state == "stalled"
        state.set(KEYS.PID, "999999999")
        assert collect(settings, state).service.state == "stopped"


def test_cli_status_json_and_never_started(data_dir: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["status"])
    assert res.exit_code == 0, res.output
    assert "service: never started" in res.output
    assert not (data_dir / "state.db").exists()  # reading created nothing

    with State(data_dir / "state.db") as state:
        _fill(state)
    res = runner.invoke(app, ["status", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["service"]["state"] == "running"
    assert data["routed_today"] == {"RH": 2, "Finance": 1}
    assert data["last_training"]["outcome"].startswith("published")
