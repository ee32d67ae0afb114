"""Classification through an OpenAI-compatible server (vLLM, llama.cpp's server, a shared cluster).

The same request as the Ollama backend, in the OpenAI completions API: the one prompt rendered
with the chat template the model was trained with (``classifier.openai_template``; the server adds
the BOS token, as Ollama does with ``raw``), greedy decoding, ``classifier.num_predict`` tokens,
the prompt's stop sequences and ``logprobs: N`` alternatives per generated token. The answer
becomes a label only through :func:`~.logprobs.read_answer`, with the confidence computed as for
Ollama.

Failures follow the Ollama backend's: unreachable, timed out or refused credentials raise
:class:`ClassifierError` (the pipeline waits or triages as ``classifier.on_error`` says), an
unknown model :class:`ModelMissingError`, any other error status for one request
:class:`ClassifierRequestError` (that email only). TLS is always verified; an API key is never
sent in clear to another machine, nor logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..chat_template import ChatTemplate, ChatTemplateError
from ..config import Settings, openai_api_key
from ..errors import ClassifierError, ClassifierRequestError, ConfigError, ModelMissingError
from ..logs import event
from ..mail.tls import is_loopback, tls_context
from ..prediction import ClassifyInput, Prediction
from ..prompt import PromptOptions
from ..tokens import DEFAULT_MEASURE, PromptMeasure
from .concurrent import classify_in_order
from .logprobs import TokenChoice, prediction, read_answer

log = logging.getLogger(__name__)

#: Alternatives asked for at each generated token (vLLM's default ``max_logprobs`` is 20).
TOP_LOGPROBS = 20


def normalize_base_url(url: str) -> str:
    """``host:8000``, ``http://host:8000/`` or ``http://host:8000/v1`` → ``http://host:8000``."""
    text = url.strip().rstrip("/")
    if "://" not in text:
        text = "http://" + text
    return text.removesuffix("/v1")


def prompt_measure(template: str) -> PromptMeasure:
    """``classifier.openai_template``: the served model's chat template and prompt counter.

    The server is only sent raw text, so the router renders it: with the template the model was
    trained with, which no OpenAI-compatible API reports. Empty: Mistral v0.3, the Ollama
    backend's own fallback; a built-in name; or a model folder (its template and tokenizer).
    """
    if not template:
        return DEFAULT_MEASURE
    try:
        if Path(template).expanduser().is_dir():
            return PromptMeasure.for_model_dir(Path(template).expanduser())
        return PromptMeasure(ChatTemplate.builtin(template))
    except ChatTemplateError as exc:
        raise ConfigError(f"classifier.openai_template = {template!r}: {exc}") from exc


