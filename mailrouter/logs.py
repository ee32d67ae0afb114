"""Structured logging: one line per event, as ``key=value`` text or JSON.

Every decision and failure is logged through :func:`event`, so a line can be grepped by its event
name and read by a machine. Secrets never reach here: settings hold them as ``SecretStr`` and no
caller passes them as fields.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import stat
import sys
import time
from io import TextIOWrapper
from pathlib import Path
from typing import Any

from .files import make_dirs, private_file

# Set in the launchd agent's environment (deploy/launchd/*.plist.template): the file the service
# writes and rotates itself, since launchd never rotates StandardErrorPath.
SERVICE_LOG_ENV = "MAILROUTER_SERVICE_LOG"
STDERR_LIMIT = 1_000_000
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log event ``name`` with ``fields`` as structured data."""
    logger.log(level, name, extra={"fields": fields})


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = dict(getattr(record, "fields", {}) or {})
    for key, value in record.__dict__.items():
        if key not in _RESERVED and key != "fields":
            fields[key] = value
    return fields


def _quote(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="\n\t'):
        return json.dumps(text, ensure_ascii=False)
    return text


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log file readable by its owner only (log lines quote senders and subjects),
    also the new file opened after each rotation."""

    def _open(self) -> TextIOWrapper:
        private_file(Path(self.baseFilename))
        return super()._open()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        parts = [stamp, record.levelname.lower(), record.name, record.getMessage()]
        parts += [f"{k}={_quote(v)}" for k, v in _fields(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def setup_logging(
    *,
    fmt: str = "text",
    level: str = "INFO",
    file: Path | None = None,
    stream: Any = None,
    to_stderr: bool = True,
    max_bytes: int = 5_000_000,
    backup_count: int = 5,
) -> None:
    """Configure the root logger: stderr (systemd's journal, the CLI) and/or a file this process
    rotates itself at ``max_bytes``, keeping ``backup_count`` old ones (``.1`` is the newest).

    Under launchd the file is the log and stderr is left out (``to_stderr=False``): launchd
    writes stderr to ``StandardErrorPath`` and never rotates it."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handlers: list[logging.Handler] = []
    if to_stderr or file is None:
        handlers.append(logging.StreamHandler(stream or sys.stderr))
    if file is not None:
        make_dirs(file.parent)
        handlers.append(
            PrivateRotatingFileHandler(file, maxBytes=max_bytes, backupCount=backup_count)
        )
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "imapclient", "apscheduler", "mail.log"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def cap_stderr_file(fd: int = 2, limit: int = STDERR_LIMIT) -> bool:
    """Empty the file launchd gives the agent as stderr once it has passed ``limit`` bytes.

    launchd opens ``StandardErrorPath`` at each start and never rotates it. The service's own log
    goes to a file it rotates, but what comes before logging (a configuration error, printed
    again at each of launchd's restarts, every 30 s, while it is not fixed) lands there: without
    this it would grow without end. True when the file was emptied; a terminal or pipe is left."""
    try:
        info = os.fstat(fd)
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode) or info.st_size <= limit:
        return False
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)  # launchd may not open it O_APPEND: write from the start again
    os.write(fd, f"(mailrouter: {info.st_size} bytes of earlier output dropped)\n".encode())
    return True
