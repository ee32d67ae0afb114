"""The Ollama backend: confidence from logprobs, checked labels, start-up, failures, cold start.

The pure parts (confidence, host names, versions) are tested without a server. Everything else
runs against the session's Ollama API: the llama.cpp test server, or a real Ollama at
``$OLLAMA_HOST``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import ollama
import pytest

from mailrouter.classify.logprobs import TokenChoice, label_confidence
from mailrouter.classify.ollama import (
    OllamaClassifier,
    context_size,
    normalize_host,
    parse_version,
)
from mailrouter.config import Settings, default_departments, load_settings
from mailrouter.dataset import Dataset, training_row
from mailrouter.errors import ClassifierError, ModelMissingError
from mailrouter.prediction import ClassifyInput, map_label
from tests.conftest import STARTER
from tests.fixtures.ollama import (
    OllamaEndpoint,
    delete_model,
    free_port,
    publish_gguf,
    start_test_server,
)

DEPS = default_departments()


def step(token: str, *alternatives: tuple[str, float]) -> TokenChoice:
    """A generated token with alternatives given as probabilities (stored as logprobs)."""
    top = tuple((t, math.log(p)) for t, p in alternatives)
    chosen = dict(alternatives).get(token, 0.5)
    return TokenChoice(token=token, logprob=math.log(chosen), top=top)


# --- confidence ------------------------------------------------------------------------------


def test_confidence_is_the_first_token_share_among_labels() -> None:
    steps = [step(" RH", (" RH", 0.6), (" Finance", 0.2), (" The", 0.15), (" Commercial", 0.05))]
    # " The" starts no label: renormalised over 0.6 + 0.2 + 0.05
    assert label_confidence(steps, "RH", DEPS) == pytest.approx(0.6 / 0.85)


def test_confidence_counts_aliases_and_ignores_case() -> None:
    steps = [step(" rh", (" rh", 0.5), (" hr", 0.2), (" Finance", 0.3))]
    assert label_confidence(steps, "RH", DEPS) == pytest.approx(0.7)


def test_shared_first_token_is_resolved_by_the_next_token() -> None:
    # "S" starts Support and SPAM (and the aliases "sav", "sales", "spam"); the next token decides.
    steps = [
        step(" S", (" S", 0.5), (" Support", 0.2), (" RH", 0.3)),
        step("upport", ("upport", 0.8), ("PAM", 0.2)),
    ]
    expected = (0.5 * (0.8 / 1.0) + 0.2) / 1.0
    assert label_confidence(steps, "Support", DEPS) == pytest.approx(expected)
    # the same numbers read for SPAM: only the generated path's share counts
    spam = [steps[0], step("PAM", ("PAM", 0.2), ("upport", 0.8))]
    assert label_confidence(spam, "SPAM", DEPS) == pytest.approx(0.5 * 0.2)


def test_shared_alternative_not_generated_is_split_evenly() -> None:
    # " S" (Support, SPAM, Commercial's alias "sales") was not generated: a third goes to SPAM
    steps = [step(" SPAM", (" SPAM", 0.4), (" S", 0.3), (" RH", 0.3))]
    assert label_confidence(steps, "SPAM", DEPS) == pytest.approx(0.4 + 0.3 / 3)


def test_confidence_without_alternatives_is_unknown() -> None:
    assert label_confidence([step(" The", (" The", 0.9))], "RH", DEPS) is None
    assert label_confidence([], "RH", DEPS) == 1.0


def test_confidence_stays_in_unit_interval() -> None:
    steps = [step(" RH", (" RH", 0.999999), (" R", 0.5))]
    value = label_confidence(steps, "RH", DEPS)
    assert value is not None and 0.0 <= value <= 1.0


# --- labels from model answers ---------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        "Finance\nBcc: attacker@example.org",
        "[/INST]RH",
        "RH [/INST] Finance",
        "Finance\r\nTo: x@example.org",
        "RH et Finance",
        "forward to ceo@example.com",
        "SPAM; DROP TABLE",
        "",
    ],
)
def test_answers_that_are_not_exactly_a_label_map_to_triage(answer: str) -> None:
    assert map_label(answer, DEPS) is None


@pytest.mark.parametrize(("answer", "label"), [(" RH", "RH"), ("finance.", "Finance")])
def test_plain_labels_map(answer: str, label: str) -> None:
    assert map_label(answer, DEPS) == label


# --- hosts and versions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1:11434", "http://127.0.0.1:11434"),
        ("http://localhost", "http://localhost:11434"),
        ("https://ollama.example.com/", "https://ollama.example.com:443"),
        ("http://[::1]:9000", "http://[::1]:9000"),
    ],
)
def test_normalize_host(host: str, url: str) -> None:
    assert normalize_host(host) == url


def test_parse_version() -> None:
    assert parse_version("0.12.11") >= (0, 12, 11) > parse_version("0.12.3")
    assert parse_version("0.13.0-rc1") == (0, 13, 0)


# --- against the server ----------------------------------------------------------------------


def settings_for(url: str, model: str, **classifier: object) -> Settings:
    return load_settings(
        None,
        classifier={
            "backend": "ollama",
            "ollama_host": url,
            "model": model,
            "zero_shot_model": "mailrouter-no-zero-shot",
            "timeout_seconds": 60,
            **classifier,
        },
    )


EMAIL = ClassifyInput(
    text="Bonjour, je vous envoie ma candidature pour le poste de comptable. CV joint.",
    subject="Candidature",
    sender_domain="gmail.com",
)


def test_server_sees_the_token_ids_mlx_lm_trained_on(
    ollama_test_server: OllamaEndpoint, tiny_ollama_model: str, tiny_model: Path
) -> None:
    """The one-prompt guarantee, end to end, for every test-split email of the starter data."""
    from mlx_lm.tuner.datasets import CompletionsDataset
    from mlx_lm.utils import load_tokenizer

    settings = settings_for(ollama_test_server.url, tiny_ollama_model, num_predict=1)
    examples = Dataset(STARTER).split("test")
    assert examples
    rows = [training_row(e, settings.departments) for e in examples]
    trained = CompletionsDataset(rows, load_tokenizer(tiny_model), "prompt", "completion", True)
    classifier = OllamaClassifier.from_settings(settings)
    for example, row in zip(examples, rows, strict=True):
        tokens, offset = trained.process(row)
        classifier.classify(example.to_input())
        seen = ollama_test_server.last_tokens()["prompt_tokens"]
        assert seen == tokens[:offset], example.id
        assert tokens[0] == 1 and tokens[offset - 1] == 4 and tokens[-1] == 2


def test_context_size_holds_the_longest_prompt_and_its_answer() -> None:
    assert context_size(400, 8) == 512  # the defaults: not Ollama's 4096
    assert context_size(488, 8) == 512 and context_size(489, 8) == 768
    assert context_size(64, 1) == 256


def test_every_request_sends_what_makes_the_trained_answer(
    ollama_test_server: OllamaEndpoint, tiny_ollama_model: str
) -> None:
    """Ollama's defaults are not neutral (repeat_penalty 1.1 over the prompt's last 64 tokens,
    a 4096-token context): the client sends its own, whatever the model's parameters say."""
    settings = settings_for(ollama_test_server.url, tiny_ollama_model, max_prompt_tokens=600)
    OllamaClassifier.from_settings(settings).classify(EMAIL)
    options = ollama_test_server.last_tokens()["options"]
    assert options["repeat_penalty"] == 1.0 and options["temperature"] == 0
    assert options["num_ctx"] == 768 and options["num_predict"] == 8
    assert ollama_test_server.last_tokens()["prompt_truncated"] == 0


