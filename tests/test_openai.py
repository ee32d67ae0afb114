"""The OpenAI-compatible backend against llama-cpp-python's own server (``llama_cpp.server``).

One server per session serves three models under their aliases: the fine-tuned tiny model (it
answers department names), the untrained tiny model (it answers anything) and a GGUF that
cannot be loaded (the server answers 500), behind an API key. Everything a model says is
checked in code: a label is a configured department or ``None``, confidences are probabilities.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from mailrouter.classify import make_classifier
from mailrouter.classify.concurrent import classify_in_order
from mailrouter.classify.logprobs import TokenChoice
from mailrouter.classify.ollama import OllamaClassifier
from mailrouter.classify.openai import OpenAIClassifier, completion_steps, normalize_base_url
from mailrouter.cli import app
from mailrouter.config import Settings, load_settings, masked_dump
from mailrouter.dataset import Dataset
from mailrouter.doctor import check_openai
from mailrouter.errors import ClassifierError, ClassifierRequestError, ConfigError
from mailrouter.localservers import DovecotServer, SmtpSink, local_config, write_toml
from mailrouter.mail.parse import parse_email
from mailrouter.prediction import ClassifyInput, map_label
from mailrouter.router import decide
from mailrouter.state import State
from mailrouter.wiring import build_pipeline
from tests.conftest import STARTER
from tests.fixtures.mail import examples_for_mail
from tests.fixtures.ollama import OllamaEndpoint, free_port
from tests.fixtures.openai import OpenAIEndpoint, start_llama_cpp_server

KEY = "test-openai-key-not-secret"
TRAINED, TINY, BROKEN = "mailrouter-trained", "mailrouter-tiny", "mailrouter-broken"
EMAIL = ClassifyInput(
    text="Bonjour, je vous envoie ma candidature pour le poste de comptable. CV joint.",
    subject="Candidature",
    sender_domain="gmail.com",
)


@pytest.fixture(scope="session")
def llama_cpp_server(
    tmp_path_factory: pytest.TempPathFactory, trained_gguf: Path, tiny_gguf: Path
) -> Iterator[OpenAIEndpoint]:
    work = tmp_path_factory.mktemp("llama-cpp-server")
    broken = work / "broken.gguf"
    broken.write_bytes(b"GGUF")  # a header and nothing else: llama.cpp cannot load it
    endpoint = start_llama_cpp_server(
        work, {TRAINED: trained_gguf, TINY: tiny_gguf, BROKEN: broken}, api_key=KEY
    )
    yield endpoint
    endpoint.stop()


@pytest.fixture
def server(llama_cpp_server: OpenAIEndpoint, monkeypatch: pytest.MonkeyPatch) -> OpenAIEndpoint:
    """The session's server, with its key where the router reads it (the environment)."""
    monkeypatch.setenv("MAILROUTER_CLASSIFIER__OPENAI_API_KEY", llama_cpp_server.api_key)
    return llama_cpp_server


def settings_for(url: str, model: str = TRAINED, **classifier: object) -> Settings:
    return load_settings(
        None,
        classifier={
            "backend": "openai",
            "openai_base_url": url,
            "openai_model": model,
            "timeout_seconds": 60,
            **classifier,
        },
    )


# --- without a server ---------------------------------------------------------------------------


def test_both_logprobs_shapes_read_alike() -> None:
    legacy = {
        "tokens": [" R", "H"],
        "token_logprobs": [-0.1, -0.2],
        "top_logprobs": [{" R": -0.1, " Finance": -2.5}, {"H": -0.2}],
    }
    chat = {
        "content": [
            {"token": " R", "logprob": -0.1, "top_logprobs": [
                {"token": " R", "logprob": -0.1}, {"token": " Finance", "logprob": -2.5}]},
            {"token": "H", "logprob": -0.2, "top_logprobs": [{"token": "H", "logprob": -0.2}]},
        ]
    }  # fmt: skip
    expected = [
        TokenChoice(" R", -0.1, ((" R", -0.1), (" Finance", -2.5))),
        TokenChoice("H", -0.2, (("H", -0.2),)),
    ]
    assert completion_steps(legacy) == completion_steps(chat) == expected
    assert completion_steps(None) == []


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("https://llm.example.com/v1/", "https://llm.example.com"),
        ("http://10.0.0.5:8080", "http://10.0.0.5:8080"),
    ],
)
def test_base_url(given: str, url: str) -> None:
    assert normalize_base_url(given) == url


def test_the_key_is_never_sent_in_clear_nor_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILROUTER_CLASSIFIER__OPENAI_API_KEY", KEY)
    with pytest.raises(ConfigError, match="use https"):
        OpenAIClassifier(settings_for("http://llm.example.com:8000"))
    remote = OpenAIClassifier(settings_for("https://llm.example.com"))
    assert remote.client.headers["Authorization"] == f"Bearer {KEY}"
    assert OpenAIClassifier(settings_for("http://localhost:8000")).client.headers["Authorization"]
    settings = settings_for("https://llm.example.com")
    assert masked_dump(settings)["classifier"]["openai_api_key"] == "********"
    assert KEY not in repr(settings)
    monkeypatch.delenv("MAILROUTER_CLASSIFIER__OPENAI_API_KEY")
    assert "Authorization" not in OpenAIClassifier(settings_for("http://10.0.0.5")).client.headers


