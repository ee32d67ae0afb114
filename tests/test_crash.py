"""Crash test: ``mailrouter serve`` killed with SIGKILL at random moments, restarted, until done.

The children are forked from a warm interpreter (a small "zygote" process that has already
imported mailrouter and scikit-learn), so a restart costs milliseconds instead of seconds of
imports; each child is still a separate process running the real ``serve`` command against the
real Dovecot and SMTP servers, and it is killed with SIGKILL by its pid. The mailbox starts with
200 messages; when they are all done before the 20th kill, 50 more arrive, so every kill lands
while there is work.

Invariants checked at the end: every message of the mailbox was delivered exactly once, counted
at the SMTP server by forward id (several deliveries of one forward id are identical re-sends
with the same Message-ID: the only duplicate allowed; the test reports how many); no message was
forwarded under two forward ids; every original left INBOX and is filed; nothing is pending.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from mailrouter.classify import make_classifier
from mailrouter.config import load_settings
from mailrouter.localservers import ImapAccount, SmtpSink
from mailrouter.state import State
from tests.fixtures.mail import attached, make_email
from tests.sample_examples import sample_examples, write_sample_dataset

MESSAGES = 200
TOP_UP = 50  # mail that arrives when the first 200 are done before the 20th kill
MIN_KILLS = 20

ZYGOTE = r"""
import json, os, sys, traceback
import sklearn.feature_extraction.text, sklearn.linear_model, sklearn.pipeline
import mailrouter.cli, mailrouter.pipeline.round, mailrouter.classify.baseline
print("ready", flush=True)
for line in sys.stdin:
    command, _, argument = line.strip().partition(" ")
    if command == "run":
        pid = os.fork()
        if pid == 0:
            os.setsid()
            log = os.open(os.environ["CRASH_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.dup2(log, 1)
            os.dup2(log, 2)
            sys.argv = json.loads(argument)
            code = 0
            try:
                mailrouter.cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        print(pid, flush=True)
    elif command == "wait":
        print(os.waitpid(int(argument), 0)[1], flush=True)
"""


class Zygote:
    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=cwd,
            text=True,
        )
        assert self._read() == "ready"

    def _read(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def _send(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._read()

    def run(self, argv: list[str]) -> int:
        return int(self._send("run " + json.dumps(argv)))

    def wait(self, pid: int) -> int:
        return int(self._send(f"wait {pid}"))

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def _mails(first: int, count: int) -> list[bytes]:
    examples = sample_examples()
    out = []
    for i in range(first, first + count):
        ex = examples[i % len(examples)]
        out.append(
            make_email(f"{ex.subject} #{i:03d}", f"{ex.text}\n\nRef. {i}", sender=f"c{i}@x.org")
        )
    return out


def test_sigkill_at_random_moments_never_loses_or_duplicates(
    data_dir: Path,
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
    make_mail_config: Any,
    tmp_path: Path,
    record_property: Any,
) -> None:
    write_sample_dataset(data_dir / "examples.jsonl")
    config = make_mail_config(mailbox={"batch_size": 10, "idle": False})
    settings = load_settings(config)
    make_classifier(settings, "baseline")  # fit and cache once; children load the cache
    imap_account.append(_mails(0, MESSAGES))
    total = MESSAGES

    log = tmp_path / "serve.log"
    env = {**os.environ, "CRASH_LOG": str(log), "OPENBLAS_NUM_THREADS": "1"}
    zygote = Zygote(env, Path.cwd())
    argv = ["mailrouter", "--config", str(config), "serve", "--once"]
    rng = random.Random(int(os.environ.get("CRASH_SEED", "4")))
    kills = runs = 0
    started = time.monotonic()
    try:
        while kills < MIN_KILLS and runs < 120:
            with State(settings.state_path) as state:
                done = sum(n for s, n in state.counts().items() if s in _FINAL)
            if done == total:  # every kill must land while there is work: more mail arrives
                imap_account.append(_mails(total, TOP_UP))
                total += TOP_UP
            pid = zygote.run(argv)
            time.sleep(rng.uniform(0.02, 0.45))
            os.kill(pid, signal.SIGKILL)
            status = zygote.wait(pid)
            runs += 1
            if os.WIFSIGNALED(status):
                kills += 1
            else:
                assert os.WEXITSTATUS(status) == 0, log.read_text()[-3000:]
        final = zygote.wait(zygote.run(argv))
        assert os.WIFEXITED(final) and os.WEXITSTATUS(final) == 0, log.read_text()[-3000:]
    finally:
        zygote.close()
    elapsed = time.monotonic() - started

    with State(settings.state_path) as state:
        assert state.pending() == []
        counts = state.counts()
        forwards = {
            row["forward_id"]: row["message"]
            for row in state.query("SELECT forward_id, message FROM forwards WHERE status = 'sent'")
        }
    assert sum(counts.values()) == total, counts
    assert set(counts) <= _FINAL

    by_forward: dict[str, list[Any]] = defaultdict(list)
    by_original: dict[str, set[str]] = defaultdict(set)
    for delivered in smtp_sink.delivered():
        forward_id = delivered.header("X-MailRouter-Forward-Id")
        assert forward_id
        by_forward[forward_id].append(delivered)
        by_original[attached(delivered)["Subject"]].add(forward_id)
    resends = 0
    for forward_id, copies in by_forward.items():
        assert forward_id in forwards
        assert len({c.header("Message-ID") for c in copies}) == 1
        resends += len(copies) - 1
    assert all(len(ids) == 1 for ids in by_original.values()), "forwarded twice"
    forwarded = counts.get("filed", 0) + counts.get("triaged", 0) + counts.get("failed", 0)
    assert len(by_original) == forwarded == len(by_forward)

    client = imap_account.client()
    try:
        assert client.select_folder("INBOX")[b"EXISTS"] == 0
        filed = sum(
            client.select_folder(f, readonly=True)[b"EXISTS"]
            for f in ("MailRouter/Routed", "MailRouter/Triage", "MailRouter/Spam")
            if client.folder_exists(f)
        )
    finally:
        client.logout()
    assert filed == total

    summary = (
        f"crash: messages={total}, runs={runs + 1}, kills={kills}, "
        f"identical_resends={resends}, seconds={elapsed:.1f}"
    )
    record_property("crash", summary)
    print(summary)
    assert kills >= MIN_KILLS, summary


_FINAL = {"filed", "triaged", "spam", "ignored", "failed"}
