"""Publishing to Ollama leaves its store clean, streams its progress, frees its memory first.

Each test runs its own test server (``tests/ollama_server.py``), which accounts for blobs as
Ollama does: quantising keeps the pushed float GGUF, deleting a model removes the blobs no other
model uses, only a restart prunes the rest (see the server's docstring for the source lines).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailrouter.config import load_settings
from mailrouter.errors import TrainingError
from mailrouter.training.publish import (
    check_disk,
    client,
    create_from_gguf,
    disk_needs,
    model_names,
    ollama_models_dir,
    unload_models,
    unused_blobs,
)
from tests.fixtures.ollama import OllamaEndpoint, private_test_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[OllamaEndpoint]:
    with private_test_server(tmp_path / "store") as endpoint:
        yield endpoint


def _unused(server: OllamaEndpoint) -> list[str]:
    return server.get("/_test/blobs").json()["unused"]


@pytest.mark.parametrize("quantize", ["q8_0", ""])
def test_store_is_clean_after_a_publish(
    server: OllamaEndpoint, tiny_gguf: Path, tmp_path: Path, quantize: str
) -> None:
    """Quantising at create time would leave the pushed float GGUF in Ollama's store, used by no
    model, until Ollama restarts: the publish must leave no such blob, and no staging model."""
    settings = load_settings(
        data_dir=tmp_path, classifier={"ollama_host": server.url}, training={"quantize": quantize}
    )
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(tiny_gguf.read_bytes())
    statuses: list[str] = []
    create_from_gguf(settings, client(settings), "mrclean:v1", gguf, statuses.append)

    assert not gguf.exists()  # removed once Ollama has its copy
    assert model_names(client(settings)) == {"mrclean:v1"}
    shown = server.post("/api/show", json={"model": "mrclean:v1"}).json()
    assert shown["details"]["quantization_level"] == ("Q8_0" if quantize else "F32")
    assert _unused(server) == []
    assert len(server.get("/_test/blobs").json()["blobs"]) == 1
    assert statuses[-1] == "Ollama: success"  # progress streamed (stream=True)
    if quantize:
        # quantisation's progress, in steps of 10 %
        assert "Ollama: quantizing F32 model to Q8_0 0%" in statuses
        assert "Ollama: quantizing F32 model to Q8_0 100%" in statuses


def test_a_refused_quantisation_leaves_no_blob(
    server: OllamaEndpoint, tiny_gguf: Path, tmp_path: Path
) -> None:
    """Ollama's own refusal (here: a type config validation would catch, forced past it) fails
    the publish with Ollama's message, and the float model and its blob are gone too."""
    valid = load_settings(data_dir=tmp_path, classifier={"ollama_host": server.url})
    refused = valid.training.model_copy(update={"quantize": "q4_0"})  # what Ollama refuses
    settings = valid.model_copy(update={"training": refused})
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(tiny_gguf.read_bytes())
    with pytest.raises(TrainingError, match="unsupported quantization type Q4_0"):
        create_from_gguf(settings, client(settings), "mrclean:v2", gguf)
    assert model_names(client(settings)) == set()
    assert server.get("/_test/blobs").json()["blobs"] == []


def test_unload_models_frees_what_ollama_holds(
    server: OllamaEndpoint, tiny_gguf: Path, tmp_path: Path
) -> None:
    from tests.fixtures.ollama import publish_gguf

    publish_gguf(server.url, tiny_gguf, "mrloaded:v1")
    server.post("/api/generate", json={"model": "mrloaded:v1"}).raise_for_status()  # loads it
    assert [m["name"] for m in server.get("/api/ps").json()["models"]] == ["mrloaded:v1"]
    settings = load_settings(data_dir=tmp_path, classifier={"ollama_host": server.url})
    assert unload_models(settings) == ["mrloaded:v1"]
    assert server.get("/api/ps").json()["models"] == []
    assert unload_models(settings) == []


def test_disk_check_names_ollama_store_and_the_need(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama-models"))
    assert ollama_models_dir() == tmp_path / "ollama-models"
    monkeypatch.delenv("OLLAMA_MODELS")
    assert ollama_models_dir() == Path.home() / ".ollama" / "models"

    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama-models"))
    local = load_settings(data_dir=tmp_path)  # Ollama on 127.0.0.1: its store is checked
    run, store, size = tmp_path / "run", tmp_path / "ollama-models", 10**9
    # uploading: the GGUF here and Ollama's copy; quantising: the copy and the quantised file
    assert disk_needs(local, run, size) == [{run: size, store: size}, {store: 2 * size}]
    unquantised = load_settings(data_dir=tmp_path, training={"quantize": ""})
    assert disk_needs(unquantised, run, size) == [{run: size, store: size}]
    remote = load_settings(data_dir=tmp_path, classifier={"ollama_host": "http://gpu-box:11434"})
    assert disk_needs(remote, run, size) == [{run: size}]

    check_disk([{run: 1, store: 1}])  # neither exists yet: their parent's disk counts
    with pytest.raises(TrainingError) as err:  # one disk: the worst phase, 2 x 10^17, not 3 x
        check_disk(disk_needs(local, run, 10**17))
    assert str(err.value).startswith(
        f"not enough disk space to publish: 100000000.0 GB at {run} and 100000000.0 GB at {store}"
    )


def test_unused_blobs_of_a_real_ollama_store(tmp_path: Path) -> None:
    """Read in Ollama's own layout (what a real Ollama keeps under OLLAMA_MODELS)."""
    used, config, stray = ("sha256:" + c * 64 for c in "abc")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for digest in (used, config, stray):
        (blobs / digest.replace(":", "-")).write_bytes(b"x")
    manifest = tmp_path / "manifests" / "registry.ollama.ai" / "library" / "mailrouter" / "v1"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"config": {"digest": config}, "layers": [{"digest": used}]}))
    assert unused_blobs(tmp_path) == [stray]
    assert unused_blobs(tmp_path / "nothing-here") == []
