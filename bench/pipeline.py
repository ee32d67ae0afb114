"""Benchmark: the routing pipeline against a bare IMAP-fetch + SMTP-send loop, same servers.

Starts a Dovecot and an aiosmtpd server (in its own process) on loopback, puts the same N
messages in two fresh mailboxes and times, in one run:

* bare: imapclient SEARCH + FETCH BODY.PEEK[] in batches, smtplib sends each message as is over
  one connection — the least any router must do;
* pipeline: ``Pipeline.run_once()`` (what ``mailrouter serve --once`` runs) with the baseline
  classifier (fitted beforehand, as in service): parse, classify, route, record in SQLite,
  compose the forward with its correction block, send, move the original.

Each side runs ``--repeat`` times on fresh mailboxes; the best time of each is kept. Each run
also prints the CPU time each side cost this process (the bare client or the router), the SMTP
server and Dovecot. The last line is ``pipeline: n=…, ratio=…, overhead_ms=…`` with ratio = bare
time / pipeline time (throughput of the pipeline relative to the bare loop), overhead_ms the
extra milliseconds per message, and two ceilings computed from the best pipeline run's CPU:

* ``bound_router`` = bare time / the router's CPU time: the best ratio this router can reach
  while it runs on one interpreter, however well it overlaps with the servers (nearly all of its
  CPU is Python code, which runs one thread at a time);
* ``bound_cores`` = bare time / (CPU time of router and servers together / cores): the best ratio
  the same work can reach on this machine, spread perfectly over every core.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _proctime import tree_cpu_seconds  # noqa: E402

from mailrouter.classify import Classifier, make_classifier  # noqa: E402
from mailrouter.config import load_settings  # noqa: E402
from mailrouter.dataset import Dataset  # noqa: E402
from mailrouter.localservers import (  # noqa: E402
    DovecotServer,
    ImapAccount,
    find_dovecot,
    local_config,
    write_toml,
)
from mailrouter.prediction import ClassifyInput, Prediction  # noqa: E402
from mailrouter.wiring import build_pipeline  # noqa: E402
from tests.fixtures.mail import make_email  # noqa: E402

T = TypeVar("T")

SINK = """
import sys, time
from mailrouter.localservers import SmtpSink
sink = SmtpSink().start()
print(sink.port, flush=True)
for line in sys.stdin:  # each line asks for the CPU time used so far
    print(time.process_time(), flush=True)