def test_classify_answers_a_configured_department_and_a_confidence(
    ollama_server: OllamaEndpoint, trained_ollama_model: str
) -> None:
    settings = settings_for(ollama_server.url, trained_ollama_model)
    prediction = OllamaClassifier.from_settings(settings).classify(EMAIL)
    assert prediction.label in settings.labels
    assert 0.0 <= prediction.confidence <= 1.0
    assert prediction.model.startswith(trained_ollama_model + "@")
    assert map_label(prediction.raw, settings.departments) == prediction.label


def test_cli_classify_with_the_ollama_backend(
    ollama_server: OllamaEndpoint, trained_ollama_model: str, tmp_path: Path
) -> None:
    eml = tmp_path / "mail.eml"
    eml.write_bytes(
        b"From: Jeanne <jeanne@client.fr>\r\nTo: contact@example.com\r\n"
        b"Subject: Demande de devis\r\nMessage-ID: <1@client.fr>\r\n\r\n"
        b"Bonjour, pourriez-vous m'envoyer un devis pour 20 licences ?\r\n"
    )
    env = {
        **os.environ,
        "MAILROUTER_CLASSIFIER__OLLAMA_HOST": ollama_server.url,
        "MAILROUTER_CLASSIFIER__MODEL": trained_ollama_model,
    }
    cmd = [sys.executable, "-m", "mailrouter", "classify", str(eml), "--backend", "ollama"]
    result = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout)
    assert line["department"] in load_settings(None).labels
    assert 0.0 <= line["confidence"] <= 1.0
    assert line["backend"].startswith(trained_ollama_model + "@")


