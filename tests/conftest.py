"""Shared test set-up: hermetic environment, a temp data directory, the starter data.

Tests never touch the network (``HF_HUB_OFFLINE``), the Keychain, or the repository's ``data/``
and ``config/``: each test runs in its own temp directory with its own data dir.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["MAILROUTER_NO_KEYRING"] = "1"
os.environ.pop("MAILROUTER_CONFIG", None)

# After the environment above: libraries read it when they are imported.
from mailrouter.cli.app import console, err_console

REPO = Path(__file__).resolve().parent.parent
STARTER = REPO / "data" / "examples.jsonl"
TEST_DATA = REPO / "tests" / "data"

pytest_plugins = [
    "tests.fixtures.mail",
    "tests.fixtures.models",
    "tests.fixtures.ollama",
    "tests.fixtures.corrections",
    "tests.fixtures.smollm2",
]


def require(condition: bool, reason: str) -> None:
    """Skip when a test server is missing, but fail under CI, where everything must be there."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI=true: a missing server is a failure)")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _hermetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a temp dir with a temp data dir, so nothing in the repository is written."""
    for key in list(os.environ):
        if key.startswith("MAILROUTER_") and key != "MAILROUTER_NO_KEYRING":
            monkeypatch.delenv(key)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    data = work / "data"
    data.mkdir()
    monkeypatch.setenv("MAILROUTER_DATA_DIR", str(data))
    monkeypatch.setenv("MAILROUTER_CORRECTIONS__TOKEN_KEY", "test-token-key-not-secret")
    return data


@pytest.fixture(autouse=True)
def _wide_cli_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's consoles are made once per process, at import, with the width the terminal had
    then: a command run in-process (CliRunner) after other tests would print tables cut to 80
    columns, whatever COLUMNS says. Give every test a wide one (rich keeps it in ``_width``)."""
    for shared in (console, err_console):
        monkeypatch.setattr(shared, "_width", 250)


@pytest.fixture
def data_dir(_hermetic: Path) -> Path:
    return _hermetic


@pytest.fixture
def starter_data(data_dir: Path) -> Path:
    """A temp copy of the bundled starter dataset, as ``<data_dir>/examples.jsonl``."""
    target = data_dir / "examples.jsonl"
    shutil.copyfile(STARTER, target)
    return target
