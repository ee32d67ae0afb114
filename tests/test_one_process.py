"""``mailrouter serve`` as real processes on one data folder: one routes, the others refuse; a
missing secret stops it before the mailbox is touched; the files of a real round are private.

Real Dovecot, a real SMTP sink, the real CLI in child processes (the lock and the exit codes are
those of the console command).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from mailrouter.config import load_settings
from mailrouter.datalock import HOLDER_NAME
from mailrouter.localservers import ImapAccount, SmtpSink
from mailrouter.logs import setup_logging
from mailrouter.service import log_file
from mailrouter.state import State
from mailrouter.wiring import build_pipeline
from tests.fixtures.mail import examples_for_mail

BUSY = 75  # DataDirBusyError.exit_code


def _start(config: Path, *args: str) -> subprocess.Popen[str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("MAILROUTER_SUPERVISED", "INVOCATION_ID")
    }
    return subprocess.Popen(
        [sys.executable, "-m", "mailrouter", "--config", str(config), "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _customer_mail(data_dir: Path, n: int) -> list[bytes]:
    """``n`` test-split emails of the starter data that are not spam."""
    return [raw for label, raw in examples_for_mail(data_dir, "test") if label != "SPAM"][:n]


def _finished(state_path: Path, n: int) -> bool:
    """Whether ``n`` messages reached a final state (read beside the running service)."""
    if not state_path.exists():
        return False
    with State(state_path) as state:
        return len(state.query("SELECT id FROM messages")) == n and not state.pending()


def _inbox(account: ImapAccount) -> list[set[bytes]]:
    """The flags of every message in INBOX but ``\\Recent`` (read-only: this look changes
    nothing)."""
    client = account.client()
    try:
        client.select_folder("INBOX", readonly=True)
        found = client.get_flags(client.search("ALL")).values()
        return [set(flags) - {b"\\Recent"} for flags in found]
    finally:
        client.logout()


def test_two_serve_processes_one_routes_the_other_refuses(
    make_mail_config: Callable[..., Path],
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
    starter_data: Path,
    data_dir: Path,
) -> None:
    mails = _customer_mail(data_dir, 12)
    imap_account.append(mails)
    config = make_mail_config()
    first, second = _start(config), _start(config)  # both race for the lock
    try:
        _wait(lambda: first.poll() is not None or second.poll() is not None, 60, "one to refuse")
        loser, winner = (first, second) if first.poll() is not None else (second, first)
        _, err = loser.communicate(timeout=5)
        assert loser.returncode == BUSY, err
        assert f"mailrouter serve (pid {winner.pid}, since " in err, err
        assert f"already uses {data_dir}; stop it first: `kill {winner.pid}`" in " ".join(
            err.split()
        )
        # once, too, refuses while the service runs; a dry run only looks, so it may
        once = subprocess.run(
            [sys.executable, "-m", "mailrouter", "--config", str(config), "serve", "--once"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert once.returncode == BUSY and f"pid {winner.pid}" in once.stderr
        _wait(lambda: _finished(data_dir / "state.db", len(mails)), 90, "every mail to be done")
        looking = subprocess.run(
            [sys.executable, "-m", "mailrouter", "--config", str(config), "serve", "--once",
             "--dry-run"], capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert looking.returncode == 0, looking.stderr
        time.sleep(1.5)  # a second forward of any of them would have arrived by now
        _stop(winner)
    finally:
        for proc in (first, second):
            _stop(proc)
    assert winner.returncode == 0
    ids = Counter(m.header("Message-ID") for m in smtp_sink.delivered())
    with State(data_dir / "state.db") as state:
        forwards = {r["message_id"] for r in state.query("SELECT message_id FROM forwards")}
    assert set(ids) == forwards and len(forwards) >= len(mails) - 2  # a few may be spam
    assert max(ids.values()) == 1, ids
    assert not (data_dir / HOLDER_NAME).exists()  # released on exit
    # the lock is free again: a round goes through, and finds nothing left to do
    again = subprocess.run(
        [sys.executable, "-m", "mailrouter", "--config", str(config), "serve", "--once"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert len(smtp_sink.delivered()) == len(forwards)


def test_a_lock_left_by_a_killed_process_does_not_block(
    make_mail_config: Callable[..., Path],
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
    starter_data: Path,
    data_dir: Path,
) -> None:
    config = make_mail_config()
    killed = _start(config)
    try:
        _wait((data_dir / HOLDER_NAME).exists, 30, "the lock to be taken")
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
    finally:
        _stop(killed)
    assert (data_dir / HOLDER_NAME).exists()  # the note stays; the lock went with the process
    imap_account.append(_customer_mail(data_dir, 2))
    done = subprocess.run(
        [sys.executable, "-m", "mailrouter", "--config", str(config), "serve", "--once"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "routed 2 of 2 message(s)" in " ".join(done.stdout.split())


@pytest.mark.parametrize("once", [True, False], ids=["once", "forever"])
def test_a_missing_token_key_stops_serve_before_the_mailbox(
    once: bool,
    make_mail_config: Callable[..., Path],
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
    starter_data: Path,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MAILROUTER_CORRECTIONS__TOKEN_KEY")
    imap_account.append(_customer_mail(data_dir, 3))
    config = make_mail_config()
    proc = _start(config, *(["--once"] if once else []))
    _, err = proc.communicate(timeout=60)
    message = " ".join(err.split())
    assert proc.returncode == 2, err
    assert "export MAILROUTER_CORRECTIONS__TOKEN_KEY=" in message
    assert "keyring set mailrouter token-key" in message
    assert "secrets.token_urlsafe(32)" in message and "Traceback" not in err
    assert _inbox(imap_account) == [set(), set(), set()]  # all three still there, unread
    assert smtp_sink.delivered() == []
    assert not (data_dir / "state.db").exists()


def test_the_files_of_a_real_round_are_private(
    make_mail_config: Callable[..., Path],
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
    starter_data: Path,
    data_dir: Path,
) -> None:
    """In-process, under the test's umask 022: the modes are mailrouter's own doing."""
    os.chmod(starter_data, 0o644)
    os.chmod(data_dir, 0o755)
    settings = load_settings(make_mail_config())
    imap_account.append(_customer_mail(data_dir, 3))
    path = log_file(settings, environ={})
    assert path is not None and path.is_relative_to(data_dir)
    setup_logging(file=path)
    try:
        pipeline = build_pipeline(settings)
        try:
            assert len(pipeline.run_once().decisions) == 3
        finally:
            pipeline.close()
    finally:
        setup_logging()
    with State(settings.state_path):  # open: -wal and -shm exist
        modes = {
            str(p.relative_to(data_dir)): stat.S_IMODE(p.stat().st_mode)
            for p in data_dir.rglob("*")
            if p.name != "examples.jsonl"  # the starter copy this test made readable
        }
    for name in ("state.db", "state.db-wal", "state.db-shm", "logs/mailrouter.log", "logs"):
        assert name in modes, sorted(modes)
    loose = {name: oct(m) for name, m in modes.items() if m & 0o077}
    assert loose == {}, loose
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
