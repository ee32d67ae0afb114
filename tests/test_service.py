"""``mailrouter serve`` as a real child process against Dovecot and an SMTP sink."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailrouter.config import load_settings
from mailrouter.dataset import Dataset, Example
from mailrouter.localservers import ImapAccount, SmtpSink
from mailrouter.service import Service, log_file
from mailrouter.state import KEYS, State
from mailrouter.status import collect
from tests.fixtures.mail import attached

# Runs the CLI and reports, at a normal exit, whether anything imported MLX.
CHILD = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('MLX-LOADED' if any(m == 'mlx' or m.startswith('mlx.') "
    "or m.startswith('mlx_lm') for m in sys.modules) else 'MLX-ABSENT', flush=True))\n"
    "from mailrouter.cli import main\n"
    "main()\n"
)

EXAMPLES = {
    "RH": ["Candidature spontanee pour un poste de developpeur", "Demande de stage en alternance"],
    "Support": ["Mon imprimante ne fonctionne plus depuis la mise a jour", "Bug a la connexion"],
    "Commercial": ["Pouvez-vous m'envoyer un devis pour 20 licences", "Demande de tarifs"],
    "Finance": ["Facture impayee du mois dernier", "Relance de paiement de la facture 42"],
    "SPAM": ["Gagnez un iPhone gratuit en cliquant ici", "Promotion exceptionnelle casino"],
}


def _seed(data_dir: Path) -> None:
    examples = [
        Example.new(f"{text} ({n})", label, split=split, source="seed")
        for label, texts in EXAMPLES.items()
        for text in texts
        for n, split in enumerate(("train", "train", "valid", "test"))
    ]
    Dataset(data_dir / "examples.jsonl").add(examples)


def _mail(subject: str, body: str, sender: str = "client@customer.test") -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "contact@mailrouter.test"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{abs(hash(subject))}@customer.test>"
    msg.set_content(body)
    return msg.as_bytes()


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _serve(config: Path, data_dir: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "MAILROUTER_DATA_DIR": str(data_dir)}
    env.pop("MAILROUTER_SUPERVISED", None)
    env.pop("INVOCATION_ID", None)
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, "--config", str(config), "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _terminate(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str, float]:
    """SIGTERM, then the child's output and how long it took to exit."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=timeout)
    return out, err, time.monotonic() - started


def _reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_serve_routes_then_stops_cleanly_on_sigterm(
    make_mail_config: Callable[..., Path],
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
    data_dir: Path,
) -> None:
    _seed(data_dir)
    config = make_mail_config(log={"format": "json"})
    proc = _serve(config, data_dir)
    try:
        state_path = data_dir / "state.db"
        _wait(state_path.exists, 30, "the state database")
        imap_account.append([_mail("Facture en retard", "Relance: la facture 42 reste impayee.")])
        sent = smtp_sink.wait_for(1, timeout=30)
        assert [m.rcpt_tos for m in sent] == [("finance@example.com",)]
        with State(state_path) as state:
            _wait(lambda: state.counts().get("filed") == 1, 20, "the message to be filed")
            status = collect(load_settings(config), state)
        assert status.service.state == "running" and status.service.pid == proc.pid
        assert status.routed_today == {"Finance": 1}

        out, err, elapsed = _terminate(proc, timeout=10)
    finally:
        _reap(proc)
    assert proc.returncode == 0, err[-3000:]
    assert elapsed < 10
    assert "MLX-ABSENT" in out, out
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    assert events[0] == "log_file"
    for name in ("service_started", "decision", "forwarded", "service_stopping", "service_stopped"):
        assert name in events, events
    # the same lines went to the rotating file under data/logs/
    logged = (data_dir / "logs" / "mailrouter.log").read_text()
    assert '"event": "service_stopped"' in logged
    with State(data_dir / "state.db") as state:
        assert collect(load_settings(config), state).service.state == "stopped"
    assert len(smtp_sink.delivered()) == 1


