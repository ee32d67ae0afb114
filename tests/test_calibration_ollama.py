"""The Ollama backend finds the thresholds of the model answering by its digest, on the
Ollama-compatible test server (llama.cpp) with the fine-tuned tiny model."""

from __future__ import annotations

from dataclasses import replace

from mailrouter.calibration import Calibration, Threshold, ollama_path, save
from mailrouter.classify.ollama import OllamaClassifier
from mailrouter.message import Email
from mailrouter.router import decide
from tests.fixtures.ollama import OllamaEndpoint, delete_model
from tests.test_ollama import EMAIL, settings_for


def _digest(server: OllamaEndpoint, name: str) -> str:
    models = server.get("/api/tags").json()["models"]
    return next(m["digest"] for m in models if m["name"] == name)


def test_the_thresholds_follow_the_model_digest(
    ollama_server: OllamaEndpoint, trained_ollama_model: str
) -> None:
    settings = settings_for(ollama_server.url, trained_ollama_model)
    plain = OllamaClassifier.from_settings(settings).classify(EMAIL)
    assert plain.label is not None and plain.threshold is None

    strict = Threshold("calibrated", 0.999, n=10, routed=4, precision=1.0)
    calibration = Calibration(0.95, "valid", dict.fromkeys(settings.labels, strict))
    save(
        ollama_path(settings.models_dir, _digest(ollama_server, trained_ollama_model)), calibration
    )
    classifier = OllamaClassifier.from_settings(settings)
    answer = classifier.classify(EMAIL)
    assert classifier.calibration == calibration
    assert answer.threshold == 0.999
    email = Email(raw_size=1, content_hash="0" * 64, sender="client@example.org", body=EMAIL.text)
    if answer.confidence < 0.999:
        assert decide(answer, email, settings).kind == "triage"
        assert decide(replace(answer, threshold=None), email, settings) != decide(
            answer, email, settings
        )

    copy = "mailrouter-copy:latest"  # what promote does: latest is a copy of vN, same digest
    copied = ollama_server.post(
        "/api/copy", json={"source": trained_ollama_model, "destination": copy}
    )
    assert copied.status_code == 200
    try:
        again = OllamaClassifier.from_settings(settings_for(ollama_server.url, copy))
        assert again.classify(EMAIL).threshold == 0.999
    finally:
        delete_model(ollama_server.url, copy)
