"""The training loop's parts without a model: output parsing, base model errors, registry, disk."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mailrouter.calibration import ollama_path
from mailrouter.config import load_settings
from mailrouter.errors import ConfigError, TrainingError
from mailrouter.state import State
from mailrouter.tokens import kept_dir
from mailrouter.training import registry
from mailrouter.training.basemodel import (
    base_record,
    download,
    pinned_revision,
    resolve_base_model,
)
from mailrouter.training.job import settings_payload
from mailrouter.training.lora import parse_line
from mailrouter.training.publish import (
    client,
    float_gguf_bytes,
    gguf_dtype,
    model_digests,
    model_names,
    promote,
    prune,
    version_name,
)
from tests.fixtures.ollama import publish_gguf


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        # mlx-lm 0.30+: a table, with colour codes unless NO_COLOR is set.
        (
            "    10    \x1b[1m8.938 ▼\x1b[0m    \x1b[1m  1,234\x1b[0m      0.1k",
            ("train", 10, 8.938, 1234.0),
        ),
        ("   120    2.010 ▲      512     12.5k", ("train", 120, 2.01, 512.0)),
        ("    15    \x1b[1mval\x1b[0m \x1b[1m8.316\x1b[0m    1.91s", ("val", 15, 8.316, None)),
        # older mlx-lm: one sentence per report.
        (
            "Iter 20: Train loss 1.234, Learning Rate 1.000e-05, It/sec 0.5, Tokens/sec 300.5, "
            "Trained Tokens 1000, Peak mem 5.1 GB",
            ("train", 20, 1.234, 300.5),
        ),
        ("Iter 1: Val loss 2.500, Val took 3.2s", ("val", 1, 2.5, None)),
        ("Trainable parameters: 0.084% (0.004M/4.268M)", None),
        ("  iter   train_loss     tok/s     tokens", None),
        ("Loading pretrained model", None),
    ],
)
def test_progress_lines_are_parsed(line: str, parsed: tuple | None) -> None:
    assert parse_line(line) == parsed


def test_local_base_model_is_used_as_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    settings = load_settings(training={"base_model": str(tmp_path)})
    assert resolve_base_model(settings) == tmp_path.resolve()
    (tmp_path / "config.json").unlink()
    with pytest.raises(TrainingError, match=r"without config\.json"):
        resolve_base_model(settings)


def test_offline_and_not_cached_says_so() -> None:
    settings = load_settings(training={"base_model": "example-org/not-cached-model"})
    with pytest.raises(TrainingError, match="not in the Hugging Face cache"):
        resolve_base_model(settings)


class _Hub(BaseHTTPRequestHandler):
    """A Hub that answers every request as a gated repository would (403 + X-Error-Code)."""

    status = 403
    code = "GatedRepo"

    def do_GET(self) -> None:
        self.send_response(self.status)
        if self.code:
            self.send_header("X-Error-Code", self.code)
        self.send_header("X-Error-Message", "Access to this model is restricted")
        self.send_header("Content-Type", "application/json")
        body = json.dumps({"error": "restricted"}).encode()
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_gated_model_without_token_names_the_licence_and_the_token(hub: str) -> None:
    with pytest.raises(TrainingError) as err:
        download("mistralai/Mistral-7B-Instruct-v0.3", token=None, endpoint=hub)
    message = str(err.value)
    assert (
        "accept its licence at https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.3" in message
    )
    assert "HF_TOKEN" in message


def test_gated_model_with_a_token_without_access_says_accept_the_licence(hub: str) -> None:
    with pytest.raises(TrainingError, match="has no access to it: accept the licence"):
        download("mistralai/Mistral-7B-Instruct-v0.3", token="hf_not_a_real_token", endpoint=hub)


def test_registry_versions_runs_and_stale_runs(tmp_path: Path) -> None:
    with State(tmp_path / "state.db") as state:
        assert registry.next_version(state) == "v1"
        registry.add_version(state, "v1", "m:v1", {"ollama": {"accuracy": 0.5}})
        registry.add_version(state, "v2", "m:v2", {})
        registry.set_status(state, "v1", "in_service")
        registry.set_status(state, "v2", "in_service")
        assert registry.in_service(state).version == "v2"
        assert [m.status for m in registry.versions(state)] == ["in_service", "retired"]
        registry.remove_version(state, "v2")
        assert registry.next_version(state) == "v3"  # never reused

        first = registry.start_run(state)
        registry.finish_run(state, first, "rejected", "worse", dataset_hash="abc")
        crashed = registry.start_run(state)
        mine = registry.start_run(state)
        assert registry.close_stale_runs(state, keep=mine) == 1
        assert registry.run(state, crashed).decision == "failed"
        assert registry.run(state, mine).decision == registry.RUNNING
        assert registry.last_trained_hash(state) == "abc"
        registry.update_run(state, mine, metrics={"a": 1})
        registry.update_run(state, mine, metrics={"b": 2})
        assert registry.run(state, mine).metrics == {"a": 1, "b": 2}


def test_disk_estimate(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "config.json").write_text(json.dumps({"quantization": {"bits": 4}}))
    assert float_gguf_bytes(tmp_path) == 4000  # 4-bit weights become 16-bit
    assert gguf_dtype(tmp_path) == "f16"
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    assert float_gguf_bytes(tmp_path) == 1000
    assert gguf_dtype(tmp_path) == "f32"


def test_child_settings_carry_no_secret() -> None:
    settings = load_settings(
        training={"hf_token": "hf_secret"}, mailbox={"password": "imap-secret"}
    )
    text = json.dumps(settings_payload(settings))
    assert "secret" not in text
    assert Path(settings_payload(settings)["data_dir"]).is_absolute()


def test_adapter_route_is_gone_with_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r'"adapter" was removed: .* use "gguf"'):
        load_settings(training={"publish": "adapter"})


def test_quantize_is_one_ollama_accepts() -> None:
    for accepted in ("q4_K_M", "Q4_K_M", "q8_0", "q4_k_s", "f16", ""):
        assert load_settings(training={"quantize": accepted}).training.quantize == accepted
    with pytest.raises(ConfigError, match=r"'q4_0' is not a quantisation Ollama accepts"):
        load_settings(training={"quantize": "q4_0"})


def test_base_revision_is_what_is_fetched_and_recorded(
    hub: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_Hub, "status", 404)
    monkeypatch.setattr(_Hub, "code", "RevisionNotFound")
    with pytest.raises(
        TrainingError, match=r"has no revision 'abc123' \(training\.base_revision\)"
    ):
        download("example-org/model", token=None, endpoint=hub, revision="abc123")

    snapshot = tmp_path / "models--o--m" / "snapshots" / "0123abcd"
    settings = load_settings(training={"base_model": "o/m", "base_revision": "0123abcd"})
    assert base_record(settings, snapshot) == {"name": "o/m", "revision": "0123abcd"}
    local = load_settings(training={"base_model": str(tmp_path), "base_revision": "0123abcd"})
    (tmp_path / "config.json").write_text("{}")
    assert base_record(local, tmp_path) == {"name": str(tmp_path), "revision": None}
    with pytest.raises(TrainingError, match="is a local folder: leave base_revision empty"):
        resolve_base_model(local)


def test_an_empty_base_revision_keeps_the_commit_of_the_model_in_service() -> None:
    """A new upload to the base's repository never changes what a nightly run trains on."""
    served = {"name": "o/m", "revision": "0123abcd"}
    newest = load_settings(training={"base_model": "o/m"})
    assert pinned_revision(newest, served) == "0123abcd"
    assert pinned_revision(newest, None) == ""  # first run: newest, then recorded
    other_repo = load_settings(training={"base_model": "o/other"})
    assert pinned_revision(other_repo, served) == ""
    configured = load_settings(training={"base_model": "o/m", "base_revision": "feedbeef"})
    assert pinned_revision(configured, served) == "feedbeef"