def test_sigterm_mid_round_finishes_the_message_in_hand(
    make_mail_config: Callable[..., Path],
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
    data_dir: Path,
) -> None:
    """SIGTERM during a long round: the child ends after the forward in hand; every message is
    then finished (forwarded once, filed), recorded with its forward not sent yet (the rest of
    its batch), or untouched in INBOX, and the next run forwards the rest, each exactly once."""
    import asyncio

    total = 30
    accept = smtp_sink.handle_DATA

    async def slow_data(*args: object) -> str:  # a slow server: the round lasts several seconds
        await asyncio.sleep(0.2)
        return await accept(*args)

    smtp_sink.handle_DATA = slow_data  # type: ignore[method-assign]
    _seed(data_dir)
    config = make_mail_config(log={"format": "json"})
    imap_account.append(
        [
            _mail(
                f"Facture {i} en retard",
                f"Relance: la facture {i} reste impayee.",
                sender=f"client{i}@customer.test",
            )
            for i in range(total)
        ]
    )
    proc = _serve(config, data_dir)
    try:
        smtp_sink.wait_for(1, timeout=60)
        _out, err, elapsed = _terminate(proc, timeout=15)
    finally:
        _reap(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "service_stop_forced" not in err and elapsed < 4, (elapsed, err[-3000:])
    done = len(smtp_sink.delivered())
    assert 1 <= done < total
    client = imap_account.client()
    client.select_folder("INBOX")
    left = len(client.search())
    client.logout()
    with State(data_dir / "state.db") as state:
        rows = state.query("SELECT state FROM messages")
    states = sorted(r["state"] for r in rows)
    assert states.count("filed") == done
    assert set(states) <= {"filed", "forwarding"}  # nothing else half-done
    assert left == total - done  # the others still in the inbox

    smtp_sink.handle_DATA = accept  # type: ignore[method-assign]
    once = subprocess.run(
        [sys.executable, "-m", "mailrouter", "--config", str(config), "serve", "--once"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "MAILROUTER_DATA_DIR": str(data_dir)},
    )  # fmt: skip
    assert once.returncode == 0, once.stderr[-3000:]
    originals = [attached(m)["Message-ID"] for m in smtp_sink.delivered()]
    assert len(originals) == total and len(set(originals)) == total


def test_second_signal_exits_at_once(make_mail_config: Callable[..., Path], data_dir: Path) -> None:
    config = make_mail_config()
    proc = _serve(config, data_dir)
    try:
        _wait(lambda: (data_dir / "state.db").exists(), 30, "the state database")
        time.sleep(0.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=10)
        assert time.monotonic() - started < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, 128 + signal.SIGINT)


def test_log_file_only_when_unsupervised(data_dir: Path) -> None:
    settings = load_settings(None)
    assert log_file(settings, {}) == data_dir / "logs" / "mailrouter.log"
    assert log_file(settings, {"MAILROUTER_SUPERVISED": "launchd"}) is None
    assert log_file(settings, {"INVOCATION_ID": "abc"}) is None  # systemd


class _DownRouter:
    """A router whose mailbox is down: every round fails; the third one asks the service to stop."""

    rounds = 0

    def __init__(self, service: Service) -> None:
        self.service = service

    def run_once(self, stop: object = None) -> None:
        from mailrouter.errors import MailboxError

        _DownRouter.rounds += 1
        if _DownRouter.rounds >= 3:
            self.service.request_stop()
        raise MailboxError("connecting to imap.test:993: connection refused")

    def wait_for_changes(self, timeout: float, stop_event: object) -> None:
        raise AssertionError("never reached: every round fails")

    def close(self) -> None:
        return None


def test_failures_are_retried_with_backoff_and_recorded(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mailrouter.service as service_module

    monkeypatch.setattr(service_module, "MAX_BACKOFF_SECONDS", 0.05)
    settings = load_settings(None)
    service = Service(settings, router_factory=lambda _s, _d: _DownRouter(service))
    assert service.run() == 0
    assert _DownRouter.rounds == 3  # a new router (a reconnection) after each failure
    with State(settings.state_path) as state:
        error = json.loads(state.get(KEYS.LAST_ERROR) or "{}")
        assert error["event"] == "round_failed" and "connection refused" in error["error"]
        assert state.get(KEYS.STOPPED)


class _IdleRouter:
    """A router with an empty mailbox: waits on the event like IMAP IDLE does."""

    def run_once(self, stop: object = None) -> None:
        return None

    def wait_for_changes(self, timeout: float, stop_event: threading.Event) -> None:
        stop_event.wait(timeout)

    def close(self) -> None:
        return None


def test_training_runs_as_a_child_and_is_stopped_with_the_service(data_dir: Path) -> None:
    settings = load_settings(None)
    failing = Service(
        settings,
        router_factory=lambda _s, _d: _IdleRouter(),
        training_cmd=[sys.executable, "-c", "raise SystemExit(3)"],
    )
    failing.state = State(settings.state_path)
    failing.train()  # what the nightly job runs: waits for the child
    error = json.loads(failing.state.get(KEYS.LAST_ERROR) or "{}")
    assert error["event"] == "training_failed" and "status 3" in error["error"]
    failing.state.close()

    service = Service(
        settings,
        router_factory=lambda _s, _d: _IdleRouter(),
        training_cmd=[sys.executable, "-c", "import time; time.sleep(120)"],
    )
    serving = threading.Thread(target=service.run)
    serving.start()
    training = threading.Thread(target=service.train)
    _wait(lambda: service.state is not None, 10, "the service to start")
    training.start()
    _wait(lambda: service._child is not None, 10, "the training child")
    child = service._child
    started = time.monotonic()
    service.request_stop()
    serving.join(15)
    training.join(15)
    assert not serving.is_alive() and not training.is_alive()
    assert child is not None and child.poll() is not None  # the training child was stopped
    assert time.monotonic() - started < 10