def first_choice(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """``choices[0]`` of a completion, or an empty mapping when the server sent none."""
    choices = data.get("choices") or [{}]
    return choices[0] if isinstance(choices[0], Mapping) else {}


def completion_steps(logprobs: Any) -> list[TokenChoice]:
    """The generated tokens of a completion's ``choices[0].logprobs``, in either shape servers use.

    The completions API's own shape (OpenAI, vLLM, llama-cpp-python: ``Llama._create_completion``
    in llama_cpp/llama.py) is parallel lists ``tokens``, ``token_logprobs`` and ``top_logprobs``,
    one ``{token: logprob}`` dict per position. llama.cpp's own server answers with the chat
    shape, ``content: [{token, logprob, top_logprobs: [{token, logprob}]}]``
    (``server_task_result_cmpl_final::to_json_oaicompat``, tools/server/server-task.cpp).
    """
    if not isinstance(logprobs, Mapping):
        return []
    if isinstance(logprobs.get("content"), list):
        return [TokenChoice.from_api(entry) for entry in logprobs["content"]]
    tokens = logprobs.get("tokens") or []
    chosen = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    steps = []
    for token, logprob, top in zip(tokens, chosen, tops, strict=False):
        if logprob is None:
            break
        alternatives = tuple((str(t), float(p)) for t, p in (top or {}).items())
        steps.append(TokenChoice(token=str(token), logprob=float(logprob), top=alternatives))
    return steps


class OpenAIClassifier:
    """One ``POST /v1/completions`` per email; ``concurrency`` of them in flight at once
    (:class:`~.concurrent.ConcurrentClassifier`), one pooled connection each."""

    def __init__(self, settings: Settings, *, client: httpx.Client | None = None) -> None:
        conf = settings.classifier
        self.settings = settings
        self.concurrency = conf.concurrency
        self.base_url = normalize_base_url(conf.openai_base_url)
        self.model = conf.openai_model or conf.model
        self.departments = list(settings.departments)
        measure = prompt_measure(conf.openai_template)
        self.template = measure.template
        self.prompt_options = PromptOptions.from_settings(settings, measure)
        self.client = client or self._client(openai_api_key(settings))
        self._warned_no_logprobs = False

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAIClassifier:
        return cls(settings)

    @property
    def name(self) -> str:
        """The model id on the server, recorded with every decision."""
        return self.model

    def _client(self, key: str | None) -> httpx.Client:
        conf = self.settings.classifier
        parts = urlsplit(self.base_url)
        if key and parts.scheme != "https" and not is_loopback(parts.hostname or ""):
            raise ConfigError(
                f"classifier.openai_base_url = {self.base_url!r} would send the API key in clear "
                "to another machine: use https"
            )
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=conf.timeout_seconds,
            verify=tls_context(conf.openai_ca_file),
            limits=httpx.Limits(max_connections=conf.concurrency),
        )

    # --- the server ---------------------------------------------------------------------------

    def models(self) -> list[str]:
        """The model ids the server lists (``GET /v1/models``)."""
        data = self._call("GET", "/v1/models")
        return [str(m.get("id")) for m in data.get("data") or [] if isinstance(m, Mapping)]

    def complete(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        """One greedy completion of ``prompt`` with its tokens' alternatives."""
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stop": self.template.stop,
            "logprobs": TOP_LOGPROBS,
            # No penalty on tokens already seen, the prompt's among them (a department the email
            # names): llama-cpp-python's server defaults to 1.1 (``repeat_penalty_field``,
            # llama_cpp/server/types.py), vLLM applies a model's generation_config.json
            # ``repetition_penalty``. Servers ignore the name that is not theirs.
            "repeat_penalty": 1.0,
            "repetition_penalty": 1.0,
        }
        return self._call("POST", "/v1/completions", json=body)

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            resp = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc
        if resp.status_code >= 400:
            raise self._status_error(resp)
        try:
            data = resp.json()
        except ValueError as exc:
            raise ClassifierRequestError(f"{self.base_url}{path} answered no JSON") from exc
        if not isinstance(data, dict):
            raise ClassifierRequestError(f"{self.base_url}{path} answered {type(data).__name__}")
        return data

    # --- classification -----------------------------------------------------------------------

    def render(self, item: ClassifyInput) -> str:
        """The raw string sent: the chat-templated prompt without the BOS text."""
        return self.template.serving(item.prompt(self.departments, self.prompt_options))

    def classify(self, item: ClassifyInput) -> Prediction:
        choice = first_choice(
            self.complete(self.render(item), self.settings.classifier.num_predict)
        )
        steps = completion_steps(choice.get("logprobs"))
        reading = read_answer(str(choice.get("text") or ""), steps, self.departments)
        if reading.greedy is None:  # prose: the label, if any, comes from the probabilities
            event(log, "openai_unmapped_answer", logging.WARNING, answer=reading.answer[:80],
                  model=self.name, chosen=reading.label or "triage")  # fmt: skip
        elif reading.confidence is None and not self._warned_no_logprobs:
            self._warned_no_logprobs = True  # once: every answer of such a server lacks them
            event(log, "openai_no_logprobs", logging.WARNING, model=self.name,
                  policy=self.settings.classifier.no_logprobs)  # fmt: skip
        return prediction(reading, model=self.name, threshold=None,
                          no_logprobs=self.settings.classifier.no_logprobs)  # fmt: skip

    def classify_many(self, items: Sequence[ClassifyInput]) -> list[Prediction]:
        """Batch work: up to ``concurrency`` requests in flight, answers in the items' order."""
        return list(classify_in_order(self, items))

    # --- errors -------------------------------------------------------------------------------

    def _status_error(self, resp: httpx.Response) -> ClassifierError:
        detail = _error_message(resp)
        where = f"the OpenAI-compatible server at {self.base_url}"
        if resp.status_code == 404 and resp.request.url.path.endswith("/completions"):
            return ModelMissingError(
                f"{where} has no model {self.model!r} ({detail}): set classifier.openai_model "
                "to one `mailrouter doctor` lists, or serve it there"
            )
        if resp.status_code in (401, 403):
            return ClassifierError(
                f"{where} refused the API key ({resp.status_code}): set "
                "MAILROUTER_CLASSIFIER__OPENAI_API_KEY or the Keychain's openai-api-key"
            )
        return ClassifierRequestError(f"{where} answered {resp.status_code}: {detail}")

    def _transport_error(self, exc: httpx.HTTPError) -> ClassifierError:
        where = f"the OpenAI-compatible server at {self.base_url}"
        if isinstance(exc, httpx.TimeoutException):
            return ClassifierError(
                f"{where} did not answer within {self.settings.classifier.timeout_seconds:g} s "
                "(classifier.timeout_seconds): check its load"
            )
        if isinstance(exc, httpx.ConnectError):
            return ClassifierError(
                f"cannot reach {where}: start it, or set classifier.openai_base_url ({exc})"
            )
        return ClassifierError(f"talking to {where} failed: {type(exc).__name__}: {exc}")


def _error_message(resp: httpx.Response) -> str:
    """The server's own words: ``{"error": {"message"}}`` (OpenAI), ``{"detail"}`` (FastAPI)."""
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:200] or resp.reason_phrase
    if isinstance(data, Mapping):
        error = data.get("error")
        if isinstance(error, Mapping):
            return str(error.get("message") or error)[:200]
        return str(error or data.get("detail") or data.get("message") or data)[:200]
    return str(data)[:200]
