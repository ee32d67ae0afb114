"""``mailrouter status``: what the service is doing, read from the state database only.

The running service writes a heartbeat into the ``kv`` table (:data:`KEYS`); everything else
comes from the rows the router, the corrections and the training write. Reading never starts,
contacts or changes anything, so ``status`` is safe while the service runs.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from .config import Settings
from .scheduling import next_training
from .state import KEYS, State
from .training import registry

# A heartbeat older than this means the process is gone or hung.
STALE_SECONDS = 120

ROUTED = ("forwarded", "filed")


@dataclass
class ServiceHealth:
    state: str  # running | stalled | stopped | never started
    pid: int | None = None
    started: str | None = None
    heartbeat_age: float | None = None
    last_poll: str | None = None
    stopped: str | None = None


@dataclass
class ModelInfo:
    version: str
    name: str
    created: str
    accuracy: float | None


@dataclass
class TrainingInfo:
    started: str
    ended: str | None
    decision: str | None
    reason: str | None
    error: str | None

    @property
    def outcome(self) -> str:
        if self.error:
            return f"failed: {self.error}"
        if self.ended is None:
            return "running"
        return f"{self.decision or 'done'}" + (f" ({self.reason})" if self.reason else "")


@dataclass
class Status:
    service: ServiceHealth
    backlog: int = 0
    routed_today: dict[str, int] = field(default_factory=dict)
    triaged_today: int = 0
    spam_today: int = 0
    failed_today: int = 0
    corrections_7d: int = 0
    model: ModelInfo | None = None
    last_training: TrainingInfo | None = None
    next_training: str | None = None
    last_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.last_training is not None:
            data["last_training"]["outcome"] = self.last_training.outcome
        return data


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _local_midnight_utc(now: datetime) -> str:
    local = now.astimezone()
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight.astimezone(UTC).isoformat(timespec="seconds")


def health(state: State, now: float | None = None) -> ServiceHealth:
    now = time.time() if now is None else now
    pid_text, beat = state.get(KEYS.PID), state.get(KEYS.HEARTBEAT)
    if pid_text is None:
        return ServiceHealth("never started")
    pid = int(pid_text)
    age = now - float(beat) if beat else None
    stopped = state.get(KEYS.STOPPED)
    if stopped or not pid_alive(pid):
        kind = "stopped"
    elif age is not None and age > STALE_SECONDS:
        kind = "stalled"
    else:
        kind = "running"
    return ServiceHealth(
        state=kind,
        pid=pid,
        started=state.get(KEYS.STARTED),
        heartbeat_age=None if age is None else round(age, 1),
        last_poll=_iso(state.get(KEYS.LAST_POLL)),
        stopped=stopped,
    )


def _iso(stamp: str | None) -> str | None:
    if not stamp:
        return None
    try:
        return datetime.fromtimestamp(float(stamp), UTC).isoformat(timespec="seconds")
    except ValueError:
        return stamp


def _accuracy(metrics: dict[str, Any]) -> float | None:
    """The test accuracy in a model's metrics, wherever the training recorded it."""
    for path in (("accuracy",), ("test", "accuracy"), ("ollama", "accuracy"), ("mlx", "accuracy")):
        node: Any = metrics
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, int | float):
            return float(node)
    return None


def collect(settings: Settings, state: State | None, now: datetime | None = None) -> Status:
    """Everything ``status`` shows, as data; ``state`` is ``None`` before the first run."""
    now = now or datetime.now(UTC)
    upcoming = next_training(settings, now.astimezone())
    next_at = upcoming.isoformat(timespec="minutes") if upcoming else None
    if state is None:
        return Status(service=ServiceHealth("never started"), next_training=next_at)
    today = _local_midnight_utc(now)
    week = (now - timedelta(days=7)).astimezone(UTC).isoformat(timespec="seconds")
    status = Status(service=health(state, now.timestamp()), next_training=next_at)

    status.backlog = len(state.pending())
    for kind, department, n in state.outcomes_since(today):
        if kind in ROUTED:
            dep = department or "?"
            status.routed_today[dep] = status.routed_today.get(dep, 0) + n
        elif kind == "triaged":
            status.triaged_today += n
        elif kind == "spam":
            status.spam_today += n
        elif kind == "failed":
            status.failed_today += n
    status.corrections_7d = state.corrections_count(week, refused=True)

    model = registry.in_service(state)
    if model:
        status.model = ModelInfo(model.version, model.name, model.created, _accuracy(model.metrics))

    runs = registry.runs(state, limit=1)
    if runs:
        r = runs[0]
        status.last_training = TrainingInfo(r.started, r.ended, r.decision, r.reason, r.error)
    status.last_error = _last_error(state)
    return status


def _last_error(state: State) -> str | None:
    """The newest of the service's own last error and a message's last error."""
    found: list[tuple[str, str]] = []
    recorded = state.get(KEYS.LAST_ERROR)
    if recorded:
        try:
            data = json.loads(recorded)
            found.append((data["at"], f"{data['at']} {data['event']}: {data['error']}"))
        except (ValueError, KeyError, TypeError):
            pass
    newest = state.last_message_error()
    if newest:
        updated, message, error = newest
        found.append((updated, f"{updated} message {message}: {error}"))
    return max(found)[1] if found else None


def format_lines(status: Status) -> list[str]:
    """The human-readable report, one fact a line."""
    s = status.service
    if s.state == "never started":
        head = "service: never started (run `mailrouter serve` or `mailrouter service install`)"
    else:
        beat = f", heartbeat {s.heartbeat_age:.0f} s ago" if s.heartbeat_age is not None else ""
        head = f"service: {s.state} (pid {s.pid}, started {s.started}{beat})"
        if s.state == "stopped" and s.stopped:
            head = f"service: stopped at {s.stopped} (pid {s.pid} started {s.started})"
    routed = ", ".join(f"{k} {v}" for k, v in sorted(status.routed_today.items())) or "none"
    lines = [
        head,
        f"last poll: {s.last_poll or 'never'}",
        f"backlog: {status.backlog} message(s) not yet final",
        f"routed today: {routed}",
        f"triage today: {status.triaged_today}; spam today: {status.spam_today}; "
        f"failed today: {status.failed_today}",
        f"corrections (7 days): {status.corrections_7d}",
    ]
    if status.model:
        acc = f"{status.model.accuracy:.1%}" if status.model.accuracy is not None else "unknown"
        lines.append(
            f"model in service: {status.model.name} (version {status.model.version}, "
            f"test accuracy {acc}, since {status.model.created})"
        )
    else:
        lines.append("model in service: none yet (zero-shot or baseline until the first training)")
    if status.last_training:
        t = status.last_training
        lines.append(f"last training: {t.started} — {t.outcome}")
    else:
        lines.append("last training: never")
    lines.append(f"next training: {status.next_training or 'not scheduled'}")
    lines.append(f"last error: {status.last_error or 'none'}")
    return lines
