"""The nightly training job: the runner in a child process, supervised, its failures recorded.

This module imports neither MLX nor the runner: the process that calls :func:`run_job`
(``mailrouter train --scheduled``, started by the service's APScheduler job) stays small, and
whatever happens to the child (a crash, an out-of-memory kill, the timeout) cannot touch the
router or the model in service. The child runs in its own process group, so the timeout, or a
SIGTERM to this process, ends it together with its ``mlx_lm`` grandchild.

Each job creates its run row first (``running``) and finishes it itself when the child could not:
killed by a signal, timed out, or exited without recording anything. The next run then retries,
because only published or rejected runs count as "already trained on this data".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ..config import Settings, hf_token
from ..errors import MailRouterError
from ..files import private_dir, private_file
from ..logs import event
from ..state import open_state
from . import blas, registry

log = logging.getLogger(__name__)

EXIT_BUSY = 75  # as runner.EXIT_BUSY, without importing the runner
_SECRETS = {
    "mailbox": {"password"},
    "smtp": {"password"},
    "corrections": {"token_key"},
    "training": {"hf_token"},
}
# Environment variables the training child must not inherit: passwords, the token key, API
# tokens of any service (it needs only the Hugging Face token, sent in its request).
_SECRET_ENV = re.compile(r"PASSWORD|PASSWD|SECRET|CREDENTIAL|(^|_)(TOKEN|KEYS?)(_|$)", re.I)


@dataclass(frozen=True)
class JobResult:
    """What the job reports: the run's decision and reason (``failed`` with the error)."""

    run_id: int | None
    decision: str
    reason: str
    error: str | None = None
    exit_code: int | None = None

    @property
    def ok(self) -> bool:
        return self.decision in ("published", "rejected", "skipped", "busy")


class _Interrupted(Exception):
    pass


def settings_payload(settings: Settings) -> dict[str, Any]:
    """The settings for the child, without secrets (the HF token travels beside them)."""
    data = settings.model_dump(mode="json", exclude=_SECRETS)
    data["data_dir"] = str(Path(settings.data_dir).absolute())
    return data


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without any variable whose name says it holds a secret."""
    return {k: v for k, v in environ.items() if not _SECRET_ENV.search(k)}


def runner_command() -> list[str]:
    return [sys.executable, "-m", "mailrouter.training.runner"]


def busy(settings: Settings) -> bool:
    """Whether a training holds the lock right now."""
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(settings.models_dir / "training.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False


def run_job(
    settings: Settings,
    *,
    force: bool = False,
    iters: int | None = None,
    timeout: float | None = None,
) -> JobResult:
    """Run one training in a child process and wait for it (at most ``timeout`` seconds)."""
    if busy(settings):
        event(log, "training.job.busy")
        return JobResult(None, "busy", "another training is running")
    limit = float(timeout or settings.training.timeout_seconds)
    with open_state(settings) as state:
        run_id = registry.start_run(state)
    folder = private_dir(settings.models_dir / "runs" / f"{run_id:04d}")
    job_log = private_file(folder / "job.log")
    request = {
        "settings": settings_payload(settings),
        "hf_token": hf_token(settings),
        "run_id": run_id,
        "force": force,
        "iters": iters,
    }
    event(log, "training.job.start", run=run_id, timeout_s=limit, log=job_log)
    mlx_blas = blas.for_this_machine()  # OpenBLAS preloaded on Linux: training ~2× faster
    event(log, "training.blas", uses=mlx_blas.describe())
    with job_log.open("ab") as out:
        out.write(f"BLAS for MLX: {mlx_blas.describe()}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            runner_command(),
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=mlx_blas.apply(child_environment(os.environ)),
            start_new_session=True,
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(request).encode())
        proc.stdin.close()
        code, why = _wait(proc, limit)
    return _result(settings, run_id, code, why, job_log)


def _wait(proc: subprocess.Popen[bytes], limit: float) -> tuple[int | None, str | None]:
    """The child's exit status, or ``None`` and why it was stopped (timeout, SIGTERM)."""
    previous = None
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:

        def on_term(_signum: int, _frame: Any) -> None:
            raise _Interrupted

        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        code = proc.wait(limit)
        if code != 0:
            _kill_group(proc)  # a killed runner may leave its mlx_lm child behind
        return code, None
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return None, f"timed out after {limit:.0f} s (training.timeout_seconds)"
    except (_Interrupted, KeyboardInterrupt):
        _kill_group(proc)
        return None, "interrupted: the service was stopping"
    finally:
        if in_main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(deque((x for x in text.splitlines() if x.strip()), maxlen=lines))


def _result(
    settings: Settings, run_id: int, code: int | None, why: str | None, job_log: Path
) -> JobResult:
    with open_state(settings) as state:
        record = registry.run(state, run_id)
        if code == EXIT_BUSY:
            registry.finish_run(state, run_id, "skipped", "another training is running")
            return JobResult(run_id, "busy", "another training is running", exit_code=code)
        if record is not None and record.decision not in (None, registry.RUNNING):
            result = JobResult(run_id, record.decision, record.reason or "", record.error, code)
        else:
            if why is None:
                assert code is not None
                if code < 0:
                    name = signal.Signals(-code).name
                    why = f"killed by {name}" + (
                        " (out of memory?)" if -code == signal.SIGKILL else ""
                    )
                else:
                    why = f"exited with status {code} without recording a result"
            error = f"training {why}; log: {job_log}\n{_tail(job_log)}".strip()
            with contextlib.suppress(MailRouterError):
                registry.finish_run(state, run_id, "failed", why, error=error[:4000])
            result = JobResult(run_id, "failed", why, error, code)
    level = logging.INFO if result.ok else logging.ERROR
    event(
        log,
        "training.job.done",
        level,
        run=run_id,
        decision=result.decision,
        reason=result.reason[:300],
    )
    return result
