"""An Ollama-compatible HTTP server that runs GGUF models with llama.cpp (``llama-cpp-python``).

Tests use it in place of Ollama, and anyone can use it to try mailrouter without installing Ollama:

    python tests/ollama_server.py --port 11434 --store /tmp/ollama-store

It speaks only Ollama's documented API (``docs/api.md`` and ``docs/openapi.yaml`` of the Ollama
repository): ``GET /api/version``, ``GET /api/tags``, ``POST /api/show``, ``POST /api/generate``
(raw or templated prompt, options, stop sequences, streaming as NDJSON, ``logprobs`` and
``top_logprobs``), ``HEAD``/``POST /api/blobs/sha256:<digest>`` (the digest is checked),
``POST /api/create`` (a model from a GGUF blob or another model, with template, parameters and
quantisation, progress streamed as status objects), ``POST /api/copy``, ``DELETE /api/delete``
and ``GET /api/ps``. Errors are ``{"error": "..."}`` with Ollama's status
codes (404 ``model 'x' not found``). Requests are validated more strictly than Ollama does: an
unknown field or option is a 400, so a client that sends something Ollama would silently ignore is
caught by the tests.

The model really runs: answers and log-probabilities come from llama.cpp, the engine Ollama is
built on, so a GGUF that llama.cpp tokenises or computes differently from the training runtime
fails here as it would in Ollama. The prompt is tokenised as Ollama does it (``add_special`` so the
BOS the GGUF asks for is added, control tokens such as ``[INST]`` parsed), and the evaluated token
ids of the last request are exposed for tests at ``GET /_test/last_tokens`` (underscored: not part
of Ollama's API), and the generations computing now and at most at once at ``GET /_test/load``.

Models and blobs live under ``--store`` and survive a restart, like Ollama's ``~/.ollama/models``.
Blobs are accounted for as Ollama does (v0.13.0; the same code in v0.12.11):

* deleting a model removes each of its blobs no other model uses (``DeleteHandler`` →
  ``Manifest.RemoveLayers`` → ``Layer.Remove``, ``server/routes.go`` line 1011,
  ``server/manifest.go`` line 49, ``server/layer.go`` line 104), whatever ``OLLAMA_NOPRUNE`` says;
* creating a model over an existing name removes the old model's blobs no model uses any more,
  unless ``OLLAMA_NOPRUNE`` is set (``CreateHandler``, ``server/create.go`` line 238);
* quantising keeps the source blob: ``quantizeLayer`` (``server/create.go`` line 561) writes a new
  layer and removes nothing, so a GGUF pushed with ``/api/blobs`` and created with ``quantize``
  stays on disk, used by no model;
* at start, unless ``OLLAMA_NOPRUNE`` is set, every blob no model uses is removed
  (``PruneLayers``, ``server/images.go`` line 490, called from ``Serve``, ``server/routes.go``
  line 1554); there is no API to delete a blob (``/api/blobs`` has HEAD and POST only).

``GET /_test/blobs`` (test-only) lists the blobs and those no model uses.

Load, for benchmarks and concurrency tests:

* ``--parallel P``: at most P generations at once; later requests wait in line for a free slot,
  as Ollama queues requests beyond its ``OLLAMA_NUM_PARALLEL`` slots (unset: no limit beyond the
  one llama.cpp context each model has).
* ``--latency-ms L``: a generation holds its slot, and answers, no sooner than L ms after it got
  it: a model of known speed, whatever this machine computes.
* ``--canned-response FILE``: every ``/api/generate`` of an existing model is answered with this
  recorded answer (a non-streamed ``/api/generate`` response of a real model: ``response``,
  ``logprobs``) instead of running llama.cpp; requests are validated as usual. With
  ``--latency-ms`` it is a server of known speed whose answers cost the client what real ones do.

Test-only hook (not part of Ollama's API): ``--fail-prompt TEXT`` (repeatable) answers a
generation whose prompt contains TEXT with a 500 ``{"error": ...}``, as Ollama answers when its
runner fails, so a test can make one chosen email's request fail among many.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import hashlib
import json
import math
import os
import re
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import numpy as np

#: The Ollama release whose API this server follows (logprobs arrived in 0.12.11).
DEFAULT_VERSION = "0.13.0"
LOGPROBS_SINCE = (0, 12, 11)

#: What Ollama uses for an option neither the request nor the model's parameters set:
#: ``DefaultOptions()`` in ``api/types.go`` (line 878 in v0.12.11, 1096 in v0.32.15): temperature
#: 0.8, top_k 40, top_p 0.9, num_keep 4, repeat_last_n 64 and repeat_penalty 1.1 (1.1 from v0.12.11
#: to v0.32.9 but for v0.17.5-7; 1.0 from v0.32.10), num_ctx ``envconfig.ContextLength()``:
#: ``OLLAMA_CONTEXT_LENGTH``, default 4096 (``envconfig/config.go`` line 204 in v0.12.11; from
#: v0.15.5 it follows the GPU's memory, see docs/classification.md). A client that leaves
#: repeat_penalty out gets the penalty here as it does in Ollama.
DEFAULT_OPTIONS: dict[str, Any] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.9,
    "min_p": 0.0,
    "num_predict": -1,
    "num_ctx": 4096,
    "num_keep": 4,
    "repeat_last_n": 64,
    "repeat_penalty": 1.1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "stop": [],
    "seed": None,
}

#: Options documented for Ollama's Modelfile and API; the ones marked ``None`` are accepted and
#: ignored (they tune hardware or samplers that greedy classification never uses).
OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "temperature": (int, float),
    "top_k": (int,),
    "top_p": (int, float),
    "min_p": (int, float),
    "num_predict": (int,),
    "num_ctx": (int,),
    "stop": (list, str),
    "seed": (int,),
    "num_keep": (int,),
    "typical_p": (int, float),
    "repeat_last_n": (int,),
    "repeat_penalty": (int, float),
    "presence_penalty": (int, float),
    "frequency_penalty": (int, float),
    "mirostat": (int,),
    "mirostat_tau": (int, float),
    "mirostat_eta": (int, float),
    "penalize_newline": (bool,),
    "numa": (bool,),
    "num_batch": (int,),
    "num_gpu": (int,),
    "main_gpu": (int,),
    "low_vram": (bool,),
    "vocab_only": (bool,),
    "use_mmap": (bool,),
    "use_mlock": (bool,),
    "num_thread": (int,),
}

GENERATE_FIELDS = {
    "model",
    "prompt",
    "suffix",
    "images",
    "format",
    "options",
    "system",
    "template",
    "stream",
    "raw",
    "keep_alive",
    "context",
    "think",
    "logprobs",
    "top_logprobs",
}
CREATE_FIELDS = {
    "model",
    "from",
    "files",
    "adapters",
    "template",
    "license",
    "system",
    "parameters",
    "messages",
    "stream",
    "quantize",
    "renderer",
    "parser",
}

#: The ``quantize`` values Ollama accepts, upper-cased first (``strings.ToUpper`` in
#: ``createModel``, ``server/create.go`` line 470 of v0.13.0), and their llama.cpp
#: ``LLAMA_FTYPE_*`` numbers: ``ggml.ParseFileType`` (``fs/ggml/type.go`` line 57) takes F32, F16,
#: Q8_0, Q4_K_S, Q4_K_M (alias Q4_K) and BF16; anything else is refused with its message.
QUANT_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_K_S": 14, "Q4_K_M": 15, "Q4_K": 15, "BF16": 32}
#: ``general.file_type`` → Ollama's ``quantization_level`` label.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1"}
FILE_TYPES |= {14: "Q4_K_S", 15: "Q4_K_M", 32: "BF16"}

_NAME_RE = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*(:[A-Za-z0-9_.-]+)?$"
)
_DIGEST_RE = re.compile(r"^sha256[:-]([0-9a-f]{64})$")
_DURATION_RE = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def model_name(name: Any) -> str:
    """Ollama's short name with the default tag: ``mistral`` → ``mistral:latest``."""
    if not isinstance(name, str) or not name.strip():
        raise ApiError(400, "model is required")
    if not _NAME_RE.match(name):
        raise ApiError(400, f"invalid model name {name!r}")
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def parse_digest(text: str) -> str:
    """``sha256:<hex>`` (or ``sha256-<hex>``) → the hex digest; 400 otherwise."""
    match = _DIGEST_RE.match(text)
    if not match:
        raise ApiError(400, f"invalid digest format {text!r}: expected sha256:<64 hex digits>")
    return match.group(1)