def test_old_versions_are_deleted_through_the_api(
    tmp_path: Path, tiny_gguf: Path, ollama_server
) -> None:
    namespace = f"mrprune{tmp_path.name[-6:].lower()}"
    settings = load_settings(
        data_dir=tmp_path,
        classifier={"ollama_host": ollama_server.url, "model": f"{namespace}:latest"},
        training={"keep_versions": 2},
    )
    api = client(settings)
    with State(settings.state_path) as state:
        for number in (1, 2, 3):
            version = f"v{number}"
            publish_gguf(ollama_server.url, tiny_gguf, version_name(settings, version))
            registry.add_version(state, version, version_name(settings, version), {})
        promote(settings, state, "v1")  # the one in service is never pruned
        digest = model_digests(api)[version_name(settings, "v1")]
        kept = [kept_dir(settings.models_dir, digest), kept_dir(settings.models_dir, "ab" * 32)]
        for folder in kept:
            folder.mkdir(parents=True)
        gone = ollama_path(settings.models_dir, "cd" * 32)
        gone.parent.mkdir(parents=True)
        gone.write_text("{}")
        assert prune(settings, state, api=api) == ["v2"]
        # Prompt files and calibrations of models no longer on the server go with them.
        assert kept[0].is_dir() and not kept[1].exists() and not gone.exists()
        assert [m.version for m in registry.versions(state)] == ["v3", "v1"]
    on_server = model_names(api)
    assert version_name(settings, "v2") not in on_server
    assert {version_name(settings, "v1"), version_name(settings, "v3")} <= on_server


def test_the_job_side_never_imports_mlx() -> None:
    """The service starts training through these modules; MLX must load in the child only."""
    code = (
        "import sys, mailrouter.training.job, mailrouter.training.publish, mailrouter.cli.train;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
