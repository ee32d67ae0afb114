"""Classification through Ollama: the one prompt, a checked label and a real confidence.

The model gets exactly the string it was trained on: ``template.serving(build_prompt(...))``
sent with ``raw: true`` (Ollama then adds the BOS token itself, as the training tokenizer did),
greedy decoding, a few tokens and the prompt's stop sequences. Whatever comes back is only ever
turned into a label by :func:`map_label`; anything else is ``label=None`` (triage).

Confidence comes from ``logprobs``/``top_logprobs`` (Ollama 0.12.11 and later): see
:func:`~.logprobs.label_confidence`. Older servers are detected once from ``/api/version`` and
handled by ``classifier.no_logprobs``.

Failures the service must survive (server down, timeout, model missing) raise
:class:`ClassifierError` / :class:`ModelMissingError` with the command that fixes them; the
pipeline then waits or triages as ``classifier.on_error`` says. A garbage answer is not an error:
it is a prediction without a label.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import ollama

from ..calibration import Calibration, load, ollama_path
from ..config import ClassifierSettings, Settings
from ..errors import ClassifierError, ClassifierRequestError, ModelMissingError
from ..logs import event
from ..prediction import ClassifyInput, Prediction
from ..prompt import PromptOptions
from ..tokens import DEFAULT_MEASURE, measure_for_kept
from .concurrent import classify_in_order
from .logprobs import TokenChoice, prediction, read_answer

log = logging.getLogger(__name__)

#: First Ollama release whose ``/api/generate`` returns ``logprobs``.
LOGPROBS_SINCE = (0, 12, 11)
#: Alternatives asked for at each generated token (Ollama's maximum).
TOP_LOGPROBS = 20
#: How often the model in service is looked up again (a new version, or the end of cold start).
RESOLVE_SECONDS = 60.0
#: Room for the BOS and the chat template's control tokens beside the prompt bound.
CONTEXT_MARGIN = 16


def context_size(max_prompt_tokens: int, num_predict: int) -> int:
    """``num_ctx`` for the longest prompt and its answer, rounded up to a multiple of 256.

    Not Ollama's default: 4096 tokens (``OLLAMA_CONTEXT_LENGTH``, ``envconfig/config.go`` line
    204 in v0.12.11), and from v0.15.5 up to 32768 on a Mac with 23 GiB for the GPU; every slot
    holds a cache of ``num_ctx`` tokens, 128 KiB each for Mistral 7B (docs/classification.md).
    Too small is worse: a longer prompt is cut after its first ``num_keep`` tokens
    (``NewSequence``, ``runner/llamarunner/runner.go`` in v0.13.0), the instruction with it.
    """
    needed = max_prompt_tokens + num_predict + CONTEXT_MARGIN
    return -(-needed // 256) * 256


def model_options(conf: ClassifierSettings) -> dict[str, Any]:
    """The options that make Ollama answer as the model was evaluated: in every request, and
    in the published model's parameters (so `ollama run` answers the same).

    ``repeat_penalty`` 1.0: Ollama 0.12.11 to 0.32.9 defaults to 1.1 (``DefaultOptions``,
    ``api/types.go`` line 890 in v0.12.11) over the last ``repeat_last_n`` 64 tokens, and its
    llama.cpp runner counts the prompt's tokens among them (``sc.Accept(input.token, false)``
    in ``NewSequence``, ``runner/llamarunner/runner.go``): a department the email names would
    be penalised, and greedy decoding would no longer give the answer training measured.
    """
    return {
        "temperature": 0,
        "repeat_penalty": 1.0,
        "num_ctx": context_size(conf.max_prompt_tokens, conf.num_predict),
    }


def normalize_host(host: str) -> str:
    """``127.0.0.1:11434`` or ``http://host`` → a base URL with scheme and port, as Ollama's CLI."""
    url = host.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 11434)
    hostname = parts.hostname or "127.0.0.1"
    if ":" in hostname:
        hostname = f"[{hostname}]"
    return f"{parts.scheme}://{hostname}:{port}{parts.path.rstrip('/')}"


def parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("-", 1)[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def full_name(model: str) -> str:
    """Ollama's canonical short name: a missing tag is ``latest``."""
    return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"


@dataclass(frozen=True)
class ServerInfo:
    """What ``/api/version`` told us, once, at start."""

    version: str
    logprobs: bool


class OllamaClassifier:
    """The service backend: one ``/api/generate`` call per email, against a local Ollama.

    ``classify`` may be called from ``concurrency`` threads at once
    (:class:`~.concurrent.ConcurrentClassifier`): Ollama computes as many as its
    ``OLLAMA_NUM_PARALLEL`` slots allow and queues the rest.
    """

    def __init__(self, settings: Settings, *, client: ollama.Client | None = None) -> None:
        conf = settings.classifier
        self.settings = settings
        self.concurrency = conf.concurrency
        self._lock = threading.Lock()  # the server's version and the model, looked up once
        self.host = normalize_host(conf.ollama_host)
        self.client = client or ollama.Client(host=self.host, timeout=conf.timeout_seconds)
        self.departments = list(settings.departments)
        self.prompt_options = PromptOptions.from_settings(settings)
        #: The chat template of the model answering (its kept files: tokens.kept_dir).
        self.template = DEFAULT_MEASURE.template
        self.server: ServerInfo | None = None
        self._model: str | None = None
        self._digest = ""
        self._resolved_at = -math.inf
        self._warned_no_logprobs = False
        #: The thresholds of the model answering, found by its digest (see calibration.py).
        self.calibration: Calibration | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> OllamaClassifier:
        return cls(settings)

    @property
    def name(self) -> str:
        """The model in use and its digest, recorded with every decision."""
        model = self._model or full_name(self.settings.classifier.model)
        return f"{model}@{self._digest[:12]}" if self._digest else model

    # --- start-up ---------------------------------------------------------------------------

    def start(self) -> ServerInfo:
        """Read ``/api/version`` once and log what this server supports."""
        with self._lock:
            return self.server or self._start()

    def _start(self) -> ServerInfo:
        try:
            resp = httpx.get(
                f"{self.host}/api/version", timeout=self.settings.classifier.timeout_seconds
            )
            resp.raise_for_status()
            version = str(resp.json().get("version", "0.0.0"))
        except (httpx.HTTPError, ValueError) as exc:
            raise self._transport_error(exc) from exc
        dev_build = parse_version(version) == (0, 0, 0)
        supported = dev_build or parse_version(version) >= LOGPROBS_SINCE
        self.server = ServerInfo(version=version, logprobs=supported)
        policy = self.settings.classifier.no_logprobs
        event(
            log,
            "ollama_server",
            host=self.host,
            version=version,
            logprobs="yes" if supported else "no",
            confidence="logprobs" if supported else f"none (no_logprobs={policy})",
        )
        if not supported:
            self._no_logprobs_warning(f"Ollama {version} is older than 0.12.11")
        return self.server

    def _no_logprobs_warning(self, why: str) -> None:
        if self._warned_no_logprobs:
            return
        self._warned_no_logprobs = True
        policy = self.settings.classifier.no_logprobs
        effect = "confidence 1.0 is used" if policy == "accept" else "every email goes to triage"
        event(
            log,
            "ollama_no_logprobs",
            logging.WARNING,
            reason=why,
            policy=policy,
            effect=effect,
            fix="upgrade Ollama to 0.12.11 or later",
        )

    def resolve_model(self, *, force: bool = False) -> str:
        """The fine-tuned model when it exists, else the zero-shot one (cold start)."""
        with self._lock:
            return self._resolve_model(force)

    def _resolve_model(self, force: bool) -> str:
        now = time.monotonic()
        if not force and self._model and now - self._resolved_at < RESOLVE_SECONDS:
            return self._model
        conf = self.settings.classifier
        try:
            listed = self.client.list().models
        except (ollama.ResponseError, ConnectionError, httpx.HTTPError) as exc:
            raise self._transport_error(exc) from exc
        present = {full_name(m.model or ""): m.digest or "" for m in listed}
        wanted, zero_shot = full_name(conf.model), full_name(conf.zero_shot_model)
        if wanted in present:
            chosen = wanted
        elif zero_shot in present:
            chosen = zero_shot
        else:
            raise ModelMissingError(
                f"neither {wanted!r} nor the zero-shot model {zero_shot!r} is on the Ollama "
                f"server at {self.host}: run `ollama pull {conf.zero_shot_model}` to classify "
                f"zero-shot now, or `mailrouter train` to create {wanted!r}"
            )
        if chosen != self._model or present[chosen] != self._digest:
            digest = present[chosen]
            self.calibration = (
                load(ollama_path(self.settings.models_dir, digest)) if digest else None
            )
            measure = measure_for_kept(self.settings.models_dir, digest)
            self.template = measure.template
            self.prompt_options = self.prompt_options.measured_with(measure)
            event(
                log,
                "ollama_model",
                model=chosen,
                digest=digest[:12],
                thresholds="calibrated" if self.calibration else "global",
                cold_start=chosen != wanted,
                note=(
                    f"{wanted} does not exist yet: zero-shot with the same prompt"
                    if chosen != wanted
                    else "fine-tuned model"
                ),
            )
        self._model, self._digest, self._resolved_at = chosen, present[chosen], now
        return chosen

    # --- classification ---------------------------------------------------------------------

    def render(self, item: ClassifyInput) -> str:
        """The raw string sent to Ollama: the chat-templated prompt without the BOS text."""
        return self.template.serving(item.prompt(self.departments, self.prompt_options))

    def request(self, model: str, item: ClassifyInput) -> tuple[str, bool]:
        """The prompt sent to ``model`` and whether it is raw.

        The fine-tuned model gets the raw string it was trained on (:meth:`render`). A zero-shot
        model (cold start) was trained on its own chat template, which only the server knows:
        ``/api/show`` drops ``tokenizer.chat_template`` from ``model_info`` (``GetModelInfo``,
        ``server/routes.go``), so it gets the bare prompt with ``raw: false`` and Ollama renders
        it with the model's template and system prompt (``GenerateHandler``, ``server/routes.go``:
        ``if !req.Raw { tmpl := m.Template …``).
        """
        if model == full_name(self.settings.classifier.model):
            return self.render(item), True
        return item.prompt(self.departments, self.prompt_options), False

    def classify(self, item: ClassifyInput) -> Prediction:
        server = self.start()
        model = self.resolve_model()
        try:
            response = self._generate(model, *self.request(model, item), server.logprobs)
        except ollama.ResponseError as exc:
            if exc.status_code != 404:
                raise self._transport_error(exc) from exc
            model = self.resolve_model(force=True)  # deleted or replaced since the last lookup
            try:
                response = self._generate(model, *self.request(model, item), server.logprobs)
            except ollama.ResponseError as again:
                raise self._transport_error(again) from again
        return self._prediction(
            response, zero_shot=model != full_name(self.settings.classifier.model)
        )

    def classify_many(self, items: Sequence[ClassifyInput]) -> list[Prediction]:
        """Batch work: up to ``concurrency`` requests in flight, answers in the items' order."""
        return list(classify_in_order(self, items))

    def _generate(self, model: str, prompt: str, raw: bool, logprobs: bool) -> Any:
        conf = self.settings.classifier
        extra: dict[str, Any] = {"logprobs": True, "top_logprobs": TOP_LOGPROBS} if logprobs else {}
        try:
            return self.client.generate(
                model=model,
                prompt=prompt,
                raw=raw,
                stream=False,
                options={
                    **model_options(conf),
                    "num_predict": conf.num_predict,
                    "stop": self.template.stop,
                },
                keep_alive=conf.keep_alive,
                **extra,
            )
        except ollama.ResponseError:
            raise
        except (ConnectionError, httpx.HTTPError) as exc:
            raise self._transport_error(exc) from exc

    def _prediction(self, response: Any, *, zero_shot: bool = False) -> Prediction:
        """The label a fine-tuned model's text names; a zero-shot model's prose gets the
        likeliest department at its raw probability (see :func:`~.logprobs.read_answer`)."""
        steps = [TokenChoice.from_api(e) for e in (response.logprobs or [])]
        text = response.response or ""
        reading = read_answer(text, steps, self.departments, from_probabilities=zero_shot)
        if reading.greedy is None:  # prose: the label, if any, comes from the probabilities
            event(log, "ollama_unmapped_answer", logging.WARNING, answer=reading.answer[:80],
                  model=self.name, chosen=reading.label or "triage")  # fmt: skip
        elif reading.confidence is None:
            self._no_logprobs_warning("the server sent no logprobs")
        calibration, label = self.calibration, reading.label
        threshold = calibration.threshold(label) if calibration and label else None
        policy = self.settings.classifier.no_logprobs
        return prediction(reading, model=self.name, no_logprobs=policy, threshold=threshold)

    # --- errors -----------------------------------------------------------------------------

    def _transport_error(self, exc: BaseException) -> ClassifierError:
        conf = self.settings.classifier
        if isinstance(exc, ollama.ResponseError):
            if exc.status_code == 404:
                return ModelMissingError(
                    f"the Ollama server at {self.host} has no model {self._model or conf.model!r}: "
                    f"run `mailrouter train` to create {full_name(conf.model)!r}, or "
                    f"`ollama pull {conf.zero_shot_model}` to classify zero-shot"
                )
            # The server is up and refused this one request: its email only.
            return ClassifierRequestError(
                f"Ollama at {self.host} answered {exc.status_code}: {exc.error}"
            )
        if isinstance(exc, httpx.TimeoutException):
            return ClassifierError(
                f"Ollama at {self.host} did not answer within {conf.timeout_seconds:g} s "
                "(classifier.timeout_seconds): check `ollama ps` and the machine's load"
            )
        if isinstance(exc, ConnectionError | httpx.ConnectError):
            return ClassifierError(
                f"cannot reach Ollama at {self.host}: start it with `ollama serve` (or open the "
                "Ollama app), or set classifier.ollama_host"
            )
        return ClassifierError(f"talking to Ollama at {self.host} failed: {exc}")
