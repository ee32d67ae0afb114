"""``mailrouter selftest`` against the Ollama-compatible test server: every check passes, the
report says what was checked, and the store is left as it was found."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.fixtures.ollama import OllamaEndpoint

pytestmark = pytest.mark.timeout(600)


def store(server: OllamaEndpoint) -> tuple[list[dict[str, object]], list[str] | None]:
    """The models ``/api/tags`` lists, and the blob files on disk (the test server only)."""
    models = httpx.get(f"{server.url}/api/tags", timeout=30).json()["models"]
    return models, server.get("/_test/blobs").json()["blobs"] if server.test_server else None


def test_selftest_reports_every_check_and_leaves_the_store_clean(
    tmp_path: Path, ollama_server: OllamaEndpoint
) -> None:
    config = tmp_path / "mailrouter.toml"
    config.write_text(
        f"data_dir = {json.dumps(str(tmp_path / 'data'))}\n"
        f"[classifier]\nollama_host = {json.dumps(ollama_server.url)}\n",
        encoding="utf-8",
    )
    before = store(ollama_server)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROUTER_")}
    done = subprocess.run(
        [sys.executable, "-m", "mailrouter", "-c", str(config), "selftest"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env | {"MAILROUTER_NO_KEYRING": "1", "HF_HUB_OFFLINE": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = done.stdout.split("```text\n", 1)[1].split("```", 1)[0]
    lines = report.splitlines()
    assert lines[0].startswith("mailrouter selftest, ")
    assert lines[1].startswith("machine: Linux ") and "mlx-lm " in lines[2]
    checks = [line.split()[1] for line in lines if line[:1] in "✓✗"]
    assert checks == ["ollama", "tiny", "train,", "parameters", "classify", "repeat", "store"]
    assert all(line.startswith("✓") for line in lines if line[:1] in "✓✗"), report
    assert "repeat_penalty 1, temperature 0, num_ctx 512" in report
    assert "logprobs with 20 alternatives a token" in report
    assert lines[-1].startswith("7 of 7 checks passed in ")
    assert store(ollama_server) == before  # the models, and no blob left behind
    assert not (tmp_path / "data").exists()  # the user's data folder is not touched
