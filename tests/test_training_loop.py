"""The whole loop on the tiny model: train → evaluate → publish as GGUF → classify through Ollama,
the gate refusing a candidate trained on shuffled labels, and a rollback through the API.

One test, in phases, because each phase needs the model the previous one put in service and a
training costs tens of seconds on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest

from mailrouter.calibration import load, ollama_path
from mailrouter.state import State
from mailrouter.training import publish, registry
from mailrouter.training.job import run_job
from tests.training_setup import (
    deranged,
    starter_slice,
    tiny_settings,
    write_config,
    write_examples,
)

pytestmark = pytest.mark.timeout(900)


def mailrouter(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROUTER_")}
    env["MAILROUTER_NO_KEYRING"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "mailrouter", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )


def digests(url: str) -> dict[str, str]:
    models = httpx.get(f"{url}/api/tags", timeout=30).json()["models"]
    return {m["name"]: m["digest"] for m in models}


def test_train_publish_classify_gate_and_rollback(
    tmp_path: Path, tiny_model: Path, ollama_server
) -> None:
    namespace = f"mrloop{os.getpid()}"
    # A candidate replaces the model in service only when strictly better (gain 0.01): on a tiny
    # random model both may be at chance, and a tie must not replace the model in service.
    settings = tiny_settings(
        tmp_path / "data", tiny_model, ollama_server.url, namespace, min_accuracy_gain=0.01
    )
    examples = starter_slice()
    write_examples(settings.examples_path, examples)
    config = write_config(tmp_path / "mailrouter.toml", settings)
    latest = publish.latest_name(settings)
    n_test = sum(e.split == "test" for e in examples)

    # 1. `mailrouter train --now`: the first candidate is trained, evaluated and published.
    done = mailrouter(config, "train", "--now")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "published" in done.stdout
    with State(settings.state_path) as state:
        (run,) = registry.runs(state)
        v1 = registry.in_service(state)
    assert run.decision == "published" and v1 is not None and v1.version == "v1"
    assert run.counts == {"train": 16, "valid": 8, "test": 8}
    assert run.dataset_hash and run.base_model == str(tiny_model)
    assert run.params["iters"] == 6 and run.params["lora_parameters"]["rank"] == 8
    candidate, through_ollama = run.metrics["candidate"], run.metrics["ollama"]
    assert candidate["n"] == through_ollama["n"] == n_test
    # llama.cpp behind the Ollama API gives MLX's greedy answer for every test email.
    assert run.metrics["ollama_differences"] == []
    assert run.metrics["ollama_agreement"] == 1.0
    assert through_ollama["accuracy"] == candidate["accuracy"]
    assert set(run.metrics["durations"]) >= {"train", "evaluate_candidate", "publish"}
    served = digests(ollama_server.url)
    assert served[latest] == served[publish.version_name(settings, "v1")]
    assert (settings.models_dir / "runs" / f"{run.id:04d}" / "adapters").is_dir()
    # Its thresholds, calibrated on the valid split from its answers through Ollama, are kept
    # with its record and under its digest, where the router's classifier looks them up.
    calibration = v1.metrics["calibration"]
    assert calibration["split"] == "valid" and set(calibration["departments"]) == set(
        settings.labels
    )
    assert v1.metrics["digest"] == served[latest] and run.metrics["calibration"] == calibration
    stored = load(ollama_path(settings.models_dir, served[latest]))
    assert stored is not None and stored.to_dict() == calibration
    assert not list(settings.models_dir.rglob("*.gguf"))  # Ollama keeps its own copy

    # `mailrouter classify --backend ollama` answers from the published model.
    test_email = next(e for e in examples if e.split == "test")
    message = EmailMessage()
    message["From"] = "client@example.org"
    message["To"] = "contact@example.com"
    message["Subject"] = test_email.subject or "Question"
    message.set_content(test_email.text)
    eml = tmp_path / "mail.eml"
    eml.write_bytes(message.as_bytes())
    answered = mailrouter(config, "classify", "--backend", "ollama", "--json", str(eml))
    assert answered.returncode == 0, answered.stdout + answered.stderr
    line = json.loads(answered.stdout.strip().splitlines()[-1])
    assert line["backend"].startswith(f"{latest}@")
    assert line["department"] in [*settings.labels, None]

    # 2. Same data again: nothing to learn, the nightly job skips.
    assert run_job(settings).decision == "skipped"

    # 3. A candidate trained on shuffled labels (every department's emails under the next
    #    department's name) is judged on the true test labels and refused; v1 stays in service.
    write_examples(settings.examples_path, deranged(examples, settings.labels))
    refused = run_job(settings)
    assert refused.decision == "rejected", refused.error
    with State(settings.state_path) as state:
        record = registry.run(state, refused.run_id)
        assert registry.in_service(state).version == "v1"
    assert record.reason.startswith("rejected:") and "in service" in record.reason
    assert record.metrics["candidate"]["accuracy"] <= record.metrics["current"]["accuracy"]
    assert record.metrics["current"]["source"] == "ollama"
    assert digests(ollama_server.url)[latest] == served[latest]

    # 4. A second version goes in service, then `models rollback` restores v1 through the API.
    write_examples(settings.examples_path, examples)
    lenient = tmp_path / "lenient.toml"
    write_config(
        lenient,
        settings.model_copy(
            update={"training": settings.training.model_copy(update={"min_accuracy_gain": -1.0})}
        ),
    )
    again = mailrouter(lenient, "train", "--now", "--force", "--iters", "2")
    assert again.returncode == 0, again.stdout + again.stderr
    with State(settings.state_path) as state:
        assert registry.in_service(state).version == "v2"
    listed = mailrouter(config, "models", "list", "--json")
    versions = {v["version"]: v["status"] for v in json.loads(listed.stdout)["versions"]}
    assert versions == {"v2": "in_service", "v1": "retired"}

    rolled = mailrouter(config, "models", "rollback")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    now = digests(ollama_server.url)
    assert now[latest] == now[publish.version_name(settings, "v1")] == served[latest]
    with State(settings.state_path) as state:
        assert registry.in_service(state).version == "v1"
    assert mailrouter(config, "models", "rollback").returncode == 1  # nothing older than v1
    promoted = mailrouter(config, "models", "promote", "v2")
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert digests(ollama_server.url)[latest] == now[publish.version_name(settings, "v2")]
