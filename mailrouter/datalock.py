"""One process routes mail from a data folder: a lock in the folder, and a note of who holds it.

Two routers on one data folder both see each new mail and both forward it; the state database
cannot stop them (each records the message in its own transaction, the second one fails). So
``mailrouter serve`` (both modes) takes this lock before it opens the database or the mailbox,
and a second one stops with a message naming the first.

The lock is :class:`filelock.FileLock`, an ``flock`` on POSIX: the kernel drops it when the
process ends, however it ends (SIGKILL, out of memory), so a lock left by a dead process never
blocks. ``flock`` needs a local file system: keep the data folder off NFS and SMB shares.

The holder's pid, host, start time and command go to a small JSON file beside the lock file,
written once the lock is held and removed before it is released; the lock file itself stays
empty (filelock before 4.0 truncates it when it opens it).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

from .errors import DataDirBusyError
from .files import FILE_MODE, private_dir, write_private
from .state import now_iso

LOCK_NAME = "serve.lock"
HOLDER_NAME = "serve.lock.json"


@dataclass(frozen=True)
class Holder:
    """Who holds the lock of a data folder."""

    pid: int
    host: str
    started: str
    command: str


def busy_message(holder: Holder | None, data_dir: Path, host: str) -> str:
    """What a second process says: who uses ``data_dir`` and how to stop it."""
    if holder is None:
        return (
            f"another mailrouter process already uses {data_dir}; stop it first, or give this "
            "one another data_dir"
        )
    where = "" if holder.host == host else f" on {holder.host}"
    return (
        f"{holder.command} (pid {holder.pid}{where}, since {holder.started}) already uses "
        f"{data_dir}; stop it first: `kill {holder.pid}` (or `mailrouter service uninstall` "
        "when it is the installed service), or give this one another data_dir"
    )


def read_holder(data_dir: Path) -> Holder | None:
    """The holder note of ``data_dir``; ``None`` when missing, unreadable, or left by a process
    of this host that is gone (a new holder may not have written its note yet)."""
    try:
        data = json.loads((data_dir / HOLDER_NAME).read_text(encoding="utf-8"))
        holder = Holder(int(data["pid"]), str(data["host"]), str(data["started"]), data["command"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if holder.host == socket.gethostname() and not _alive(holder.pid):
        return None
    return holder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class DataDirLock:
    """``with DataDirLock(data_dir, "mailrouter serve"):`` — or :class:`DataDirBusyError`."""

    def __init__(self, data_dir: Path, command: str) -> None:
        self.data_dir = Path(data_dir)
        self.command = command
        self._lock = FileLock(str(self.data_dir / LOCK_NAME), timeout=0, mode=FILE_MODE)
        self._note = self.data_dir / HOLDER_NAME

    def acquire(self) -> DataDirLock:
        private_dir(self.data_dir)
        try:
            self._lock.acquire()
        except Timeout:
            holder = read_holder(self.data_dir)
            raise DataDirBusyError(
                busy_message(holder, self.data_dir, socket.gethostname())
            ) from None
        me = Holder(os.getpid(), socket.gethostname(), now_iso(), self.command)
        write_private(self._note, json.dumps(asdict(me)) + "\n")
        return self

    def release(self) -> None:
        if not self._lock.is_locked:
            return
        with contextlib.suppress(FileNotFoundError):
            self._note.unlink()
        self._lock.release()

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
