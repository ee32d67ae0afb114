"""How light ``mailrouter serve`` is while it waits: RSS and CPU over a minute of IMAP IDLE.

Starts a throw-away Dovecot and SMTP sink, runs ``mailrouter serve`` as a child process, routes
one email (so the classifier and everything a real round loads is in memory), then measures the
idle process for ``--seconds`` (default 60) and stops it with SIGTERM. Prints, last:
``idle: rss_mb=…, cpu_pct=…, stop_s=…``. Targets: ≤ 120 MB, about 0 % CPU.

    python bench/idle.py [--seconds 60] [--backend baseline]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _proctime import cpu_seconds  # noqa: E402

from mailrouter.localservers import DovecotServer, SmtpSink, local_config, write_toml  # noqa: E402
from mailrouter.state import State  # noqa: E402

STARTER = REPO / "data" / "examples.jsonl"


def rss_mb(pid: int) -> float:
    out = subprocess.run(
        ["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True, check=True
    ).stdout
    return int(out.strip()) / 1024


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def sample_mail() -> bytes:
    msg = EmailMessage()
    msg["From"] = "client@customer.test"
    msg["To"] = "contact@mailrouter.test"
    msg["Subject"] = "Facture en retard"
    msg["Message-ID"] = "<idle-bench-1@customer.test>"
    msg.set_content("Bonjour, la facture 42 reste impayee, merci de regulariser.")
    return msg.as_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--backend", default="ollama", choices=["baseline", "ollama"])
    parser.add_argument("--examples", type=Path, default=STARTER, help="dataset to start from")
    args = parser.parse_args()
    if not args.examples.exists():
        raise SystemExit(f"{args.examples} is missing: the classifier needs examples")

    work = Path(tempfile.mkdtemp(prefix="mailrouter-idle-"))
    data = work / "data"
    data.mkdir()
    shutil.copyfile(args.examples, data / "examples.jsonl")
    with DovecotServer() as dovecot, SmtpSink() as sink:
        account = dovecot.add_user()
        config = write_toml(
            local_config(
                account,
                sink,
                data,
                # without a reachable Ollama the first email goes to triage: still a full round
                classifier={
                    "backend": args.backend,
                    "on_error": "triage",
                    "ollama_host": os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434"),
                },
                mailbox={"poll_seconds": 60},
            ),
            work / "mailrouter.toml",
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROUTER_")}
        env["MAILROUTER_CORRECTIONS__TOKEN_KEY"] = "bench-token-key"
        env["MAILROUTER_NO_KEYRING"] = "1"
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailrouter", "--config", str(config), "serve"],
            cwd=work,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(work / "serve.log").open("wb"),
        )
        try:
            wait((data / "state.db").exists, 60, "serve to start")
            account.append([sample_mail()])
            wait(lambda: len(sink.delivered()) >= 1, 120, "the first email to be routed")
            with State(data / "state.db") as state:
                wait(lambda: not state.pending() and state.counts(), 30, "the email to be filed")
            time.sleep(2)  # the round's tail: filing, logging
            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            peak = 0.0
            while time.monotonic() - t0 < args.seconds:
                peak = max(peak, rss_mb(proc.pid))
                time.sleep(min(5.0, max(0.1, args.seconds - (time.monotonic() - t0))))
            cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
            peak = max(peak, rss_mb(proc.pid))
            stop0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(20)
            stop_s = time.monotonic() - stop0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if code != 0:
        print((work / "serve.log").read_text()[-3000:])
    shutil.rmtree(work, ignore_errors=True)
    cpu_pct = (cpu1 - cpu0) / (t1 - t0) * 100
    print(
        f"machine: {platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; backend {args.backend}; "
        f"{t1 - t0:.0f} s idle in IMAP IDLE; exit status {code}"
    )
    print(f"idle: rss_mb={peak:.0f}, cpu_pct={cpu_pct:.2f}, stop_s={stop_s:.2f}")


if __name__ == "__main__":
    main()