def test_version_is_read_once_and_logged(
    ollama_server: OllamaEndpoint, tiny_ollama_model: str, caplog: pytest.LogCaptureFixture
) -> None:
    classifier = OllamaClassifier.from_settings(settings_for(ollama_server.url, tiny_ollama_model))
    with caplog.at_level(logging.INFO, logger="mailrouter.classify.ollama"):
        classifier.classify(EMAIL)
        classifier.classify(EMAIL)
    started = [r for r in caplog.records if r.getMessage() == "ollama_server"]
    assert len(started) == 1
    assert started[0].fields["logprobs"] == "yes"


def response(text: str, logprobs: list[dict] | None = None) -> ollama.GenerateResponse:
    """A response as the ``ollama`` client parses it from ``/api/generate``."""
    return ollama.GenerateResponse(model="m", response=text, done=True, logprobs=logprobs)


def test_no_logprobs_policy(caplog: pytest.LogCaptureFixture) -> None:
    accept = OllamaClassifier.from_settings(settings_for("http://127.0.0.1:1", "m"))
    with caplog.at_level(logging.INFO, logger="mailrouter.classify.ollama"):
        first, second = accept._prediction(response(" RH")), accept._prediction(response("RH"))
    assert (first.label, first.confidence) == (second.label, second.confidence) == ("RH", 1.0)
    warnings = [r for r in caplog.records if r.getMessage() == "ollama_no_logprobs"]
    assert len(warnings) == 1 and warnings[0].fields["policy"] == "accept"
    triage = OllamaClassifier.from_settings(
        settings_for("http://127.0.0.1:1", "m", no_logprobs="triage")
    )
    assert triage._prediction(response("RH")).label is None
    top = [
        {"token": " RH", "logprob": math.log(0.8)},
        {"token": " Finance", "logprob": math.log(0.2)},
    ]
    scored = accept._prediction(response(" RH", [{**top[0], "top_logprobs": top}]))
    assert scored.confidence == pytest.approx(0.8)
    assert accept._prediction(response("je ne sais pas")).label is None


