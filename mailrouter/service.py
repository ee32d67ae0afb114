"""``mailrouter serve``: the mailbox loop and the scheduler, in one long-lived process.

The main thread owns the mailbox: it routes what is new, then waits for the server to announce
mail (IMAP IDLE, or a poll interval without it). A background scheduler runs the timed jobs; the
ones that touch the mailbox or SMTP only *ask* the main thread (a wake-up), so IMAP and SQLite are
used from one thread at a time. Training runs in a child process: MLX is never imported here, a
crash or an out-of-memory kill of the training cannot take the router down, and its gigabytes go
back to the system when it exits.

Stopping: the first SIGTERM/SIGINT lets the message in hand finish, closes IMAP and exits 0 (well
within launchd's and systemd's 20 s); a second one exits at once. Failures of the mailbox, SMTP
or Ollama are logged, recorded for ``mailrouter status`` and retried with a growing delay: the
process does not exit on them, so a supervisor never sees a crash loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from apscheduler.schedulers.background import BackgroundScheduler

from .config import Settings
from .corrections.digest import send_spam_digest
from .errors import ConfigError, MailRouterError
from .logs import SERVICE_LOG_ENV, event, setup_logging
from .scheduling import build_scheduler
from .state import KEYS, State, now_iso
from .wiring import build_pipeline

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 5.0  # a training child gets this long to exit after SIGTERM
# A round in progress gets this long to end after the first signal; then the process exits
# anyway. That is safe: every step of a message is committed before the next (see pipeline).
STOP_DEADLINE_SECONDS = 8.0
MAX_BACKOFF_SECONDS = 300.0
LOG_FILE = "mailrouter.log"
# Set by the launchd agent and systemd unit (systemd also sets INVOCATION_ID). systemd's journal
# keeps and rotates stderr, so no second copy of the log goes to a file there. launchd rotates
# nothing: the agent names the file the service writes and rotates itself (SERVICE_LOG_ENV).
SUPERVISED_ENV = ("MAILROUTER_SUPERVISED", "INVOCATION_ID")


class Router(Protocol):
    """What the loop needs of the pipeline (see :class:`mailrouter.pipeline.Pipeline`)."""

    def run_once(self, stop: threading.Event | None = None) -> Any: ...

    def wait_for_changes(self, timeout: float, stop_event: threading.Event) -> Any: ...

    def close(self) -> None: ...


def supervised(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return any(env.get(name) for name in SUPERVISED_ENV)


def log_file(settings: Settings, environ: Mapping[str, str] | None = None) -> Path | None:
    """``log.file`` when set; else the launchd agent's log file; else ``data/logs/mailrouter.log``
    unless systemd keeps stderr."""
    env = os.environ if environ is None else environ
    if settings.log.file is not None:
        return settings.log.file
    if env.get(SERVICE_LOG_ENV):
        return Path(env[SERVICE_LOG_ENV])
    return None if supervised(env) else settings.logs_dir / LOG_FILE


def configure_logging(settings: Settings, environ: Mapping[str, str] | None = None) -> Path | None:
    """Logging of the long-running process; keeps DEBUG when the CLI was given ``-v``. Under
    launchd the rotating file is the only copy: its stderr file would grow without end."""
    env = os.environ if environ is None else environ
    path = log_file(settings, env)
    verbose = logging.getLogger().level == logging.DEBUG
    setup_logging(
        fmt=settings.log.format,
        level="DEBUG" if verbose else settings.log.level,
        file=path,
        to_stderr=env.get("MAILROUTER_SUPERVISED") != "launchd",
        max_bytes=settings.log.max_bytes,
        backup_count=settings.log.backup_count,
    )
    return path


def training_command(settings: Settings) -> list[str]:
    """The nightly training, as a child process of this interpreter (same virtualenv)."""
    cmd = [sys.executable, "-m", "mailrouter"]
    if settings.source is not None:
        cmd += ["--config", str(Path(settings.source).absolute())]
    return [*cmd, "train", "--scheduled"]


def _default_router(settings: Settings, dry_run: bool) -> Router:
    return build_pipeline(settings, dry_run=dry_run)


class Service:
    """One ``serve`` process. ``router_factory`` is the swap point tests and the demo use."""

    def __init__(
        self,
        settings: Settings,
        *,
        dry_run: bool = False,
        router_factory: Callable[[Settings, bool], Router] = _default_router,
        training_cmd: list[str] | None = None,
    ) -> None:
        self.settings = settings
        self.dry_run = dry_run
        self.router_factory = router_factory
        self.training_cmd = training_cmd or training_command(settings)
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.state: State | None = None
        self.router: Router | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._child_lock = threading.Lock()
        self._signals = 0
        self._digest_due = False
        self._deadline: threading.Timer | None = None

    # --- signals ----------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            os.write(2, b"second signal: exiting now\n")
            self._kill_child(grace=0)
            os._exit(128 + signum)
        event(log, "service_stopping", signal=signal.Signals(signum).name)
        self.request_stop()
        self._deadline = threading.Timer(STOP_DEADLINE_SECONDS, self._force_exit)
        self._deadline.daemon = True
        self._deadline.start()

    def _force_exit(self) -> None:
        event(log, "service_stop_forced", logging.WARNING, after_s=STOP_DEADLINE_SECONDS)
        self._kill_child(grace=0)
        logging.shutdown()
        os._exit(0)

    def request_stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    # --- scheduled jobs ---------------------------------------------------------------------

    def heartbeat(self) -> None:
        if self.state is not None:
            self.state.set(KEYS.HEARTBEAT, f"{time.time():.3f}")

    def retry_deferred(self) -> None:
        """Deferred sends are resumed by the router's next round: wake it when one is due."""
        if self.state is not None and self.state.pending(due=True):
            self.wake.set()

    def digest(self) -> None:
        """The daily spam digest is sent by the main thread, between two rounds."""
        self._digest_due = True
        self.wake.set()

    def train(self) -> None:
        """Run the training child; this job's thread waits for it (one at a time)."""
        if self.stopping.is_set():
            return
        event(log, "training_started", command=" ".join(self.training_cmd[-2:]))
        started = time.monotonic()
        with self._child_lock:
            self._child = subprocess.Popen(
                self.training_cmd, stdin=subprocess.DEVNULL, start_new_session=True
            )
        code = self._child.wait()
        with self._child_lock:
            self._child = None
        level = logging.INFO if code == 0 else logging.WARNING
        event(
            log,
            "training_finished",
            level,
            exit_code=code,
            seconds=round(time.monotonic() - started, 1),
        )
        if code and not self.stopping.is_set():
            self._record_error("training_failed", f"training exited with status {code}")

    def _kill_child(self, grace: float = STOP_GRACE_SECONDS) -> None:
        with self._child_lock:
            child = self._child
        if child is None or child.poll() is not None:
            return
        event(log, "training_interrupted", pid=child.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)

    def _send_digest(self) -> None:
        """Failures are logged; the spam not yet listed goes into the next digest."""
        self._digest_due = False
        try:
            send_spam_digest(self.settings)
        except MailRouterError as exc:
            event(log, "spam_digest_failed", logging.WARNING, error=str(exc))
            self._record_error("spam_digest_failed", str(exc))

    # --- the loop ---------------------------------------------------------------------------

    def _record_error(self, name: str, error: str) -> None:
        if self.state is not None:
            self.state.record_error(name, error)

    def _close_router(self) -> None:
        router, self.router = self.router, None
        if router is not None:
            try:
                router.close()
            except Exception as exc:  # closing must never hide why we are closing
                event(log, "mailbox_close_failed", logging.WARNING, error=str(exc))

    def _round(self) -> None:
        if self.router is None:
            self.router = self.router_factory(self.settings, self.dry_run)
        self.router.run_once(self.stopping)
        if self._digest_due and not self.stopping.is_set():
            self._send_digest()

    def _wait(self) -> None:
        mailbox = self.settings.mailbox
        timeout = mailbox.idle_seconds if mailbox.idle else mailbox.poll_seconds
        assert self.router is not None
        self.router.wait_for_changes(timeout, self.wake)

    def run(self) -> int:
        """Serve until stopped; returns the exit status (0 after a signal)."""
        scheduler = self._start()
        try:
            self._serve()
        finally:
            self._stop(scheduler)
        return 0

    def _start(self) -> BackgroundScheduler:
        """Open the state, write the heartbeat's first lines and start the scheduler."""
        self.state = State(self.settings.state_path)
        for key, value in (
            (KEYS.PID, str(os.getpid())),
            (KEYS.STARTED, now_iso()),
            (KEYS.STOPPED, ""),
            (KEYS.DRY_RUN, "1" if self.dry_run else ""),
        ):
            self.state.set(key, value)
        self.heartbeat()
        scheduler = build_scheduler(
            self.settings,
            # a dry run sends nothing and changes no model: no digest, no training
            training=None if self.dry_run else self.train,
            digest=None if self.dry_run else self.digest,
            retry=self.retry_deferred,
            heartbeat=self.heartbeat,
        )
        scheduler.start()
        event(
            log,
            "service_started",
            pid=os.getpid(),
            mailbox=f"{self.settings.mailbox.username}@{self.settings.mailbox.host}",
            folder=self.settings.mailbox.folder,
            backend=self.settings.classifier.backend,
            dry_run=self.dry_run,
            jobs=",".join(job.id for job in scheduler.get_jobs()),
        )
        return scheduler

    def _serve(self) -> None:
        """Rounds and waits until stopped; a failed round is logged and retried with backoff."""
        backoff = min(1.0, MAX_BACKOFF_SECONDS)
        while not self.stopping.is_set():
            self.wake.clear()
            try:
                self._round()
                if self.stopping.is_set():
                    break
                self._wait()
                backoff = min(1.0, MAX_BACKOFF_SECONDS)
            except ConfigError:
                raise
            except Exception as exc:  # mailbox, SMTP, Ollama, or a bug: log, wait, retry
                self._round_failed(exc, backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    def _round_failed(self, exc: Exception, retry_in: float) -> None:
        self._close_router()
        expected = isinstance(exc, MailRouterError)
        name = "round_failed" if expected else "round_crashed"
        fields = {"error": f"{type(exc).__name__}: {exc}", "retry_in": round(retry_in, 1)}
        # a bug gets its traceback; a known failure is one line
        log.error(name, exc_info=not expected, extra={"fields": fields})
        self._record_error(name, f"{type(exc).__name__}: {exc}")

    def _stop(self, scheduler: BackgroundScheduler) -> None:
        scheduler.shutdown(wait=False)
        self._kill_child()
        self._close_router()
        assert self.state is not None
        self.state.set(KEYS.STOPPED, now_iso())
        event(log, "service_stopped", pid=os.getpid())
        self.state.close()
        self.state = None
        if self._deadline is not None:
            self._deadline.cancel()


def run_forever(settings: Settings, dry_run: bool = False) -> int:
    """What ``mailrouter serve`` runs without ``--once``; returns the exit status."""
    path = configure_logging(settings)
    if path is not None:
        event(log, "log_file", path=str(path))
    service = Service(settings, dry_run=dry_run)
    service.install_signal_handlers()
    return service.run()
