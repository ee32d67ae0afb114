"""Publish a candidate to Ollama, check it there, put it in service; promote, roll back, prune.

The robust route (``training.publish = "gguf"``) ships the whole fused model: the adapter is fused
into the base and written as one GGUF with correct tokenizer metadata (:mod:`.gguf`), pushed with
``/api/blobs`` and created with ``/api/create`` (our chat template, stop sequences, temperature 0,
``training.quantize``) under a versioned name ``mailrouter:vN``. The new version is then evaluated
**through Ollama** on the test split, and only when its accuracy matches the in-process MLX
evaluation (``training.ollama_tolerance``) is it copied to ``mailrouter:latest``, the name the
router uses. A mismatch means the published file is not the model that was evaluated: it is
deleted and the model in service stays.

``training.publish = "adapter"`` is the tutorial's Modelfile route (``FROM <zero_shot_model>`` +
``ADAPTER``): a few megabytes instead of gigabytes, but only some Ollama versions convert an
mlx-lm safetensors adapter, and they ignore its ``scale``; the same Ollama check guards it.

Only the last ``training.keep_versions`` versions are kept (plus the one in service); older ones
are deleted through the API. ``promote`` and ``rollback`` switch ``latest`` with ``/api/copy``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ollama

from ..calibration import Calibration
from ..classify.ollama import OllamaClassifier, full_name, normalize_host
from ..config import Settings
from ..dataset import Example
from ..errors import MailRouterError, TrainingError
from ..logs import event
from ..prompt import OLLAMA_TEMPLATE, STOP
from ..state import State
from . import registry
from .calibrate import from_report, record
from .evaluation import Report, evaluate
from .recorder import Recorder

log = logging.getLogger(__name__)

#: Room for the fused folder, the GGUF and Ollama's own copy and quantisation of it.
DISK_FACTOR = 3.2


@dataclass(frozen=True)
class Published:
    version: str
    name: str
    ollama: Report
    answers: list[str]
    file_bytes: int
    calibration: Calibration | None = None


def client(settings: Settings) -> ollama.Client:
    host = normalize_host(settings.classifier.ollama_host)
    return ollama.Client(host=host, timeout=max(600.0, settings.classifier.timeout_seconds))


def latest_name(settings: Settings) -> str:
    """The name the router classifies with, e.g. ``mailrouter:latest``."""
    return full_name(settings.classifier.model)


def version_name(settings: Settings, version: str) -> str:
    return f"{latest_name(settings).rsplit(':', 1)[0]}:{version}"


def server_version(settings: Settings) -> str:
    """``/api/version``; a clear error when Ollama is not running (checked before training)."""
    host = normalize_host(settings.classifier.ollama_host)
    try:
        resp = httpx.get(f"{host}/api/version", timeout=10)
        resp.raise_for_status()
        return str(resp.json().get("version", "?"))
    except (httpx.HTTPError, ValueError) as exc:
        raise TrainingError(
            f"Ollama is not reachable at {host} ({exc}): start it (`ollama serve`) before "
            "training, the candidate is published and checked there"
        ) from exc


def model_names(api: ollama.Client) -> set[str]:
    return set(model_digests(api))


def model_digests(api: ollama.Client) -> dict[str, str]:
    """Each model's digest, by canonical name, as ``/api/tags`` gives them."""
    try:
        return {full_name(m.model or ""): m.digest or "" for m in api.list().models}
    except (ollama.ResponseError, httpx.HTTPError, ConnectionError) as exc:
        raise TrainingError(f"Ollama: cannot list models: {exc}") from exc


# --- disk ----------------------------------------------------------------------------------


def float_gguf_bytes(base_dir: Path) -> int:
    """Size of the float GGUF of ``base_dir``: its weights, re-expanded if they are quantised."""
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    stored = sum(p.stat().st_size for p in base_dir.glob("*.safetensors"))
    quant = config.get("quantization") or config.get("quantization_config") or {}
    bits = quant.get("bits") if isinstance(quant, dict) else None
    # A float base is exported at its own width (float32 stays f32, bfloat16 becomes f16).
    return int(stored * 16 / bits) if bits else stored


def gguf_dtype(base_dir: Path) -> str:
    """``f32`` for a float32 base (kept exact), else ``f16`` (bfloat16 and 4-bit bases)."""
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    return "f32" if config.get("torch_dtype") == "float32" else "f16"