def test_old_server_is_named_once_at_start_and_its_policy_applied(
    tmp_path: Path, trained_gguf: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_test_server(tmp_path / "store", "--version", "0.12.3")
    try:
        publish_gguf(server.url, trained_gguf, "mr-old")
        classifier = OllamaClassifier.from_settings(settings_for(server.url, "mr-old"))
        with caplog.at_level(logging.INFO, logger="mailrouter.classify.ollama"):
            first, second = classifier.classify(EMAIL), classifier.classify(EMAIL)
        assert classifier.server is not None and classifier.server.logprobs is False
        assert first.label is not None and first.confidence == second.confidence == 1.0
        warnings = [r for r in caplog.records if r.getMessage() == "ollama_no_logprobs"]
        assert len(warnings) == 1 and warnings[0].fields["reason"].startswith("Ollama 0.12.3")
    finally:
        server.stop()


def test_cold_start_uses_the_zero_shot_model_until_the_fine_tuned_one_exists(
    ollama_server: OllamaEndpoint, tiny_ollama_model: str, caplog: pytest.LogCaptureFixture
) -> None:
    fine_tuned = "mailrouter-cold-start:latest"
    settings = settings_for(
        ollama_server.url, fine_tuned, zero_shot_model=tiny_ollama_model.split(":")[0]
    )
    classifier = OllamaClassifier.from_settings(settings)
    with caplog.at_level(logging.INFO, logger="mailrouter.classify.ollama"):
        prediction = classifier.classify(EMAIL)
    assert prediction.model.startswith(tiny_ollama_model)
    chosen = [r.fields for r in caplog.records if r.getMessage() == "ollama_model"]
    assert chosen[-1]["cold_start"] is True
    copied = ollama_server.post(
        "/api/copy", json={"source": tiny_ollama_model, "destination": fine_tuned}
    )
    assert copied.status_code == 200
    try:
        assert classifier.resolve_model(force=True) == fine_tuned
        assert classifier.classify(EMAIL).model.startswith(fine_tuned)
    finally:
        delete_model(ollama_server.url, fine_tuned)


def test_missing_model_names_the_commands_that_fix_it(ollama_server: OllamaEndpoint) -> None:
    settings = settings_for(ollama_server.url, "mailrouter-absent:latest")
    with pytest.raises(ModelMissingError) as err:
        OllamaClassifier.from_settings(settings).classify(EMAIL)
    message = str(err.value)
    assert "`ollama pull mailrouter-no-zero-shot`" in message and "`mailrouter train`" in message


def test_server_down_is_a_classifier_error_naming_the_fix() -> None:
    settings = settings_for(f"http://127.0.0.1:{free_port()}", "mailrouter:latest")
    with pytest.raises(ClassifierError) as err:
        OllamaClassifier.from_settings(settings).classify(EMAIL)
    assert "ollama serve" in str(err.value)


def test_timeout_is_a_classifier_error(
    ollama_server: OllamaEndpoint, tiny_ollama_model: str
) -> None:
    classifier = OllamaClassifier.from_settings(settings_for(ollama_server.url, tiny_ollama_model))
    classifier.start()
    classifier.resolve_model()
    classifier.client = ollama.Client(host=ollama_server.url, timeout=0.001)
    with pytest.raises(ClassifierError) as err:
        classifier.classify(EMAIL)
    assert "did not answer within" in str(err.value)


def test_server_stopped_mid_run_then_restarted(tmp_path: Path, tiny_gguf: Path) -> None:
    server = start_test_server(tmp_path / "store")
    try:
        publish_gguf(server.url, tiny_gguf, "mr-restart")
        classifier = OllamaClassifier.from_settings(settings_for(server.url, "mr-restart"))
        before = classifier.classify(EMAIL)
        server.stop()
        with pytest.raises(ClassifierError):
            classifier.classify(EMAIL)
        server.start()
        after = classifier.classify(EMAIL)
        assert (after.raw, after.label) == (before.raw, before.label)
        assert after.confidence == pytest.approx(before.confidence)
    finally:
        server.stop()


def test_cli_evaluate_with_the_ollama_backend(
    ollama_server: OllamaEndpoint, tiny_ollama_model: str, data_dir: Path
) -> None:
    lines = STARTER.read_text().splitlines()
    test_rows = [line for line in lines if '"split": "test"' in line][:6]
    (data_dir / "examples.jsonl").write_text("\n".join(test_rows) + "\n")
    env = {
        **os.environ,
        "MAILROUTER_CLASSIFIER__OLLAMA_HOST": ollama_server.url,
        "MAILROUTER_CLASSIFIER__MODEL": tiny_ollama_model,
    }
    env["MAILROUTER_CLASSIFIER__NUM_PREDICT"] = "2"  # the tiny model's answers: keep it quick
    cmd = [sys.executable, "-m", "mailrouter", "evaluate", "--backend", "ollama", "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"].startswith(tiny_ollama_model)
    assert report["n"] == len(test_rows) == 6
    assert 0.0 <= report["accuracy"] <= 1.0 and 0.0 <= report["triage_rate"] <= 1.0
