"""Run ``mlx_lm lora`` as a child process and follow its progress from its output.

A child process, not an in-process call: mlx-lm's memory (gigabytes for a 7B model) is returned
to the system the moment it exits, an out-of-memory kill takes only the child, and a timeout is a
plain ``kill``. It runs at a lower CPU priority (``training.nice``) so the router keeps routing.
Every output line goes to the run's log file; the lines that report progress also feed a callback
(the CLI's progress bar). Both mlx-lm's table (0.30+: ``  10    2.345 ▼    512    1.2k``) and the
older ``Iter 10: Train loss 2.345, …`` lines are understood.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..errors import TrainingError
from ..logs import event
from . import blas

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_NUM = r"([0-9][0-9,]*\.?[0-9]*(?:[eE][-+]?[0-9]+)?|nan|inf)"
_TRAIN_TABLE = re.compile(rf"^\s*(\d+)\s+{_NUM}\s*[▼▲]\s+{_NUM}\s+{_NUM}k\s*$")
_VAL_TABLE = re.compile(rf"^\s*(\d+)\s+val\s+{_NUM}\s+{_NUM}s\s*$")
_TRAIN_OLD = re.compile(rf"Iter (\d+): Train loss {_NUM}")
_VAL_OLD = re.compile(rf"Iter (\d+): Val loss {_NUM}")
_TOKENS_OLD = re.compile(rf"Tokens/sec {_NUM}")


@dataclass(frozen=True)
class Progress:
    """One progress report: iteration ``iteration`` of ``total``, and the losses seen so far."""

    iteration: int
    total: int
    train_loss: float | None = None
    val_loss: float | None = None
    tokens_per_second: float | None = None


@dataclass(frozen=True)
class LoraResult:
    adapter_dir: Path
    iterations: int
    train_loss: float | None
    val_loss: float | None
    seconds: float
    peak_rss_mb: float
    log_path: Path


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def parse_line(line: str) -> tuple[str, int, float, float | None] | None:
    """``("train"|"val", iteration, loss, tokens/s or None)`` for a progress line, else ``None``."""
    clean = _ANSI.sub("", line).rstrip()
    if m := _TRAIN_TABLE.match(clean):
        return "train", int(m[1]), _number(m[2]), _number(m[3])
    if m := _VAL_TABLE.match(clean):
        return "val", int(m[1]), _number(m[2]), None
    if m := _TRAIN_OLD.search(clean):
        tokens = _TOKENS_OLD.search(clean)
        return "train", int(m[1]), _number(m[2]), _number(tokens[1]) if tokens else None
    if m := _VAL_OLD.search(clean):
        return "val", int(m[1]), _number(m[2]), None
    return None


def command(config_path: Path) -> list[str]:
    """The command line: everything else is in the YAML file."""
    return [sys.executable, "-m", "mlx_lm", "lora", "-c", str(config_path)]


def child_env() -> dict[str, str]:
    """Plain, unbuffered output: lines arrive as they are printed and carry no colour codes;
    OpenBLAS preloaded where installed (:mod:`.blas`), also under ``mailrouter train --now``."""
    env = blas.for_this_machine().apply(os.environ)
    env.update(PYTHONUNBUFFERED="1", NO_COLOR="1", TERM="dumb", COLUMNS="120")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_lora(
    config_path: Path,
    *,
    adapter_dir: Path,
    total_iters: int,
    log_path: Path,
    timeout: float,
    nice: int = 10,
    on_progress: Callable[[Progress], None] | None = None,
) -> LoraResult:
    """Train; raises :class:`TrainingError` with the log's last lines on failure or timeout."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tail: deque[str] = deque(maxlen=20)
    event(log, "training.lora.start", config=config_path, iters=total_iters, log=log_path)
    with log_path.open("a", encoding="utf-8") as log_file:
        log_file.write("$ " + " ".join(command(config_path)) + "\n")
        log_file.flush()
        proc = _start(config_path, nice)
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            iteration, train_loss, val_loss = _follow(
                proc, log_file, tail, total_iters, on_progress
            )
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            timer.cancel()
            if proc.returncode is None:
                proc.kill()
                proc.wait()
    seconds = time.monotonic() - started
    # ru_maxrss is in kilobytes on Linux, in bytes on macOS.
    peak = usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    _check_exit(proc.returncode, timed_out.is_set(), timeout, log_path, tail, adapter_dir)
    event(
        log,
        "training.lora.done",
        seconds=round(seconds, 1),
        train_loss=train_loss,
        val_loss=val_loss,
        peak_rss_mb=round(peak, 1),
    )
    if on_progress is not None:
        on_progress(Progress(total_iters, total_iters, train_loss, val_loss))
    return LoraResult(adapter_dir, iteration, train_loss, val_loss, seconds, peak, log_path)


def _start(config_path: Path, nice: int) -> subprocess.Popen[str]:
    """``mlx_lm lora`` with its output on one text pipe, at a lower priority when ``nice``."""
    return subprocess.Popen(
        command(config_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=child_env(),
        preexec_fn=(lambda: os.nice(nice)) if nice else None,
    )


def _follow(
    proc: subprocess.Popen[str],
    log_file: TextIO,
    tail: deque[str],
    total_iters: int,
    on_progress: Callable[[Progress], None] | None,
) -> tuple[int, float | None, float | None]:
    """Copy the child's output to the log as it comes, keep its last lines in ``tail`` and
    report progress; returns the last iteration and the last train and validation losses."""
    iteration, train_loss, val_loss = 0, None, None
    assert proc.stdout is not None
    for line in proc.stdout:
        log_file.write(line)
        log_file.flush()
        if line.strip():
            tail.append(_ANSI.sub("", line.rstrip()))
        parsed = parse_line(line)
        if parsed is None:
            continue
        kind, iteration, loss, tokens = parsed
        if kind == "train":
            train_loss = loss
        else:
            val_loss = loss
        if on_progress is not None:
            on_progress(Progress(iteration, total_iters, train_loss, val_loss, tokens))
    return iteration, train_loss, val_loss


def _check_exit(
    code: int | None,
    timed_out: bool,
    timeout: float,
    log_path: Path,
    tail: deque[str],
    adapter_dir: Path,
) -> None:
    """Raise :class:`TrainingError` naming the cause (and the log's last lines) unless the run
    ended well and wrote its adapter."""
    if timed_out:
        raise TrainingError(
            f"training timed out after {timeout:.0f} s (training.timeout_seconds); log: {log_path}"
        )
    if code != 0:
        assert code is not None
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        if code == -9:
            how += " (out of memory? lower training.batch_size or num_layers)"
        last = "\n".join(list(tail)[-8:])
        raise TrainingError(f"mlx_lm lora {how}; log: {log_path}\n{last}")
    if not (adapter_dir / "adapters.safetensors").is_file():
        raise TrainingError(f"mlx_lm lora wrote no adapters.safetensors in {adapter_dir}")