def parse_keep_alive(value: Any) -> float | None:
    """Seconds to keep a model loaded; ``None`` means forever (a negative duration)."""
    if value is None:
        return 300.0
    if isinstance(value, bool):
        raise ApiError(400, "keep_alive must be a duration string or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-?\d+(\.\d+)?", text):
            seconds = float(text)
        elif text and "".join(m.group(0) for m in _DURATION_RE.finditer(text)) == text:
            seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION_RE.findall(text))
        else:
            raise ApiError(400, f"invalid duration {value!r} for keep_alive (e.g. '5m', '30s', 0)")
    else:
        raise ApiError(400, "keep_alive must be a duration string or a number of seconds")
    return None if seconds < 0 else seconds


def check_fields(body: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field(s) for {what}: {', '.join(unknown)}")


def check_options(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ApiError(400, "options must be an object")
    for key, value in options.items():
        types = OPTION_TYPES.get(key)
        if types is None:
            raise ApiError(400, f"invalid option provided: {key!r}")
        if value is None:
            continue
        if isinstance(value, bool) and bool not in types:
            raise ApiError(400, f"option {key!r} has the wrong type: got {value!r}")
        if not isinstance(value, types):
            raise ApiError(400, f"option {key!r} has the wrong type: got {value!r}")
        if key == "stop" and isinstance(value, list) and not all(isinstance(s, str) for s in value):
            raise ApiError(400, "option 'stop' must be a string or a list of strings")
    if options.get("temperature") is not None and options["temperature"] < 0:
        raise ApiError(400, "option 'temperature' must be >= 0")
    return dict(options)


# --- storage ---------------------------------------------------------------------------------


@dataclass
class ModelRecord:
    """One created model: what Ollama keeps in a manifest and its config layers."""

    name: str
    gguf: str  # hex digest of the GGUF blob that runs
    files: dict[str, str] = field(default_factory=dict)
    template: str = "{{ .Prompt }}"
    system: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    quantization: str = ""
    family: str = ""
    parameter_count: int = 0
    model_info: dict[str, Any] = field(default_factory=dict)
    size: int = 0
    modified_at: str = ""
    parent: str = ""

    @property
    def digest(self) -> str:
        """The manifest digest ``/api/tags`` reports: changes whenever the model's content does."""
        data = asdict(self)
        del data["name"], data["modified_at"]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class Store:
    """Blobs by digest and model records by name under one directory, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.models = root / "models"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.models.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def blob_path(self, hexdigest: str) -> Path:
        return self.blobs / f"sha256-{hexdigest}"

    def has_blob(self, hexdigest: str) -> bool:
        return self.blob_path(hexdigest).is_file()

    def put_blob(self, hexdigest: str, chunks: Iterator[bytes]) -> None:
        """Store a blob only when its content hashes to the digest it was announced with."""
        sha = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    sha.update(chunk)
                    out.write(chunk)
            if sha.hexdigest() != hexdigest:
                raise ApiError(
                    400,
                    f'digest mismatch, expected "sha256:{hexdigest}", '
                    f'got "sha256:{sha.hexdigest()}"',
                )
            os.replace(tmp, self.blob_path(hexdigest))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def add_file_blob(self, path: Path) -> str:
        """Move a file the server produced (a quantised GGUF) into the blobs; return its digest."""
        sha = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
        hexdigest = sha.hexdigest()
        os.replace(path, self.blob_path(hexdigest))
        return hexdigest

    def _record_path(self, name: str) -> Path:
        return self.models / (quote(name, safe="") + ".json")

    def get(self, name: str, asked: str | None = None) -> ModelRecord:
        """The model called ``name``; 404 naming it as the client ``asked`` for it."""
        path = self._record_path(name)
        if not path.is_file():
            raise ApiError(404, f"model '{asked or name}' not found")
        return ModelRecord(**json.loads(path.read_text()))

    def has_model(self, name: str) -> bool:
        return self._record_path(name).is_file()

    def save(self, record: ModelRecord) -> None:
        record.modified_at = now_iso()
        with self._lock:
            path = self._record_path(record.name)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(record), indent=2))
            os.replace(tmp, path)

    def delete(self, name: str) -> None:
        self.get(name)
        self._record_path(name).unlink()

    def used_blobs(self) -> set[str]:
        return {r.gguf for r in self.all()}

    def remove_unused(self, digests: set[str]) -> None:
        """``Layer.Remove`` (``server/layer.go`` line 104): each blob no model uses is deleted."""
        with self._lock:
            for digest in digests - self.used_blobs():
                self.blob_path(digest).unlink(missing_ok=True)

    def prune(self) -> None:
        """``PruneLayers`` at start (``server/images.go`` line 490): blobs no model uses, and
        files that are not blobs at all (partial uploads), are removed."""
        for path in self.blobs.iterdir():
            if not path.name.startswith("sha256-"):
                path.unlink(missing_ok=True)
        self.remove_unused({p.name.removeprefix("sha256-") for p in self.blobs.iterdir()})

    def unused_blobs(self) -> list[str]:
        found = {p.name.removeprefix("sha256-") for p in self.blobs.glob("sha256-*")}
        return sorted(found - self.used_blobs())

    def all(self) -> list[ModelRecord]:
        records = []
        for path in sorted(self.models.glob("*.json")):
            with contextlib.suppress(OSError, ValueError, TypeError):
                records.append(ModelRecord(**json.loads(path.read_text())))
        return records


# --- GGUF metadata and quantisation ----------------------------------------------------------


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The GGUF's scalar metadata as llama.cpp reads it (arrays such as the vocabulary omitted).

    Loading the vocabulary is also the check Ollama makes when it parses the file: a GGUF that
    llama.cpp refuses (wrong magic, wrong types) is a 400 at create time, not a crash later.
    """
    import llama_cpp

    try:
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    except Exception as exc:  # llama-cpp-python raises ValueError with llama.cpp's reason
        raise ApiError(400, f"invalid GGUF file: {exc}") from exc
    meta: dict[str, Any] = {}
    for key, text in llm.metadata.items():
        meta[key] = _scalar(text)
    meta["general.parameter_count"] = int(llama_cpp.llama_model_n_params(llm.model))
    return meta


def _scalar(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


def quantize(src: Path, dst: Path, kind: str) -> bool:
    """Quantise with llama.cpp; ``False`` when llama.cpp refuses (tiny or odd-shaped models)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[kind]
    params.nthread = os.cpu_count() or 1
    try:
        code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    except Exception:  # llama.cpp reports shape errors as C++ exceptions turned into RuntimeError
        return False
    return code == 0 and dst.is_file() and dst.stat().st_size > 0


# --- the runtime -----------------------------------------------------------------------------


@dataclass
class Loaded:
    """A model held in memory by llama.cpp, and until when (``None``: forever)."""

    llm: Any
    path: Path
    n_ctx: int
    record: ModelRecord
    eog: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    expires: float | None = None


@dataclass
class Step:
    """One generated token: its id, its text and its log-probabilities."""

    token: int
    text: bytes
    logprob: float
    top: list[tuple[int, float]]


class Runtime:
    """Loads each GGUF once, keeps it for ``keep_alive``, and generates token by token."""

    def __init__(self, store: Store, threads: int) -> None:
        self.store = store
        self.threads = threads
        self._loaded: dict[str, Loaded] = {}
        self._lock = threading.Lock()
        self.last_tokens: dict[str, Any] = {}

    def load(self, record: ModelRecord, n_ctx: int) -> tuple[Loaded, float]:
        """The loaded model (loading it if needed) and the seconds the load took."""
        from llama_cpp import Llama

        with self._lock:
            current = self._loaded.get(record.gguf)
            if current is not None and current.n_ctx >= n_ctx:
                return current, 0.0
            started = time.perf_counter()
            path = self.store.blob_path(record.gguf)
            if not path.is_file():
                raise ApiError(500, f"blob sha256:{record.gguf} of model {record.name} is missing")
            try:
                llm = Llama(
                    model_path=str(path),
                    n_ctx=n_ctx,
                    n_threads=self.threads,
                    logits_all=False,
                    verbose=False,
                )
            except Exception as exc:
                raise ApiError(500, f"llama runner process has terminated: {exc}") from exc
            loaded = Loaded(llm, path, n_ctx, record, end_of_generation_tokens(llm))
            self._loaded[record.gguf] = loaded
            return loaded, time.perf_counter() - started

    def loaded(self) -> list[Loaded]:
        with self._lock:
            return list(self._loaded.values())

    def unload(self, record: ModelRecord) -> None:
        with self._lock:
            self._loaded.pop(record.gguf, None)

    def expire(self) -> None:
        """Drop models whose ``keep_alive`` has run out (checked at every request)."""
        now = time.monotonic()
        with self._lock:
            for key, loaded in list(self._loaded.items()):
                if (
                    loaded.expires is not None
                    and loaded.expires <= now
                    and not loaded.lock.locked()
                ):
                    del self._loaded[key]

    @staticmethod
    def tokenize(loaded: Loaded, prompt: str) -> list[int]:
        """As Ollama does: BOS when the GGUF asks for it, control tokens parsed from the text."""
        return loaded.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)

    def generate(
        self,
        loaded: Loaded,
        tokens: list[int],
        options: dict[str, Any],
        top_n: int,
        keep: int,
    ) -> Iterator[Step]:
        """Evaluate ``tokens`` (reusing the cached common prefix) and yield sampled tokens.

        Sampling follows Ollama's llama.cpp runner (``runner/llamarunner/runner.go`` in v0.13.0,
        ``NewSequence``): every prompt token is accepted by the sampler (``sc.Accept(input.token,
        false)``) before the first answer token, so ``repeat_penalty`` over the last
        ``repeat_last_n`` tokens reaches into the prompt; penalties come first in llama.cpp's
        chain, before greedy or random choice (``common_params_sampling.samplers``,
        ``common/common.h``). When the context is full, ``keep`` tokens stay at its start and
        the older half of the rest is dropped (``ShiftCacheSlot``/``ShiftDiscard``,
        ``runner/llamarunner/cache.go``).
        """
        llm = loaded.llm
        common = 0
        for a, b in zip(llm.input_ids[: llm.n_tokens].tolist(), tokens[:-1], strict=False):
            if a != b:
                break
            common += 1
        llm.n_tokens = common
        llm.eval(tokens[common:])
        temperature = float(options["temperature"])
        rng = np.random.default_rng(options["seed"])
        n_ctx = int(options["num_ctx"])
        limit = options["num_predict"]
        room = n_ctx - len(tokens)
        # Without a limit, stop when the context is full; with one, shift as Ollama does.
        limit = room if limit is None or limit < 0 else limit
        context = list(tokens)  # what the context holds now
        history = list(tokens)  # what the sampler has accepted: the prompt, then each answer
        for _ in range(limit):
            if len(context) >= n_ctx:
                context = shift_context(llm, context, n_ctx, keep)
            logits = last_logits(llm)
            logprobs = logits - logits.max()
            logprobs -= math.log(np.exp(logprobs).sum())
            # Ollama's logprobs are the raw logits' (calculateLogprobsLlama on GetLogitsIth,
            # runner/llamarunner/runner.go); the token is sampled after the penalties.
            penalised = apply_penalties(logits, history, options, n_ctx)
            token = self._sample(penalised, temperature, options, rng)
            history.append(token)
            context.append(token)
            top: list[tuple[int, float]] = []
            if top_n:
                best = np.argpartition(-logprobs, top_n)[:top_n]
                best = best[np.argsort(-logprobs[best])]
                top = [(int(t), float(logprobs[t])) for t in best]
            if token in loaded.eog:
                return
            text = llm.detokenize([token])
            yield Step(token, text, float(logprobs[token]), top)
            llm.eval([token])

    @staticmethod
    def _sample(
        logits: np.ndarray, temperature: float, options: dict[str, Any], rng: np.random.Generator
    ) -> int:
        if temperature <= 0:
            return int(np.argmax(logits))
        scaled = logits / temperature
        order = np.argsort(-scaled)
        top_k = options.get("top_k") or 0
        if top_k > 0:
            order = order[:top_k]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        top_p = options.get("top_p")
        if top_p is not None and 0 < top_p < 1:
            keep = int(np.searchsorted(np.cumsum(probs), top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        min_p = options.get("min_p") or 0.0
        if min_p > 0:
            mask = probs >= min_p * probs[0]
            order, probs = order[mask], probs[mask] / probs[mask].sum()
        return int(rng.choice(order, p=probs))


def truncate_prompt(tokens: list[int], options: dict[str, Any], bos: bool) -> tuple[list[int], int]:
    """The prompt as Ollama's llama.cpp runner keeps it, and the tokens a shift keeps.

    A prompt longer than ``num_ctx`` is not refused: ``/api/generate`` truncates by default
    (``Truncate: req.Truncate == nil || *req.Truncate``, ``server/routes.go``), and the runner
    keeps the first ``num_keep`` tokens (plus the BOS) and drops those after them
    (``NewSequence``, ``runner/llamarunner/runner.go`` lines 132-153 in v0.13.0). For our
    prompts that cuts the instruction and the departments, so the answer is not the trained
    one: the client must send a ``num_ctx`` its prompts fit in.
    """
    n_ctx = int(options["num_ctx"])
    keep = int(options["num_keep"])
    keep = len(tokens) if keep < 0 else keep
    keep = min(keep + (1 if bos else 0), n_ctx - 1)
    if len(tokens) <= n_ctx:
        return tokens, keep
    discard = len(tokens) - n_ctx
    return tokens[:keep] + tokens[keep + discard :], keep


def apply_penalties(
    logits: np.ndarray, history: list[int], options: dict[str, Any], n_ctx: int
) -> np.ndarray:
    """llama.cpp's penalties sampler (``llama_sampler_penalties_apply``,
    ``src/llama-sampling.cpp`` line 1747 in Ollama v0.13.0's copy): each token among the last
    ``repeat_last_n`` accepted (-1: the context) has its logit divided by ``repeat_penalty``
    (multiplied when not positive), then lowered by its count times ``frequency_penalty`` and by
    ``presence_penalty``."""
    repeat = float(options["repeat_penalty"])
    frequency, presence = float(options["frequency_penalty"]), float(options["presence_penalty"])
    last_n = int(options["repeat_last_n"])
    last_n = n_ctx if last_n < 0 else last_n
    if last_n == 0 or (repeat == 1.0 and frequency == 0.0 and presence == 0.0):
        return logits
    ids, counts = np.unique(np.asarray(history[-last_n:], dtype=np.int64), return_counts=True)
    out = logits.copy()
    values = out[ids]
    values = np.where(values <= 0, values * repeat, values / repeat)
    out[ids] = values - counts * frequency - presence
    return out


def shift_context(llm: Any, context: list[int], n_ctx: int, keep: int) -> list[int]:
    """Ollama's context shift (``ShiftDiscard``, ``runner/llamarunner/cache.go`` line 202 in
    v0.13.0): keep ``keep`` tokens, drop enough after them to free half of the rest."""
    discard = max(max((n_ctx - keep) // 2, 1) - (n_ctx - len(context)), 0)
    shifted = context[:keep] + context[keep + discard :]
    llm.n_tokens = keep
    llm.eval(shifted[keep:])
    return shifted


def last_logits(llm: Any) -> np.ndarray:
    """The logits after the last evaluated token (llama.cpp keeps only those without logits_all)."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float64)


def end_of_generation_tokens(llm: Any) -> set[int]:
    """EOS and the other end-of-generation tokens llama.cpp knows for this vocabulary."""
    import llama_cpp

    ends = {llm.token_eos()}
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    ends |= {t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    return ends


def render_template(template: str, prompt: str, system: str) -> str:
    """The Go-template subset our templates use: ``.System``, ``.Prompt`` and ``.Response``."""
    text = re.sub(r"\{\{-?\s*\.Prompt\s*-?\}\}", lambda _: prompt, template)
    text = re.sub(r"\{\{-?\s*\.System\s*-?\}\}", lambda _: system, text)
    text = re.sub(r"\{\{-?\s*\.Response\s*-?\}\}", "", text)
    if "{{" in text.replace(prompt, "").replace(system, ""):
        raise ApiError(400, "template uses constructs this test server does not implement")
    return text


class StopScanner:
    """Cuts generated text at the first stop sequence, holding back text that may start one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        """Text that can be sent now."""
        self.text += self.decoder.decode(piece)
        cut = min((i for s in self.stops if (i := self.text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = self.text[:cut]
            out, self.sent = self.text[self.sent :], len(self.text)
            return out
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        end = len(self.text) - hold
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def flush(self) -> str:
        self.text += self.decoder.decode(b"", final=True)
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


# --- HTTP ------------------------------------------------------------------------------------


class Slots:
    """Ollama's parallel slots: at most ``parallel`` generations at once, the others queued (its
    scheduler and the runner's semaphore), each holding its slot at least ``latency`` seconds."""

    def __init__(self, parallel: int | None = None, latency: float = 0.0) -> None:
        self._free = threading.BoundedSemaphore(parallel) if parallel else None
        self.latency = latency
        self._lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0  # generations computing now, and at most

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"in_flight": self.in_flight, "max_in_flight": self.max_in_flight}

    def _count(self, step: int) -> None:
        with self._lock:
            self.in_flight += step
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    @contextlib.contextmanager
    def taken(self) -> Iterator[float]:
        """Hold a slot (waiting in line for one first); yields when it was taken."""
        if self._free is not None:
            self._free.acquire()
        self._count(1)
        try:
            yield time.monotonic()
        finally:
            self._count(-1)
            if self._free is not None:
                self._free.release()

    def paced(self, events: Iterator[dict[str, Any]], started: float) -> Iterator[dict[str, Any]]:
        """``events``, the last (``done``) one no sooner than ``latency`` after ``started``."""
        for ev in events:
            if ev.get("done"):
                time.sleep(max(0.0, started + self.latency - time.monotonic()))
            yield ev


@dataclass(frozen=True)
class Load:
    """How the server behaves under load (see the module docstring): slots, latency, a recorded
    answer in place of llama.cpp, prompts to fail."""

    parallel: int | None = None
    latency_ms: float = 0.0
    canned: dict[str, Any] | None = None
    fail_prompts: tuple[str, ...] = ()


class OllamaServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        store: Store,
        version: str,
        threads: int,
        load: Load = Load(),
    ) -> None:
        super().__init__(address, Handler)
        self.store = store
        self.version = version
        self.runtime = Runtime(store, threads)
        self.logprobs_supported = parse_version(version) >= LOGPROBS_SINCE
        self.load = load
        self.slots = Slots(load.parallel, load.latency_ms / 1000)


