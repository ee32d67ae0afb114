"""Files and folders that hold customer text: readable by their owner only.

The data folder holds the state database, the dataset, logs, exports and job logs, all of which
quote customer mail. The CLI sets a ``0o077`` umask for the whole process (and so for the
training child and its ``mlx_lm`` grandchild), which covers every file any library creates; the
helpers here are for the files mailrouter creates itself, so their modes hold when a module is
called directly (tests, another program) under a looser umask.
"""

from __future__ import annotations

import contextlib
import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

PRIVATE_UMASK = 0o077
FILE_MODE = 0o600
DIR_MODE = 0o700

#: The starter dataset: the checkout's ``data/examples.jsonl``, shipped as the package data of
#: ``mailrouter.starter`` (see setup.py), so an installed wheel has it too.
STARTER_EXAMPLES: Traversable = resources.files("mailrouter.starter") / "examples.jsonl"
#: The documented example configuration, every field with its comment.
EXAMPLE_CONFIG: Traversable = (
    resources.files("mailrouter.example_config") / "mailrouter.example.toml"
)
#: What to do about a data folder without a dataset (the default one starts empty).
NO_DATASET_FIX = (
    "`mailrouter init` copies the starter data into the data folder, "
    "`mailrouter dataset import FILE` adds your own"
)


def private_umask() -> int:
    """Set the owner-only umask for this process and its children; returns the previous one."""
    return os.umask(PRIVATE_UMASK)


def make_dirs(path: Path) -> Path:
    """``mkdir -p`` where every folder it creates is ``0o700`` (``Path.mkdir`` gives the parents
    it creates the default mode); folders that exist are left as they are."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=DIR_MODE)
    return path


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) as ``0o700``; an existing one is tightened too.

    Only for folders mailrouter owns (the data folder and what is under it): a configured log
    file's parent, say ``/var/log``, is left as it is.
    """
    make_dirs(path)
    tighten(path, DIR_MODE)
    return path


def private_file(path: Path) -> Path:
    """Make sure ``path`` exists with mode ``0o600`` (created empty when missing), so that a
    later ``open("a")`` or a library that opens it keeps that mode."""
    make_dirs(path.parent)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE))
    tighten(path, FILE_MODE)
    return path


def private_new_file(path: Path) -> Path:
    """Create ``path`` empty as ``0o600`` when it does not exist; an existing one is only
    ``chmod``-ed, never opened. For SQLite's database file: closing any descriptor of it would
    drop the locks this process's connections hold on it (POSIX record locks)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    tighten(path, FILE_MODE)
    return path


def tighten(path: Path, mode: int = FILE_MODE) -> None:
    """``chmod`` an existing file or folder of ours; one of another user is that user's."""
    with contextlib.suppress(FileNotFoundError, PermissionError):
        os.chmod(path, mode)


def write_private(path: Path, text: str) -> Path:
    """Replace the contents of ``path`` with ``text``, mode ``0o600`` from the first byte."""
    fd = os.open(private_file(path), os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def install_starter(data_dir: Path, starter: Traversable = STARTER_EXAMPLES) -> Path | None:
    """Copy the starter dataset into a new data folder; ``None`` when there is nothing to do
    (an examples file exists already, or this installation has no starter data)."""
    target = private_dir(data_dir) / "examples.jsonl"
    if target.exists() or not starter.is_file():
        return None
    private_file(target).write_bytes(starter.read_bytes())
    return target
