"""The nightly job: failures leave the model in service alone, the scheduler runs it once at a time.

The runner really starts (child process, real mlx-lm) and is really killed or timed out; the model
in service is the tiny model's GGUF published on the Ollama-compatible server, so "untouched" is
checked on the server itself, by digest.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from apscheduler.events import EVENT_JOB_MAX_INSTANCES
from filelock import FileLock

from mailrouter.config import Settings
from mailrouter.dataset import Dataset
from mailrouter.scheduling import build_scheduler
from mailrouter.state import State
from mailrouter.training import publish, registry
from mailrouter.training.job import run_job
from tests.fixtures.ollama import publish_gguf
from tests.training_setup import starter_slice, tiny_settings, write_examples

pytestmark = pytest.mark.timeout(600)


def digests(url: str) -> dict[str, str]:
    models = httpx.get(f"{url}/api/tags", timeout=30).json()["models"]
    return {m["name"]: m["digest"] for m in models}


@pytest.fixture
def served(tmp_path: Path, tiny_model: Path, tiny_gguf: Path, ollama_server) -> Settings:
    """Settings whose model in service (v1, the tiny model) is published and recorded."""
    namespace = f"mrjob{os.getpid()}{tmp_path.name[-6:].lower()}"
    settings = tiny_settings(tmp_path / "data", tiny_model, ollama_server.url, namespace)
    write_examples(settings.examples_path, starter_slice())
    name = publish.version_name(settings, "v1")
    publish_gguf(ollama_server.url, tiny_gguf, name)
    with State(settings.state_path) as state:
        registry.add_version(state, "v1", name, {"ollama": {"accuracy": 0.2, "macro_f1": 0.1}})
        publish.promote(settings, state, "v1")
    return settings


def _service_snapshot(settings: Settings) -> tuple[str | None, str]:
    with State(settings.state_path) as state:
        current = registry.in_service(state)
    latest = digests(settings.classifier.ollama_host)[publish.latest_name(settings)]
    return (current.version if current else None), latest


def _processes_mentioning(text: str, parent: int | None = None) -> list[int]:
    """Live processes whose command line mentions ``text`` (Linux /proc), children of ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        if text in cmdline and state != "Z" and parent in (None, int(ppid)):
            found.append(int(entry.name))
    return found


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.2)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
@pytest.mark.parametrize("victim", ["mlx_lm", "runner"])
def test_killed_training_leaves_the_model_in_service_and_the_next_run_retries(
    served: Settings, victim: str
) -> None:
    before = _service_snapshot(served)
    runs = served.models_dir / "runs"
    result: list = []
    worker = threading.Thread(
        target=lambda: result.append(run_job(served, iters=10_000)), daemon=True
    )
    worker.start()
    # mlx_lm is running once its config is on a live process's command line.
    _wait_for(lambda: bool(_processes_mentioning(f"{runs}/0001/run.yaml")))
    if victim == "mlx_lm":
        targets = _processes_mentioning(f"{runs}/0001/run.yaml")
    else:  # this test's runner only: other tests may be training in parallel
        targets = _processes_mentioning("mailrouter.training.runner", parent=os.getpid())
    assert targets
    for pid in targets:
        os.kill(pid, signal.SIGKILL)
    worker.join(120)
    (outcome,) = result
    assert outcome.decision == "failed"
    assert "SIGKILL" in outcome.reason or "signal 9" in (outcome.error or outcome.reason)
    assert _service_snapshot(served) == before
    assert not _processes_mentioning(f"{runs}/0001/")  # no orphan left training
    with State(served.state_path) as state:
        record = registry.run(state, outcome.run_id)
        assert record.decision == "failed" and record.error
        assert registry.last_trained_hash(state) is None  # a failure does not count as trained


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_timeout_kills_the_whole_run_and_the_next_run_retries(served: Settings) -> None:
    before = _service_snapshot(served)
    outcome = run_job(served, iters=10_000, timeout=15)
    assert outcome.decision == "failed" and "timed out after 15 s" in outcome.reason
    assert _service_snapshot(served) == before
    assert not _processes_mentioning(str(served.models_dir / "runs" / "0001"))

    # The next run trains again (it is not skipped) and its candidate is judged: with an
    # impossible required gain it is rejected, and the model in service still stays.
    strict = served.model_copy(
        update={"training": served.training.model_copy(update={"min_accuracy_gain": 2.0})}
    )
    again = run_job(strict, iters=2)
    assert again.decision == "rejected", again.error
    assert "in service" in again.reason
    assert _service_snapshot(served) == before
    with State(served.state_path) as state:
        assert registry.run(state, again.run_id).metrics["current"]["source"] == "ollama"


def test_scheduler_runs_the_job_once_skips_unchanged_data_and_never_overlaps(
    served: Settings,
) -> None:
    # The data was already trained on: a run has nothing to do and says so.
    with State(served.state_path) as state:
        done = registry.start_run(state)
        registry.finish_run(
            state,
            done,
            "rejected",
            "earlier run",
            dataset_hash=Dataset(served.examples_path).content_hash(),
        )
    results: list = []
    started = threading.Event()

    def training() -> None:
        started.set()
        results.append(run_job(served))

    noop = lambda: None  # noqa: E731
    scheduler = build_scheduler(served, training=training, digest=None, retry=noop, heartbeat=noop)
    refused: list = []
    scheduler.add_listener(lambda e: refused.append(e.job_id), EVENT_JOB_MAX_INSTANCES)
    job = scheduler.get_job("training")
    # APScheduler's own computation of the next 02:00, from a fake clock at 01:59 local time.
    fake_now = datetime.now(job.trigger.timezone).replace(
        hour=1, minute=59, second=0, microsecond=0
    )
    upcoming = job.trigger.get_next_fire_time(None, fake_now)
    assert (upcoming - fake_now) == timedelta(minutes=1)
    assert job.misfire_grace_time == served.training.misfire_grace_seconds
    assert job.max_instances == 1
    scheduler.start(paused=True)
    try:
        job.modify(next_run_time=datetime.now(job.trigger.timezone))
        scheduler.resume()
        assert started.wait(30)
        # While it runs, a second firing is refused by APScheduler (max_instances=1).
        job.modify(next_run_time=datetime.now(job.trigger.timezone))
        _wait_for(lambda: bool(refused) or bool(results), 60)
        _wait_for(lambda: bool(results), 120)
    finally:
        scheduler.shutdown(wait=True)
    assert refused == ["training"]
    assert [r.decision for r in results] == ["skipped"], results
    assert "no example" in results[0].reason

    # And the lock refuses a training started any other way meanwhile (`train --now`).
    with FileLock(str(served.models_dir / "training.lock")):
        assert run_job(served).decision == "busy"
