"""The model registry in the state database: published versions and training runs.

``models`` holds one row per version published to Ollama (``v1``, ``v2``…), exactly one of them
``in_service``; ``training_runs`` holds one row per run, including skipped and failed ones, so
``mailrouter status`` and ``models list`` tell the whole story. Metrics, counts and parameters are
JSON. A run still marked ``running`` whose process is gone (the machine crashed mid-run) is closed
as ``failed`` by the next run, which holds the training lock and so knows nobody else is running.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..state import State, now_iso

RUNNING = "running"


@dataclass(frozen=True)
class ModelVersion:
    version: str  # "v3"
    name: str  # "mailrouter:v3"
    created: str
    status: str  # in_service | retired | rejected
    metrics: dict[str, Any]

    @property
    def number(self) -> int:
        return version_number(self.version)

    @property
    def best_metrics(self) -> dict[str, Any]:
        """Its scores through Ollama (what the router gets), else the MLX ones."""
        found = self.metrics.get("ollama") or self.metrics.get("mlx") or {}
        return found if isinstance(found, dict) else {}


@dataclass(frozen=True)
class RunRecord:
    id: int
    started: str
    ended: str | None
    dataset_hash: str | None
    base_model: str | None
    decision: str | None
    reason: str | None
    error: str | None
    counts: dict[str, Any]
    params: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def rule(self) -> str | None:
        """The promotion-gate rule that decided this run (``None`` when the gate did not run)."""
        gate = self.metrics.get("gate")
        return gate.get("rule") if isinstance(gate, dict) else None


def version_number(version: str) -> int:
    return int(version.lstrip("v"))


def _json(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _dump(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


# --- models --------------------------------------------------------------------------------


def versions(state: State) -> list[ModelVersion]:
    """Every recorded version, newest first."""
    rows = state.query("SELECT * FROM models")
    found = [
        ModelVersion(r["version"], r["name"], r["created"], r["status"], _json(r["metrics"]))
        for r in rows
    ]
    return sorted(found, key=lambda m: m.number, reverse=True)


def in_service(state: State) -> ModelVersion | None:
    return next((m for m in versions(state) if m.status == "in_service"), None)


def next_version(state: State) -> str:
    """One more than any version ever recorded: a number is never reused, even after a delete."""
    used = [m.number for m in versions(state)]
    last = state.get("training.last_version")
    if last:
        used.append(int(last))
    return f"v{max(used, default=0) + 1}"


def add_version(state: State, version: str, name: str, metrics: dict[str, Any]) -> None:
    """Record a version just created on Ollama, not yet in service (``retired`` until promoted)."""
    with state.transaction() as conn:
        conn.execute(
            "INSERT INTO models (version, name, created, metrics, status) VALUES (?, ?, ?, ?, ?)",
            (version, name, now_iso(), _dump(metrics), "retired"),
        )
        conn.execute(
            "INSERT INTO kv (key, value, updated) VALUES ('training.last_version', ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated = excluded.updated",
            (str(version_number(version)), now_iso()),
        )


def set_status(state: State, version: str, status: str, **metrics: Any) -> None:
    with state.transaction() as conn:
        if status == "in_service":
            conn.execute("UPDATE models SET status = 'retired' WHERE status = 'in_service'")
        row = conn.execute("SELECT metrics FROM models WHERE version = ?", (version,)).fetchone()
        merged = {**_json(row["metrics"] if row else None), **metrics}
        conn.execute(
            "UPDATE models SET status = ?, metrics = ? WHERE version = ?",
            (status, _dump(merged), version),
        )


def remove_version(state: State, version: str) -> None:
    state.execute("DELETE FROM models WHERE version = ?", (version,))


# --- training runs -------------------------------------------------------------------------


def start_run(state: State, *, params: dict[str, Any] | None = None) -> int:
    """A new run row marked ``running``; its id names the run folder."""
    return state.execute(
        "INSERT INTO training_runs (started, params, decision) VALUES (?, ?, ?)",
        (now_iso(), _dump(params or {}), RUNNING),
    )


def update_run(state: State, run_id: int, **fields: Any) -> None:
    """Set columns of a run; dict values are stored as JSON (merged into what is there)."""
    if not fields:
        return
    with state.transaction() as conn:
        row = conn.execute("SELECT * FROM training_runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            return
        values = {}
        for key, value in fields.items():
            if isinstance(value, dict):
                value = _dump({**_json(row[key]), **value})
            values[key] = value
        sql = ", ".join(f"{k} = ?" for k in values)
        conn.execute(f"UPDATE training_runs SET {sql} WHERE id = ?", (*values.values(), run_id))


def finish_run(state: State, run_id: int, decision: str, reason: str, **fields: Any) -> None:
    update_run(state, run_id, ended=now_iso(), decision=decision, reason=reason, **fields)


def run(state: State, run_id: int) -> RunRecord | None:
    rows = state.query("SELECT * FROM training_runs WHERE id = ?", (run_id,))
    return _run(rows[0]) if rows else None


def runs(state: State, limit: int = 20) -> list[RunRecord]:
    rows = state.query("SELECT * FROM training_runs ORDER BY id DESC LIMIT ?", (limit,))
    return [_run(r) for r in rows]


def last_trained_hash(state: State) -> str | None:
    """The dataset hash of the last run that finished training (published or rejected).

    Failed runs do not count: the next run retries them. Skipped runs carry no new information.
    """
    rows = state.query(
        "SELECT dataset_hash FROM training_runs WHERE decision IN ('published', 'rejected') "
        "ORDER BY id DESC LIMIT 1"
    )
    return rows[0]["dataset_hash"] if rows else None


def close_stale_runs(state: State, *, keep: int | None = None) -> int:
    """Mark runs left ``running`` by a process that died as failed; call while holding the lock.

    ``keep`` is the run about to execute (created ``running`` by the job that started us).
    """
    stale = state.query(
        "SELECT id FROM training_runs WHERE decision = ? AND id IS NOT ?", (RUNNING, keep)
    )
    for row in stale:
        finish_run(
            state,
            row["id"],
            "failed",
            "interrupted",
            error="the training process ended without recording a result (crash or power loss)",
        )
    return len(stale)


def _run(row: Any) -> RunRecord:
    return RunRecord(
        id=row["id"],
        started=row["started"],
        ended=row["ended"],
        dataset_hash=row["dataset_hash"],
        base_model=row["base_model"],
        decision=row["decision"],
        reason=row["reason"],
        error=row["error"],
        counts=_json(row["counts"]),
        params=_json(row["params"]),
        metrics=_json(row["metrics"]),
    )