class Handler(BaseHTTPRequestHandler):
    server: OllamaServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        # Ollama (Go's net/http) sets TCP_NODELAY on every connection. Without it, the headers
        # and the body, written apart, wait for the client's delayed ACK: about 40 ms an answer.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        if os.environ.get("OLLAMA_TEST_SERVER_DEBUG"):
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    # routing

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        path = unquote(self.path.split("?", 1)[0])
        routes = {
            ("GET", "/"): self.root,
            ("HEAD", "/"): self.root,
            ("GET", "/api/version"): self.version,
            ("GET", "/api/tags"): self.tags,
            ("POST", "/api/show"): self.show,
            ("POST", "/api/generate"): self.generate,
            ("POST", "/api/create"): self.create,
            ("POST", "/api/copy"): self.copy,
            ("DELETE", "/api/delete"): self.delete,
            ("GET", "/api/ps"): self.ps,
            ("GET", "/_test/blobs"): self.blobs,
            ("GET", "/_test/last_tokens"): self.last_tokens,
            ("GET", "/_test/load"): self.load_stats,
        }
        try:
            self.server.runtime.expire()
            if path.startswith("/api/blobs/") and method in ("HEAD", "POST"):
                digest = parse_digest(path.removeprefix("/api/blobs/"))
                (self.head_blob if method == "HEAD" else self.post_blob)(digest)
                return
            handler = routes.get((method, path))
            if handler is None:
                self._drain()
                known = {p for _, p in routes} | {"/api/blobs/"}
                status = 405 if path in known else 404
                raise ApiError(status, f"{method} {path} is not an endpoint of this server")
            handler()
        except ApiError as exc:
            self._send_json(exc.status, {"error": exc.message})
        except (BrokenPipeError, ConnectionResetError):
            pass

    # plumbing

    def _drain(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _body(self) -> dict[str, Any]:
        raw = self._drain()
        if not raw.strip():
            raise ApiError(400, "missing request body")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"invalid JSON body: {exc}") from exc
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _send_json(self, status: int, data: Any) -> None:
        payload = b"" if data is None else json.dumps(data).encode()
        self.send_response(status)
        if data is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _stream(self, events: Iterator[dict[str, Any]], stream: bool) -> None:
        """NDJSON in chunked encoding when streaming; the merged last object otherwise."""
        if not stream:
            final: dict[str, Any] = {}
            for ev in events:
                final = ev
            self._send_json(200, final)
            return
        first = next(events)  # errors before the first event are answered as plain errors
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            self._chunk(first)
            for ev in events:
                self._chunk(ev)
        except ApiError as exc:
            self._chunk({"error": exc.message})
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, data: dict[str, Any]) -> None:
        line = json.dumps(data).encode() + b"\n"
        self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
        self.wfile.flush()

    # endpoints

    def root(self) -> None:
        payload = b"Ollama is running"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def version(self) -> None:
        self._send_json(200, {"version": self.server.version})

    def tags(self) -> None:
        models = [
            {
                "name": r.name,
                "model": r.name,
                "modified_at": r.modified_at,
                "size": r.size,
                "digest": r.digest,
                "details": self._details(r),
            }
            for r in self.server.store.all()
        ]
        self._send_json(200, {"models": models})

    @staticmethod
    def _details(r: ModelRecord) -> dict[str, Any]:
        count = r.parameter_count
        size = f"{count / 1e9:.1f}B" if count >= 1e8 else f"{count / 1e6:.2f}M"
        return {
            "parent_model": r.parent,
            "format": "gguf",
            "family": r.family,
            "families": [r.family] if r.family else None,
            "parameter_size": size,
            "quantization_level": r.quantization,
        }

    def show(self) -> None:
        body = self._body()
        check_fields(body, {"model", "name", "verbose", "system", "template", "options"}, "show")
        asked = body.get("model") or body.get("name")
        record = self.server.store.get(model_name(asked), asked)
        path = self.server.store.blob_path(record.gguf)
        params = "\n".join(
            f"{key:<30} {json.dumps(v) if isinstance(v, str) else v}"
            for key, value in record.parameters.items()
            for v in (value if isinstance(value, list) else [value])
        )
        modelfile = (
            f'# Modelfile generated by "ollama show"\nFROM {path}\n'
            f'TEMPLATE """{record.template}"""\n'
            + "".join(f"PARAMETER {line}\n" for line in params.splitlines())
        )
        data = {
            "modelfile": modelfile,
            "parameters": params,
            "template": record.template,
            "details": self._details(record),
            "model_info": record.model_info,
            "capabilities": ["completion"],
            "modified_at": record.modified_at,
        }
        if record.system:
            data["system"] = record.system
        self._send_json(200, data)

    def head_blob(self, digest: str) -> None:
        self._send_json(200 if self.server.store.has_blob(digest) else 404, None)

    def post_blob(self, digest: str) -> None:
        length = self.headers.get("Content-Length")
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        if length is None and not chunked:
            raise ApiError(411, "a blob upload needs Content-Length or chunked encoding")
        self.server.store.put_blob(
            digest, self._read_chunked() if chunked else self._read_length(int(length or 0))
        )
        self._send_json(201, None)

    def _read_length(self, length: int) -> Iterator[bytes]:
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 20))
            if not chunk:
                raise ApiError(400, "the upload ended before Content-Length bytes")
            length -= len(chunk)
            yield chunk

    def _read_chunked(self) -> Iterator[bytes]:
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return
            yield self.rfile.read(size)
            self.rfile.readline()

    def copy(self) -> None:
        body = self._body()
        check_fields(body, {"source", "destination"}, "copy")
        source = model_name(body.get("source"))
        if not self.server.store.has_model(source):
            raise ApiError(404, f"model {json.dumps(body['source'])} not found")
        record = self.server.store.get(source)
        record.name = model_name(body.get("destination"))
        self.server.store.save(record)
        self._send_json(200, None)

    def delete(self) -> None:
        body = self._body()
        check_fields(body, {"model", "name"}, "delete")
        asked = body.get("model") or body.get("name")
        name = model_name(asked)
        record = self.server.store.get(name, asked)
        self.server.store.delete(name)
        if not any(r.gguf == record.gguf for r in self.server.store.all()):
            self.server.runtime.unload(record)
        self.server.store.remove_unused({record.gguf})  # unconditional: routes.go line 1011
        self._send_json(200, None)

    def ps(self) -> None:
        """The loaded models (``PsHandler``, ``server/routes.go``), longest to live first."""
        self._drain()
        models = []
        for loaded in self.server.runtime.loaded():
            r = loaded.record
            expires = loaded.expires
            left = 10 * 365 * 86400.0 if expires is None else expires - time.monotonic()
            at = datetime.fromtimestamp(time.time() + left, UTC).isoformat()
            models.append(
                {"name": r.name, "model": r.name, "size": r.size, "digest": r.digest,
                 "details": self._details(r), "expires_at": at.replace("+00:00", "Z"),
                 "size_vram": 0, "context_length": loaded.n_ctx, "_left": left}
            )  # fmt: skip
        models.sort(key=lambda m: -m.pop("_left"))
        self._send_json(200, {"models": models})

    def blobs(self) -> None:
        self._drain()
        store = self.server.store
        found = sorted(p.name for p in store.blobs.glob("sha256-*"))
        self._send_json(200, {"blobs": found, "unused": store.unused_blobs()})

    def last_tokens(self) -> None:
        self._drain()
        self._send_json(200, self.server.runtime.last_tokens or {})

    def load_stats(self) -> None:
        self._drain()
        self._send_json(200, self.server.slots.stats())

    def create(self) -> None:
        body = self._body()
        check_fields(body, CREATE_FIELDS, "create")
        name = model_name(body.get("model") or body.get("name"))
        stream = body.get("stream", True)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be a boolean")
        for unsupported in ("adapters", "messages", "renderer", "parser"):
            if body.get(unsupported):
                raise ApiError(400, f"{unsupported!r} is not implemented by this test server")
        record = self._new_record(name, body)
        old = self.server.store.get(name) if self.server.store.has_model(name) else None
        self._stream(self._create_events(record, body.get("quantize"), old), stream)

    def _new_record(self, name: str, body: dict[str, Any]) -> ModelRecord:
        store = self.server.store
        files, source = body.get("files"), body.get("from")
        if bool(files) == bool(source):
            raise ApiError(400, "create needs either 'files' (a GGUF blob) or 'from' (a model)")
        if source:
            record = store.get(model_name(source), source)
            record.parent = record.name
            record.name = name
        else:
            if not isinstance(files, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in files.items()
            ):
                raise ApiError(400, "files must map file names to sha256 digests")
            ggufs = [(n, parse_digest(d)) for n, d in files.items() if n.endswith(".gguf")]
            if len(ggufs) != 1 or len(files) != 1:
                raise ApiError(400, "this test server creates models from exactly one .gguf file")
            fname, digest = ggufs[0]
            if not store.has_blob(digest):
                raise ApiError(400, f"blob sha256:{digest} for {fname} was not pushed")
            record = ModelRecord(name=name, gguf=digest, files=dict(files))
        template, system = body.get("template"), body.get("system")
        if template is not None:
            if not isinstance(template, str):
                raise ApiError(400, "template must be a string")
            record.template = template
        if system is not None:
            if not isinstance(system, str):
                raise ApiError(400, "system must be a string")
            record.system = system
        params = body.get("parameters")
        if params is not None:
            check_options(params)
            record.parameters = {**record.parameters, **params}
        return record

    def _create_events(
        self, record: ModelRecord, quantize_to: Any, old: ModelRecord | None
    ) -> Iterator[dict[str, Any]]:
        store = self.server.store
        yield {"status": "parsing GGUF"}
        meta = gguf_metadata(store.blob_path(record.gguf))
        record.model_info = meta
        arch = str(meta.get("general.architecture", ""))
        record.family = arch
        record.parameter_count = int(meta.get("general.parameter_count", 0))
        current = FILE_TYPES.get(int(meta.get("general.file_type", 0)), "F32")
        record.quantization = current
        kind = str(quantize_to or "").upper()
        if kind:
            if kind not in QUANT_TYPES:  # ggml.ParseFileType, fs/ggml/type.go line 85
                raise ApiError(
                    500,
                    f"unsupported quantization type {kind} - supported types are "
                    "F32, F16, Q4_K_S, Q4_K_M, Q8_0",
                )
            if current not in ("F16", "F32"):  # createModel, server/create.go line 477
                raise ApiError(500, "quantization is only supported for F16 and F32 models")
        if kind and QUANT_TYPES[kind] != QUANT_TYPES.get(current):  # same type: nothing to do
            src = store.blob_path(record.gguf)
            # quantizeLayer's progress (server/create.go line 568): a status with the source's
            # size as total and the bytes done as completed, under a placeholder digest
            step = {"status": f"quantizing {current} model to {kind}", "digest": "0" * 19}
            step["total"] = src.stat().st_size
            yield step | {"completed": 0}
            fd, tmp = tempfile.mkstemp(dir=store.blobs, prefix=".quantize-", suffix=".gguf")
            os.close(fd)
            tmp_path = Path(tmp)
            if quantize(src, tmp_path, kind):
                yield step | {"completed": step["total"]}
                yield {"status": "verifying conversion"}
                record.model_info = gguf_metadata(tmp_path)
                record.gguf = store.add_file_blob(tmp_path)
                record.quantization = kind.upper()
                yield {"status": f"creating new layer sha256:{record.gguf}"}
            else:
                tmp_path.unlink(missing_ok=True)
                yield {
                    "status": f"llama.cpp cannot quantize this model to {kind}; keeping {current}"
                }
        else:
            yield {"status": f"using existing layer sha256:{record.gguf}"}
        record.size = store.blob_path(record.gguf).stat().st_size
        yield {"status": "writing manifest"}
        store.save(record)
        if old is not None and not os.environ.get("OLLAMA_NOPRUNE"):  # create.go line 238
            store.remove_unused({old.gguf})
        yield {"status": "success"}

    def generate(self) -> None:
        # The slot is taken as the request arrives: reading and checking it is part of the
        # latency (Ollama, in Go, does that in microseconds; here it takes a millisecond).
        with self.server.slots.taken() as started:
            self._generate(started)

    def _generate(self, started: float) -> None:
        body = self._body()
        check_fields(body, GENERATE_FIELDS, "generate")
        asked = body.get("model")
        name = model_name(asked)
        for unsupported in ("images", "format", "suffix", "context", "think"):
            if body.get(unsupported):
                raise ApiError(400, f"{unsupported!r} is not implemented by this test server")
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string")
        for key in ("raw", "stream", "logprobs"):
            if key in body and not isinstance(body[key], bool):
                raise ApiError(400, f"{key} must be a boolean")
        top_n = body.get("top_logprobs", 0) or 0
        if isinstance(top_n, bool) or not isinstance(top_n, int) or not 0 <= top_n <= 20:
            raise ApiError(400, "top_logprobs must be an integer between 0 and 20")
        keep_alive = parse_keep_alive(body.get("keep_alive"))
        record = self.server.store.get(name, asked)
        options = {**DEFAULT_OPTIONS, **check_options(record.parameters)}
        options |= {k: v for k, v in check_options(body.get("options")).items() if v is not None}
        stops = options["stop"]
        options["stop"] = [stops] if isinstance(stops, str) else list(stops)
        want_logprobs = bool(body.get("logprobs")) and self.server.logprobs_supported
        stream = body.get("stream", True)
        if not prompt:
            self._send_json(200, self._load_only(record, keep_alive, options))
            return
        if not body.get("raw"):
            template = body.get("template") or record.template
            prompt = render_template(template, prompt, body.get("system") or record.system)
        if any(text in prompt for text in self.server.load.fail_prompts):
            raise ApiError(500, "llama runner failed on this prompt (test server: --fail-prompt)")
        if self.server.load.canned is not None:
            events = canned_events(record, self.server.load.canned, want_logprobs)
        else:
            events = self._generate_events(
                record, prompt, options, want_logprobs, top_n if want_logprobs else 0, keep_alive
            )
        events = self.server.slots.paced(events, started)
        self._stream(events if stream else merge_generate(events), stream)

    def _load_only(
        self, record: ModelRecord, keep_alive: float | None, options: dict[str, Any]
    ) -> dict[str, Any]:
        """An empty prompt loads the model, or unloads it with ``keep_alive: 0``."""
        runtime = self.server.runtime
        base = {"model": record.name, "created_at": now_iso(), "response": "", "done": True}
        if keep_alive == 0:
            runtime.unload(record)
            return base | {"done_reason": "unload"}
        loaded, _ = runtime.load(record, int(options["num_ctx"]))
        loaded.expires = None if keep_alive is None else time.monotonic() + keep_alive
        return base | {"done_reason": "load"}

    def _generate_events(
        self,
        record: ModelRecord,
        prompt: str,
        options: dict[str, Any],
        want_logprobs: bool,
        top_n: int,
        keep_alive: float | None,
    ) -> Iterator[dict[str, Any]]:
        runtime = self.server.runtime
        started = time.perf_counter()
        loaded, load_seconds = runtime.load(record, int(options["num_ctx"]))
        asked = runtime.tokenize(loaded, prompt)
        bos = bool(asked) and asked[0] == loaded.llm.token_bos()
        tokens, keep = truncate_prompt(asked, options, bos)
        scanner = StopScanner(options["stop"])
        generated: list[int] = []
        pending: list[tuple[int, dict[str, Any]]] = []  # (text offset where it starts, entry)
        done_reason = "length"
        eval_started = 0.0
        prompt_seconds = 0.0
        with loaded.lock:
            loaded.expires = None
            runtime.last_tokens = {"model": record.name, "prompt_tokens": tokens}
            t0 = time.perf_counter()
            steps = runtime.generate(loaded, tokens, options, top_n, keep)
            try:
                for step in steps:
                    if not generated:
                        eval_started = time.perf_counter()
                        prompt_seconds = eval_started - t0
                    generated.append(step.token)
                    if want_logprobs:
                        pending.append((len(scanner.text), self._logprob_entry(loaded, step)))
                    text = scanner.feed(step.text)
                    if scanner.stopped:
                        # tokens that only spell the stop sequence are not part of the answer
                        pending = [(at, e) for at, e in pending if at < len(scanner.text)]
                        done_reason = "stop"
                        if text or pending:
                            yield self._chunk_event(record, text, pending)
                        break
                    if text:
                        yield self._chunk_event(record, text, pending)
                        pending = []
                else:
                    if len(generated) < self._limit(options, loaded, tokens):
                        done_reason = "stop"
                    tail = scanner.flush()
                    if tail or pending:
                        yield self._chunk_event(record, tail, pending)
            finally:
                steps.close()
                runtime.last_tokens = {
                    "model": record.name,
                    "prompt_tokens": tokens,
                    "generated_tokens": generated,
                    "prompt_truncated": len(asked) - len(tokens),
                    "options": options,  # in effect: the request's, the model's, the defaults
                }
                if keep_alive == 0:
                    runtime.unload(record)
                else:
                    loaded.expires = None if keep_alive is None else time.monotonic() + keep_alive
        end = time.perf_counter()
        if not generated:
            prompt_seconds = end - t0
            eval_started = end
        yield {
            "model": record.name,
            "created_at": now_iso(),
            "response": "",
            "done": True,
            "done_reason": done_reason,
            "total_duration": int((end - started) * 1e9),
            "load_duration": int(load_seconds * 1e9),
            "prompt_eval_count": len(tokens),
            "prompt_eval_duration": int(prompt_seconds * 1e9),
            "eval_count": len(generated),
            "eval_duration": int((end - eval_started) * 1e9),
        }

    @staticmethod
    def _limit(options: dict[str, Any], loaded: Loaded, tokens: list[int]) -> int:
        room = int(options["num_ctx"]) - len(tokens)
        limit = options["num_predict"]
        return room if limit is None or limit < 0 else limit

    @staticmethod
    def _chunk_event(
        record: ModelRecord, text: str, pending: list[tuple[int, dict[str, Any]]]
    ) -> dict[str, Any]:
        event: dict[str, Any] = {
            "model": record.name,
            "created_at": now_iso(),
            "response": text,
            "done": False,
        }
        if pending:
            event["logprobs"] = [entry for _, entry in pending]
        return event

    @staticmethod
    def _logprob_entry(loaded: Loaded, step: Step) -> dict[str, Any]:
        def token_entry(token_bytes: bytes, logprob: float) -> dict[str, Any]:
            text = token_bytes.decode("utf-8", "replace")
            return {"token": text, "bytes": list(token_bytes) or None, "logprob": logprob}

        entry = token_entry(step.text, step.logprob)
        if step.top:
            entry["top_logprobs"] = [
                token_entry(loaded.llm.detokenize([t]), lp) for t, lp in step.top
            ]
        return entry