def check_disk(where: Path, needed: int) -> None:
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    if free < needed:
        raise TrainingError(
            f"not enough disk space to publish: about {needed / 1e9:.1f} GB needed at {where}, "
            f"{free / 1e9:.1f} GB free (free some space or lower training.keep_versions)"
        )


# --- create --------------------------------------------------------------------------------


def _create(settings: Settings, api: ollama.Client, name: str, **body: Any) -> None:
    quantize = settings.training.quantize or None
    try:
        api.create(
            model=name,
            template=OLLAMA_TEMPLATE,
            parameters={"stop": list(STOP), "temperature": 0},
            quantize=quantize,
            stream=False,
            **body,
        )
    except ollama.ResponseError as exc:
        raise TrainingError(f"Ollama refused to create {name}: {exc.error}") from exc
    except (httpx.HTTPError, ConnectionError) as exc:
        raise TrainingError(f"Ollama: creating {name} failed: {exc}") from exc


def _blob(api: ollama.Client, path: Path) -> str:
    try:
        return api.create_blob(path)
    except (ollama.ResponseError, httpx.HTTPError, ConnectionError) as exc:
        raise TrainingError(f"Ollama: uploading {path.name} failed: {exc}") from exc


def create_from_gguf(settings: Settings, api: ollama.Client, name: str, gguf: Path) -> None:
    _create(settings, api, name, files={gguf.name: _blob(api, gguf)})


def create_from_adapter(settings: Settings, api: ollama.Client, name: str, adapter: Path) -> None:
    """The Modelfile route: ``FROM <zero_shot_model>`` + ``ADAPTER`` (where Ollama supports it)."""
    files = {
        p.name: _blob(api, p)
        for p in (adapter / "adapters.safetensors", adapter / "adapter_config.json")
    }
    try:
        _create(settings, api, name, from_=settings.classifier.zero_shot_model, adapters=files)
    except TrainingError as exc:
        raise TrainingError(
            f"{exc}. This Ollama does not take an mlx-lm adapter: set training.publish = "
            '"gguf" (the full fused model, supported everywhere)'
        ) from exc


# --- evaluate through Ollama -----------------------------------------------------------------


def evaluate_on_ollama(
    settings: Settings,
    name: str,
    examples: Sequence[Example],
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Report, list[str]]:
    """Classify ``examples`` with model ``name`` exactly as the router would; report and answers."""
    classifier_settings = settings.classifier.model_copy(update={"model": name})
    pinned = settings.model_copy(update={"classifier": classifier_settings})
    recorder = Recorder(OllamaClassifier(pinned))
    report = evaluate(
        recorder,
        examples,
        settings.departments,
        settings.classifier.confidence_threshold,
        progress=progress,
    )
    return report, recorder.answers


# --- the publish step ------------------------------------------------------------------------


def publish(
    settings: Settings,
    state: State,
    *,
    run_id: int,
    base_dir: Path,
    adapter_dir: Path,
    run_dir: Path,
    test_examples: Sequence[Example],
    mlx_accuracy: float,
    metrics: dict[str, Any],
    progress: Callable[[int, int], None] | None = None,
    valid_examples: Sequence[Example] = (),
) -> Published:
    """Create ``vN``, check it through Ollama, calibrate its thresholds on ``valid_examples``,
    put it in service, prune old versions."""
    from .gguf import export_gguf  # numpy and the GGUF writer: heavy, for this step only

    api = client(settings)
    version = registry.next_version(state)
    name = version_name(settings, version)
    size = 0
    if settings.training.publish == "gguf":
        check_disk(run_dir, int(float_gguf_bytes(base_dir) * DISK_FACTOR))
        gguf = run_dir / "model.gguf"
        exported = export_gguf(
            base_dir,
            adapter_dir,
            gguf,
            dtype=gguf_dtype(base_dir),
            timeout=settings.training.timeout_seconds,
        )
        size = exported.size_bytes
        event(log, "training.gguf", path=gguf, mb=round(size / 1e6, 1), seconds=exported.seconds)
        try:
            create_from_gguf(settings, api, name, gguf)
        finally:
            gguf.unlink(missing_ok=True)  # Ollama keeps its own copy; this one is gigabytes
    else:
        create_from_adapter(settings, api, name, adapter_dir)
    registry.add_version(state, version, name, {**metrics, "run": run_id})
    event(log, "training.created", model=name)

    try:
        report, answers = evaluate_on_ollama(settings, name, test_examples, progress)
        _check_agreement(settings, state, version, report, mlx_accuracy)
        calibration = calibrate_version(settings, state, api, version, valid_examples, progress)
    except MailRouterError:
        _delete(api, name)  # never leave a version that was not checked
        registry.set_status(state, version, "rejected")
        raise
    promote(settings, state, version, api=api)
    prune(settings, state, api=api)
    return Published(version, name, report, answers, size, calibration)


