"""``mailrouter demo``: its choices, and one real run of the whole loop."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from mailrouter.dataset import Example
from mailrouter.demo import choose_correction, pick_held_out
from tests.conftest import REPO, STARTER, require


def _ex(text: str, label: str, split: str) -> Example:
    return Example.new(text, label, split=split, source="seed")


def test_held_out_takes_every_label_in_turn() -> None:
    examples = [_ex(f"{label} {i}", label, "test") for label in ("A", "B", "C") for i in range(5)]
    examples.append(_ex("train only", "A", "train"))
    picked = pick_held_out(examples, 7, "test")
    assert len(picked) == 7
    assert [e.label for e in picked] == ["A", "B", "C", "A", "B", "C", "A"]
    assert all(e.split == "test" for e in picked)
    assert len(pick_held_out(examples, 100, "test")) == 15


def _d(mid: str, route: str, department: str | None, confidence: float) -> SimpleNamespace:
    return SimpleNamespace(
        message_id=mid, route=route, department=department, confidence=confidence
    )


def test_correction_prefers_a_misroute_then_triage_then_confirms() -> None:
    expected = {"a": "RH", "b": "Finance", "c": "Support", "d": "RH"}
    misrouted = _d("b", "department", "RH", 0.9)
    triaged = _d("c", "triage", "Support", 0.3)
    right = [_d("a", "department", "RH", 0.8), _d("d", "department", "RH", 0.7)]
    chosen = choose_correction([*right, triaged, misrouted], expected)
    assert chosen is not None and chosen[0] is misrouted and chosen[1] == "Finance"
    chosen = choose_correction([*right, triaged], expected)
    assert chosen is not None and chosen[0] is triaged and chosen[1] == "Support"
    chosen = choose_correction(right, expected)
    assert chosen is not None and chosen[0] is right[1] and chosen[1] == "ok"
    assert choose_correction([], expected) is None


def test_demo_runs_the_loop(tmp_path: Path) -> None:
    require(STARTER.is_file(), f"{STARTER} is missing")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "COLUMNS": "140", "OLLAMA_HOST": "http://127.0.0.1:9"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "mailrouter", "demo", "--emails", "6"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        env={**env, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = " ".join(done.stdout.split())
    assert "classifier: baseline — no usable Ollama here" in out
    assert "expected" in out and "predicted" in out
    assert "routed automatically" in out
    assert "(confirmation request)" in out, "an unauthenticated correction is confirmed first"
    assert "(re-forward)" in out or "(answer)" in out
    assert "new example in examples.jsonl" in out
    assert "baseline retrained on" in out
    assert "demo finished" in out
    assert time.monotonic() - started < 120
    assert list(cwd.iterdir()) == []  # everything happened in a temp dir, now removed