def test_no_logprobs_policy(caplog: pytest.LogCaptureFixture) -> None:
    """A server that answers without log-probabilities: the Ollama backend's policy, said once."""

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"choices": [{"text": " RH", "logprobs": None}]})

    def classifier(**conf: object) -> OpenAIClassifier:
        client = httpx.Client(base_url="http://127.0.0.1:1", transport=httpx.MockTransport(answer))
        return OpenAIClassifier(settings_for("http://127.0.0.1:1", **conf), client=client)

    accept = classifier()
    with caplog.at_level(logging.INFO, logger="mailrouter.classify.openai"):
        first, second = accept.classify(EMAIL), accept.classify(EMAIL)
    assert (first.label, first.confidence) == (second.label, second.confidence) == ("RH", 1.0)
    assert [r.getMessage() for r in caplog.records] == ["openai_no_logprobs"]
    assert classifier(no_logprobs="triage").classify(EMAIL).label is None


def test_the_template_the_served_model_was_trained_with() -> None:
    mistral = OpenAIClassifier(settings_for("http://127.0.0.1:1"))
    assert mistral.render(EMAIL).startswith("[INST]") and "</s>" in mistral.template.stop
    chatml = OpenAIClassifier(settings_for("http://127.0.0.1:1", openai_template="chatml"))
    assert chatml.render(EMAIL).startswith("<|im_start|>user\n")
    assert chatml.render(EMAIL).endswith("<|im_start|>assistant\n")
    assert "<|im_end|>" in chatml.template.stop
    with pytest.raises(ConfigError, match="openai_template = 'vicuna'"):
        OpenAIClassifier(settings_for("http://127.0.0.1:1", openai_template="vicuna"))


def test_the_backend_is_chosen_by_the_configuration() -> None:
    classifier = make_classifier(settings_for("http://127.0.0.1:8000", concurrency=3))
    assert isinstance(classifier, OpenAIClassifier) and classifier.concurrency == 3


# --- against llama_cpp.server ------------------------------------------------------------------


def test_classify_answers_a_department_and_probabilities(server: OpenAIEndpoint) -> None:
    settings = settings_for(server.url)
    prediction = OpenAIClassifier(settings).classify(EMAIL)
    assert prediction.label in settings.labels
    assert map_label(prediction.raw, settings.departments) == prediction.label
    assert 0.0 < prediction.confidence <= 1.0
    assert set(prediction.probabilities) == set(settings.labels)
    assert all(0.0 <= p <= 1.0 for p in prediction.probabilities.values())
    assert prediction.probabilities[prediction.label] == prediction.confidence
    assert prediction.model == TRAINED


def test_the_same_model_answers_as_through_ollama(
    server: OpenAIEndpoint, ollama_server: OllamaEndpoint, trained_ollama_model: str
) -> None:
    """The same GGUF, the same prompt: the same answer, label and confidence from either API."""
    ollama = OllamaClassifier(
        load_settings(
            None,
            classifier={"ollama_host": ollama_server.url, "model": trained_ollama_model,
                        "zero_shot_model": "mailrouter-no-zero-shot"},
        )
    )  # fmt: skip
    openai = OpenAIClassifier(settings_for(server.url))
    items = [e.to_input() for e in Dataset(STARTER).split("test")[:3]]
    for item in items:
        assert openai.render(item) == ollama.render(item)
        a, b = openai.classify(item), ollama.classify(item)
        assert (a.raw, a.label) == (b.raw.strip(), b.label)
        assert a.confidence == pytest.approx(b.confidence, abs=1e-3)


def test_an_answer_outside_the_labels_goes_to_triage(
    server: OpenAIEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(server.url, TINY)
    with caplog.at_level(logging.INFO, logger="mailrouter.classify.openai"):
        prediction = OpenAIClassifier(settings).classify(EMAIL)
    assert prediction.raw and map_label(prediction.raw, settings.departments) is None
    assert prediction.label is None or prediction.label in settings.labels
    assert 0.0 <= prediction.confidence <= 1.0
    email = parse_email(b"From: a@example.org\r\nSubject: Candidature\r\n\r\nBonjour\r\n")
    assert decide(prediction, email, settings).kind == "triage"
    assert KEY not in caplog.text


def test_requests_in_flight_answer_as_one_at_a_time(server: OpenAIEndpoint) -> None:
    classifier = OpenAIClassifier(settings_for(server.url, concurrency=3))
    items = [e.to_input() for e in Dataset(STARTER).split("test")[:4]]
    together = list(classify_in_order(classifier, items))
    classifier.concurrency = 1
    assert together == list(classify_in_order(classifier, items))


# --- failures ----------------------------------------------------------------------------------


def test_server_down_is_a_classifier_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ClassifierError, match="cannot reach") as err:
        OpenAIClassifier(settings_for(url)).classify(EMAIL)
    assert not isinstance(err.value, ClassifierRequestError)  # the round waits, as for Ollama