def canned_events(
    record: ModelRecord, canned: dict[str, Any], want_logprobs: bool
) -> Iterator[dict[str, Any]]:
    """A recorded answer replayed as a generation: one chunk with its text (and log-probabilities
    when asked for), then the final event with the recorded counts."""
    chunk: dict[str, Any] = {
        "model": record.name,
        "created_at": now_iso(),
        "response": canned.get("response", ""),
        "done": False,
    }
    if want_logprobs and canned.get("logprobs"):
        chunk["logprobs"] = canned["logprobs"]
    yield chunk
    counts = ("prompt_eval_count", "eval_count")
    yield {
        "model": record.name,
        "created_at": now_iso(),
        "response": "",
        "done": True,
        "done_reason": canned.get("done_reason", "stop"),
        **{key: canned[key] for key in counts if key in canned},
    }


def merge_generate(events: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Non-streaming ``/api/generate``: one object with the whole response and all logprobs."""
    text, logprobs = [], []
    for ev in events:
        if not ev.get("done"):
            text.append(ev.get("response", ""))
            logprobs += ev.get("logprobs", [])
            continue
        final = ev | {"response": "".join(text)}
        if logprobs:
            final["logprobs"] = logprobs
        yield final


def _stop_at_eof(server: OllamaServer) -> None:
    """Block on stdin; when the parent that holds its other end is gone, stop serving."""
    while sys.stdin.buffer.read(4096):
        pass
    server.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434, help="0 picks a free port")
    parser.add_argument("--store", type=Path, required=True, help="directory for blobs and models")
    parser.add_argument(
        "--version",
        dest="ollama_version",
        default=DEFAULT_VERSION,
        help="Ollama version to report (below 0.12.11: no logprobs)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="llama.cpp threads (1 suits tiny models: spinning threads only add contention)",
    )
    parser.add_argument(
        "--parallel", type=int, help="generations at once; more wait in line (OLLAMA_NUM_PARALLEL)"
    )
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="each generation takes at least this long"
    )
    parser.add_argument(
        "--canned-response",
        type=Path,
        help="answer every generation with this recorded /api/generate response (JSON)",
    )
    parser.add_argument(
        "--fail-prompt",
        action="append",
        default=[],
        help="test-only: answer 500 to a generation whose prompt contains this text",
    )
    parser.add_argument(
        "--exit-with-stdin",
        action="store_true",
        help="stop when stdin closes: a test run killed hard leaves no server behind",
    )
    args = parser.parse_args(argv)
    import llama_cpp  # noqa: F401 - fail now, with the install hint, rather than at first request

    store = Store(args.store)
    if not os.environ.get("OLLAMA_NOPRUNE"):
        store.prune()
    load = Load(
        parallel=args.parallel,
        latency_ms=args.latency_ms,
        canned=json.loads(args.canned_response.read_text()) if args.canned_response else None,
        fail_prompts=tuple(args.fail_prompt),
    )
    server = OllamaServer((args.host, args.port), store, args.ollama_version, args.threads, load)
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port}", flush=True)
    if args.exit_with_stdin:
        threading.Thread(target=_stop_at_eof, args=(server,), daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