print(len(sink.delivered()), flush=True)
sink.stop()
"""


class SinkProcess:
    """The SMTP sink in its own process, as a real server would be (no shared interpreter)."""

    host = "127.0.0.1"

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SINK], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env=env,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def cpu_seconds(self) -> float:
        """CPU time the server has used so far (it answers between two SMTP conversations)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("cpu\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> int:
        """Stop it; returns how many messages it received."""
        out, _ = self.proc.communicate(timeout=30)
        return int(out.strip() or 0)


def messages(data_dir: Path, n: int) -> list[bytes]:
    """``n`` distinct customer emails built from the dataset's texts."""
    examples = Dataset(data_dir / "examples.jsonl").load()
    out = []
    for i in range(n):
        ex = examples[i % len(examples)]
        subject = f"{ex.subject or 'Message'} ({i})"
        out.append(make_email(subject, f"{ex.text}\n\n-- {i}", sender=f"client{i}@example.org"))
    return out


def bare_loop(account: ImapAccount, sink: SinkProcess, batch: int) -> float:
    started = time.perf_counter()
    client = account.client()
    smtp = smtplib.SMTP(sink.host, sink.port)
    client.select_folder("INBOX")
    uids = client.search()
    for i in range(0, len(uids), batch):
        fetched = client.fetch(uids[i : i + batch], ["BODY.PEEK[]"])
        for uid in uids[i : i + batch]:
            smtp.sendmail("router@mailrouter.test", ["dept@example.com"], fetched[uid][b"BODY[]"])
    smtp.quit()
    client.logout()
    return time.perf_counter() - started


class Timed:
    """The configured classifier, with the time spent in it counted."""

    def __init__(self, inner: Classifier) -> None:
        self.inner = inner
        self.name = inner.name
        self.seconds = 0.0
        if hasattr(inner, "classify_many"):  # the pipeline batches only when the backend can
            self.classify_many = self._classify_many

    def classify(self, item: ClassifyInput) -> Prediction:
        started = time.perf_counter()
        try:
            return self.inner.classify(item)
        finally:
            self.seconds += time.perf_counter() - started

    def _classify_many(self, items: list[ClassifyInput]) -> list[Prediction]:
        started = time.perf_counter()
        try:
            return self.inner.classify_many(items)  # type: ignore[attr-defined]
        finally:
            self.seconds += time.perf_counter() - started


def pipeline_round(config: Path) -> tuple[float, float, int, int]:
    """(seconds, seconds in the classifier, messages filed, forwards sent) of one round."""
    settings = load_settings(config)
    started = time.perf_counter()
    classifier = Timed(make_classifier(settings))
    pipeline = build_pipeline(settings, classifier=classifier)
    try:
        report = pipeline.run_once()
    finally:
        pipeline.close()
    return time.perf_counter() - started, classifier.seconds, report.filed, report.forwarded


def dataset_into(data_dir: Path) -> None:
    starter = REPO / "data" / "examples.jsonl"
    if starter.is_file():
        shutil.copyfile(starter, data_dir / "examples.jsonl")
    else:
        from tests.sample_examples import write_sample_dataset

        write_sample_dataset(data_dir / "examples.jsonl")


@dataclass
class Cpu:
    """CPU seconds one side of the bench cost each party: this process (the bare client or the
    router), the SMTP server, and Dovecot with its children (``None`` without /proc)."""

    client: float
    smtp: float
    imap: float | None

    def total(self) -> float:
        return self.client + self.smtp + (self.imap or 0.0)

    def __str__(self) -> str:
        imap = "?" if self.imap is None else f"{self.imap:.2f}"
        return f"CPU s: here {self.client:.2f}, smtp {self.smtp:.2f}, imap {imap}"


def measured(side: Callable[[], T], sink: SinkProcess, dovecot: DovecotServer) -> tuple[T, Cpu]:
    """``side()`` and the CPU it cost each party."""
    assert dovecot.process is not None
    pid = dovecot.process.pid

    def reading() -> tuple[float, float, float | None]:
        return time.process_time(), sink.cpu_seconds(), tree_cpu_seconds(pid)

    before = reading()
    result = side()
    time.sleep(0.3)  # Dovecot reaps the session's process after the logout
    after = reading()
    imap = None if before[2] is None or after[2] is None else after[2] - before[2]
    return result, Cpu(after[0] - before[0], after[1] - before[1], imap)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    if find_dovecot() is None:
        sys.exit("dovecot is not installed (apt-get install dovecot-imapd)")
    logging.disable(logging.INFO)
    os.environ.setdefault("MAILROUTER_CORRECTIONS__TOKEN_KEY", os.urandom(16).hex())
    os.environ["MAILROUTER_NO_KEYRING"] = "1"
    work = Path(tempfile.mkdtemp(prefix="mailrouter-bench-"))
    try:
        sink = SinkProcess()
        with DovecotServer() as dovecot:
            bare_times, pipe_times, classify_times, pipe_cpu = [], [], [], []
            sent = 0
            for rep in range(args.repeat):
                data_dir = work / f"data{rep}"
                data_dir.mkdir()
                os.environ["MAILROUTER_DATA_DIR"] = str(data_dir)
                dataset_into(data_dir)
                mails = messages(data_dir, args.n)
                bare, piped = dovecot.add_user(), dovecot.add_user()
                bare.append(mails)
                piped.append(mails)
                config = write_toml(
                    local_config(piped, (sink.host, sink.port), data_dir), work / f"c{rep}.toml"
                )
                make_classifier(load_settings(config), "baseline")  # fitted once, as in service
                bare_s, bare_cpu = measured(lambda: bare_loop(bare, sink, 50), sink, dovecot)  # noqa: B023
                (seconds, classifying, done, forwarded), cpu = measured(
                    lambda: pipeline_round(config),  # noqa: B023
                    sink,
                    dovecot,
                )
                sent += args.n + forwarded
                if done < args.n:
                    sys.exit(f"the pipeline handled {done} of {args.n} messages")
                bare_times.append(bare_s)
                pipe_times.append(seconds)
                classify_times.append(classifying)
                pipe_cpu.append(cpu)
                print(f"run {rep + 1}: bare {bare_s:.2f}s ({bare_cpu})")
                print(f"       pipeline {seconds:.2f}s ({cpu}; classifier {classifying:.2f}s)")
        received = sink.close()
        if received != sent:
            sys.exit(f"the SMTP server received {received} messages, {sent} were sent")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = pipe_times.index(min(pipe_times))
    bare_s, pipe_s, classify_s = min(bare_times), pipe_times[best], classify_times[best]
    cpu, cores = pipe_cpu[best], os.cpu_count() or 1
    ratio = bare_s / pipe_s
    overhead = (pipe_s - bare_s) / args.n * 1000
    classify_ms = classify_s / args.n * 1000
    print(
        f"pipeline: n={args.n}, ratio={ratio:.2f}, overhead_ms={overhead:.1f}, "
        f"classify_ms={classify_ms:.1f}, ratio_without_classifier="
        f"{bare_s / (pipe_s - classify_s):.2f}, bare_s={bare_s:.2f}, pipeline_s={pipe_s:.2f}, "
        f"bound_router={bare_s / cpu.client:.2f}, bound_cores={bare_s * cores / cpu.total():.2f}"
    )


if __name__ == "__main__":
    main()