def test_a_500_fails_that_email_only(server: OpenAIEndpoint) -> None:
    with pytest.raises(ClassifierRequestError, match="answered 500: Failed to load model"):
        OpenAIClassifier(settings_for(server.url, BROKEN)).classify(EMAIL)


def test_a_server_slower_than_the_timeout_is_a_classifier_error(server: OpenAIEndpoint) -> None:
    with pytest.raises(ClassifierError, match=r"did not answer within 0\.01 s"):
        OpenAIClassifier(settings_for(server.url, timeout_seconds=0.01)).classify(EMAIL)


def test_a_server_that_never_answers_times_out() -> None:
    """A listening socket nobody reads: connected, then nothing."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(ClassifierError, match=r"did not answer within 0\.3 s"):
            OpenAIClassifier(settings_for(url, timeout_seconds=0.3)).classify(EMAIL)


def test_a_wrong_key_is_refused_without_being_shown(
    server: OpenAIEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILROUTER_CLASSIFIER__OPENAI_API_KEY", "wrong-key")
    with pytest.raises(ClassifierError, match="refused the API key") as err:
        OpenAIClassifier(settings_for(server.url)).classify(EMAIL)
    assert not isinstance(err.value, ClassifierRequestError)
    assert "wrong-key" not in str(err.value)


def test_a_round_routes_through_the_server_or_waits_or_triages_without_it(
    server: OpenAIEndpoint,
    dovecot: DovecotServer,
    smtp_sink: SmtpSink,
    starter_data: Path,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The service's own round: every email decided with the server's answer; with the server
    down, every email waits (``on_error = "wait"``) or goes to triage (``"triage"``)."""
    mails = [raw for _, raw in examples_for_mail(data_dir, "test")][:3]

    def run(name: str, url: str, **classifier: object) -> tuple[int, int, int, list[str]]:
        account = dovecot.add_user()
        account.append(mails)
        monkeypatch.setenv("MAILROUTER_DATA_DIR", str(data_dir / name))
        conf = local_config(account, smtp_sink, data_dir / name,
                            classifier={"backend": "openai", "openai_base_url": url,
                                        "openai_model": TRAINED, **classifier})  # fmt: skip
        settings = load_settings(write_toml(conf, data_dir / f"{name}.toml"))
        pipeline = build_pipeline(settings)
        try:
            report = pipeline.run_once()
        finally:
            pipeline.close()
        with State(settings.state_path) as state:
            rows = state.query("SELECT DISTINCT model FROM decisions WHERE model IS NOT NULL")
        return report.seen, report.waiting, report.forwarded, [r["model"] for r in rows]

    seen, waiting, forwarded, models = run("up", server.url)
    assert (seen, waiting, forwarded) == (3, 0, 3) and models == [TRAINED]
    down = f"http://127.0.0.1:{free_port()}"
    assert run("wait", down, on_error="wait")[:3] == (3, 3, 0)
    assert run("triage", down, on_error="triage")[:3] == (3, 0, 3)


# --- doctor --------------------------------------------------------------------------------------


def test_doctor_lists_the_model_and_its_logprobs(server: OpenAIEndpoint) -> None:
    checks = check_openai(settings_for(server.url))
    assert [(c.name, c.ok) for c in checks] == [
        ("OpenAI server", True),
        ("model", True),
        ("OpenAI logprobs", True),
    ]
    assert "lists 3 model(s)" in checks[0].detail
    missing = check_openai(settings_for(server.url, "mailrouter-absent"))
    assert not missing[1].ok and TRAINED in missing[1].detail and missing[1].fix
    down = check_openai(settings_for(f"http://127.0.0.1:{free_port()}"))
    assert [(c.name, c.ok, c.required) for c in down] == [("OpenAI server", False, True)]


def test_cli_classify_with_the_openai_backend(server: OpenAIEndpoint, tmp_path: Path) -> None:
    eml = tmp_path / "mail.eml"
    eml.write_bytes(
        b"From: Jeanne <jeanne@client.fr>\r\nTo: contact@example.com\r\n"
        b"Subject: Demande de devis\r\nMessage-ID: <1@client.fr>\r\n\r\n"
        b"Bonjour, pourriez-vous m'envoyer un devis pour 20 licences ?\r\n"
    )
    env = {"MAILROUTER_CLASSIFIER__OPENAI_BASE_URL": server.url,
           "MAILROUTER_CLASSIFIER__OPENAI_MODEL": TRAINED}  # fmt: skip
    result = CliRunner().invoke(
        app, ["classify", str(eml), "--backend", "openai", "--json"], env=env
    )
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout)
    assert line["department"] in load_settings(None).labels
    assert 0.0 <= line["confidence"] <= 1.0 and line["backend"] == TRAINED