def _check_agreement(
    settings: Settings, state: State, version: str, report: Report, mlx_accuracy: float
) -> None:
    """Refuse a version whose accuracy through Ollama is not the one measured in MLX: then
    the published file is not the model that was evaluated."""
    registry.set_status(state, version, "retired", ollama=report.summary())
    gap = abs(report.accuracy - mlx_accuracy)
    if gap > settings.training.ollama_tolerance + 1e-9:
        raise TrainingError(
            f"{version_name(settings, version)} answers differently through Ollama: accuracy "
            f"{report.accuracy:.3f} there, {mlx_accuracy:.3f} in MLX (tolerance "
            f"{settings.training.ollama_tolerance}); it was deleted and the model in service "
            "is unchanged"
        )


def calibrate_version(
    settings: Settings,
    state: State,
    api: ollama.Client,
    version: str,
    examples: Sequence[Example],
    progress: Callable[[int, int], None] | None = None,
) -> Calibration:
    """``version``'s thresholds from its answers through Ollama on ``examples`` (the valid
    split), recorded with it and under its digest (:mod:`.calibrate`) before it serves."""
    name = version_name(settings, version)
    report = evaluate_on_ollama(settings, name, examples, progress)[0] if examples else None
    found = from_report(report, settings.labels, settings.classifier.target_precision)
    record(settings, state, version, model_digests(api).get(name, ""), found)
    event(log, "training.calibrated", version=version, target=found.target,
          thresholds=" ".join(f"{k}={v.threshold}({v.status})"
                              for k, v in found.departments.items()))  # fmt: skip
    return found


# --- promote / rollback / prune -----------------------------------------------------------------


def promote(
    settings: Settings, state: State, version: str, *, api: ollama.Client | None = None
) -> registry.ModelVersion:
    """Put ``version`` in service: ``/api/copy`` to ``latest``, then the registry."""
    api = api or client(settings)
    found = {m.version: m for m in registry.versions(state)}
    model = found.get(version)
    if model is None or model.status == "rejected":
        known = ", ".join(v for v, m in found.items() if m.status != "rejected") or "none"
        raise TrainingError(f"no published version {version!r} (known: {known})")
    if model.name not in model_names(api):
        raise TrainingError(
            f"{model.name} is recorded but no longer on the Ollama server: it cannot be restored"
        )
    try:
        api.copy(model.name, latest_name(settings))
    except (ollama.ResponseError, httpx.HTTPError, ConnectionError) as exc:
        raise TrainingError(f"Ollama: copying {model.name} to latest failed: {exc}") from exc
    registry.set_status(state, version, "in_service")
    event(log, "training.in_service", version=version, model=model.name)
    return registry.in_service(state) or model


def rollback(settings: Settings, state: State) -> registry.ModelVersion:
    """Put back the newest kept version older than the one in service."""
    current = registry.in_service(state)
    if current is None:
        raise TrainingError("no model is in service: nothing to roll back")
    older = [
        m for m in registry.versions(state) if m.status == "retired" and m.number < current.number
    ]
    if not older:
        raise TrainingError(
            f"{current.version} is the oldest version kept: nothing to roll back to"
        )
    return promote(settings, state, older[0].version)


def prune(settings: Settings, state: State, *, api: ollama.Client | None = None) -> list[str]:
    """Keep ``training.keep_versions`` versions: the one in service and the newest others."""
    api = api or client(settings)
    kept = [m for m in registry.versions(state) if m.status in ("in_service", "retired")]
    retained = {m.version for m in kept if m.status == "in_service"}
    for model in kept:
        if len(retained) >= settings.training.keep_versions:
            break
        retained.add(model.version)
    removed = []
    for model in kept:
        if model.version in retained:
            continue
        _delete(api, model.name)
        registry.remove_version(state, model.version)
        removed.append(model.version)
    if removed:
        event(log, "training.pruned", versions=",".join(removed))
    return removed


def _delete(api: ollama.Client, name: str) -> None:
    try:
        api.delete(name)
    except ollama.ResponseError as exc:
        if exc.status_code != 404:
            raise TrainingError(f"Ollama: deleting {name} failed: {exc.error}") from exc
    except (httpx.HTTPError, ConnectionError) as exc:
        raise TrainingError(f"Ollama: deleting {name} failed: {exc}") from exc
