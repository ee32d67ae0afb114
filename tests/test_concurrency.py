"""Concurrent classification: several Ollama requests in flight, the round's results unchanged.

Everything runs against real servers: Dovecot, the aiosmtpd sink and the llama.cpp
Ollama-compatible test server (``tests/ollama_server.py``) with the tiny fine-tuned model. A private
server is started where a test needs its load options (``--parallel``, ``--latency-ms``) or its
test-only hook (``--fail-prompt``: a 500 for the one prompt that contains a chosen text).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest

from mailrouter.classify.ollama import OllamaClassifier
from mailrouter.config import Settings, load_settings
from mailrouter.dataset import Dataset
from mailrouter.localservers import (
    DovecotServer,
    ImapAccount,
    SmtpSink,
    local_config,
    write_toml,
)
from mailrouter.mail.parse import parse_email
from mailrouter.pipeline.types import RoundReport
from mailrouter.prediction import ClassifyInput
from mailrouter.router import decide
from mailrouter.state import State
from mailrouter.training.evaluation import evaluate
from mailrouter.wiring import build_pipeline
from tests.conftest import STARTER
from tests.fixtures.mail import examples_for_mail, make_email
from tests.fixtures.ollama import OllamaEndpoint, publish_gguf, start_test_server

MODEL = "mailrouter-concurrency:latest"
MARK = "NUMERO-DE-DOSSIER-4242"


@pytest.fixture
def server(tmp_path: Path, trained_gguf: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """``server(*args)``: a private test server with the fine-tuned tiny model as MODEL."""
    started: list[OllamaEndpoint] = []

    def start(*args: str) -> OllamaEndpoint:
        endpoint = start_test_server(tmp_path / f"store{len(started)}", *args)
        started.append(endpoint)
        publish_gguf(endpoint.url, trained_gguf, MODEL)
        return endpoint

    try:
        yield start
    finally:
        for endpoint in started:
            endpoint.stop()


@pytest.fixture
def router(
    dovecot: DovecotServer, smtp_sink: SmtpSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """``router(name, url, mails, **classifier) -> Settings``: a router on a fresh mailbox
    holding ``mails`` and its own data folder (state database), classifying through ``url``."""

    def make(name: str, url: str, mails: list[bytes], **classifier: Any) -> Settings:
        work = tmp_path / name
        work.mkdir()
        monkeypatch.setenv("MAILROUTER_DATA_DIR", str(work))
        account = dovecot.add_user()
        account.append(mails)
        return _settings(work, account, smtp_sink, url, **classifier)

    return make


def _settings(
    work: Path, account: ImapAccount, sink: SmtpSink, url: str, **classifier: Any
) -> Settings:
    conf = local_config(
        account,
        sink,
        work,
        classifier={
            "backend": "ollama",
            "ollama_host": url,
            "model": MODEL,
            "zero_shot_model": "mailrouter-no-zero-shot",
            "timeout_seconds": 60,
            "confidence_threshold": 0.3,  # the tiny model is unsure: let it route some mail
            **classifier,
        },
        mailbox={"batch_size": 5},
    )
    return load_settings(write_toml(conf, work / "mailrouter.toml"))


def _run(settings: Settings) -> RoundReport:
    pipeline = build_pipeline(settings)
    try:
        return pipeline.run_once()
    finally:
        pipeline.close()


def _starter_mails(data_dir: Path) -> list[bytes]:
    """The starter test split as mail, then a follow-up of each of the first five from its
    sender (those routed to a department are followed by their conversation) and a second copy
    of the second, batches later (filed as a copy)."""
    mails = [raw for _, raw in examples_for_mail(data_dir, "test")]
    follow_ups = []
    for raw in mails[:5]:
        first = message_from_bytes(raw)
        follow_ups.append(
            make_email(
                f"Re: {first['Subject']}",
                "Merci, une precision sur ma demande.",
                sender=str(first["From"]),
                headers={"In-Reply-To": str(first["Message-ID"])},
            )
        )
    return [*mails, *follow_ups, mails[1]]


def _recorded(settings: Settings) -> dict[str, Any]:
    """Per message (by UID): its route and decision, and its ``decisions`` rows in order."""
    with State(settings.state_path) as state:
        messages = state.query(
            "SELECT id, uid, route, label, department, destination, confidence, reason, state "
            "FROM messages ORDER BY uid"
        )
        rows = state.query(
            "SELECT message, state, route, label, destination, reason FROM decisions ORDER BY id"
        )
    out: dict[str, Any] = {}
    for m in messages:
        trail = [tuple(r)[1:] for r in rows if r["message"] == m["id"]]
        decision = tuple(m)[2:]
        out[m["uid"]] = (decision, trail)
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for uid in a:
        (route_a, trail_a), (route_b, trail_b) = a[uid], b[uid]
        confidence_a, confidence_b = route_a[4], route_b[4]
        assert route_a[:4] + route_a[5:] == route_b[:4] + route_b[5:], uid
        if confidence_a is None or confidence_b is None:
            assert confidence_a == confidence_b, uid
        else:
            assert confidence_a == pytest.approx(confidence_b, abs=1e-6), uid
        assert trail_a == trail_b, uid


def test_concurrency_changes_no_decision_nor_the_order_of_state_transitions(
    server: Any, router: Any, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    """The same mail at concurrency 1 and 4 (batches of 5, so predictions are asked a batch
    ahead): the same route, label, confidence and reason for every message, the same
    ``decisions`` rows in the same order, the same forwards; and never more requests in flight
    than ``classifier.concurrency``."""
    endpoint = server("--parallel", "8", "--latency-ms", "100")
    recorded, delivered = {}, {}
    for concurrency in (1, 4):
        mails = _starter_mails(_starter_copy(tmp_path))
        settings = router(f"c{concurrency}", endpoint.url, mails, concurrency=concurrency)
        before = len(smtp_sink.delivered())
        report = _run(settings)
        assert report.seen == len(mails) and report.waiting == 0
        assert endpoint.load()["max_in_flight"] == concurrency
        assert _run(settings).seen == 0
        recorded[concurrency] = _recorded(settings)
        delivered[concurrency] = sorted(
            (d.rcpt_tos, d.message()["Subject"]) for d in smtp_sink.delivered()[before:]
        )
    follow_ups = [recorded[4][uid][0] for uid in range(len(mails) - 5, len(mails))]
    assert any(decision[5].startswith("thread #") for decision in follow_ups)
    assert recorded[4][len(mails)][0][0] == "duplicate"
    _same(recorded[1], recorded[4])
    assert delivered[1] == delivered[4]


def test_one_failing_request_only_affects_its_own_email(
    server: Any, router: Any, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    """Among thirteen emails asked four at a time (the default concurrency), the one whose
    prompt the server refuses waits for a later round (``on_error = "wait"``) or goes to triage
    (``"triage"``); every other one is routed exactly as its own prediction says, and the
    classifier is not taken for down."""
    endpoint = server("--fail-prompt", MARK)
    mails = [raw for _, raw in examples_for_mail(_starter_copy(tmp_path), "test")][:12]
    failing = make_email("Suivi de dossier", f"Bonjour, ou en est le dossier {MARK} ? Merci.")
    mails.insert(5, failing)
    for policy in ("wait", "triage"):
        settings = router(policy, endpoint.url, mails, on_error=policy)
        report = _run(settings)
        assert report.seen == len(mails)
        recorded = _recorded(settings)
        failed_uid = 6
        expected = _expected_routes(settings, mails)
        for uid, (decision, _) in recorded.items():
            if uid == failed_uid:
                continue
            assert (decision[0], decision[2]) == expected[uid], uid
        forwarded = sum(kind in ("department", "triage") for kind, _ in expected.values())
        if policy == "wait":
            assert report.waiting == 1 and failed_uid not in recorded
            assert report.forwarded == forwarded
            again = _run(settings)  # it is asked again next round, and waits again: no loop
            assert (again.seen, again.waiting, again.forwarded) == (1, 1, 0)
        else:
            decision, _ = recorded[failed_uid]
            assert decision[0] == "triage" and "answered 500" in decision[5]
            assert report.waiting == 0 and report.forwarded == forwarded + 1


def _starter_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "starter"
    folder.mkdir(exist_ok=True)
    (folder / "examples.jsonl").write_bytes(STARTER.read_bytes())
    return folder


def _expected_routes(settings: Settings, mails: list[bytes]) -> dict[int, tuple[str, str | None]]:
    """(route, department) each email gets from its own prediction, asked alone."""
    classifier = OllamaClassifier.from_settings(settings)
    out = {}
    for uid, raw in enumerate(mails, 1):
        if MARK.encode() in raw:
            continue
        email = parse_email(raw)
        route = decide(classifier.classify(ClassifyInput.from_email(email)), email, settings)
        out[uid] = (route.kind, route.department)
    return out


def test_a_server_that_does_not_answer_makes_the_round_wait_once(
    server: Any, router: Any, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    """Requests that time out, four at a time: the round ends after about one timeout, not one
    per email, with every email still in the folder for the next round."""
    endpoint = server("--latency-ms", "5000")
    mails = [raw for _, raw in examples_for_mail(_starter_copy(tmp_path), "test")][:12]
    settings = router("slow", endpoint.url, mails, timeout_seconds=1)
    started = time.monotonic()
    report = _run(settings)
    assert time.monotonic() - started < 6
    assert (report.seen, report.waiting, report.forwarded) == (12, 12, 0)
    assert _recorded(settings) == {}


def test_evaluation_at_concurrency_4_equals_the_sequential_one_on_the_starter_test_split(
    ollama_server: OllamaEndpoint, trained_ollama_model: str
) -> None:
    from tests.test_ollama import settings_for

    examples = Dataset(STARTER).split("test")
    reports = {}
    for concurrency in (1, 4):
        settings = settings_for(ollama_server.url, trained_ollama_model, concurrency=concurrency)
        classifier = OllamaClassifier.from_settings(settings)
        reports[concurrency] = evaluate(classifier, examples, settings.departments, 0.6)
        batch = classifier.classify_many([e.to_input() for e in examples])
        assert [p.raw for p in batch] == [classifier.classify(e.to_input()).raw for e in examples]
    sequential, concurrent = reports[1].items, reports[4].items
    assert [(i.id, i.predicted) for i in sequential] == [(i.id, i.predicted) for i in concurrent]
    for a, b in zip(sequential, concurrent, strict=True):
        assert a.confidence == pytest.approx(b.confidence, abs=1e-6)
