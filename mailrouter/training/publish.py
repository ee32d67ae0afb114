"""Publish a candidate to Ollama, check it there, put it in service; promote, roll back, prune.

The candidate ships as one model file: the adapter is merged into the base tensor by tensor and
written as one GGUF with correct tokenizer metadata (:mod:`.gguf`), pushed with ``/api/blobs`` and
created with ``/api/create`` (our chat template, stop sequences, temperature 0,
``training.quantize``, progress streamed) under a versioned name ``mailrouter:vN``, leaving no blob
in Ollama's store that no model uses (:func:`create_from_gguf`). The new version is then evaluated
**through Ollama** on the test split, and only when its accuracy matches the in-process MLX
evaluation (``training.ollama_tolerance``) is it copied to ``mailrouter:latest``, the name the
router uses. A mismatch means the published file is not the model that was evaluated: it is
deleted and the model in service stays.

The tutorial's Modelfile route (``FROM <model>`` + ``ADAPTER``) is gone: Ollama refuses to
quantise a model created from an already quantised one ("quantization is only supported for F16
and F32 models", ``createModel`` in ``server/create.go``), and newer releases no longer convert an
mlx-lm safetensors adapter.

Before training, :func:`unload_models` asks Ollama to free the memory of every loaded model.
Only the last ``training.keep_versions`` versions are kept (plus the one in service); older ones
are deleted through the API. ``promote`` and ``rollback`` switch ``latest`` with ``/api/copy``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ollama

from .. import calibration
from ..calibration import Calibration
from ..chat_template import ChatTemplate
from ..classify.ollama import OllamaClassifier, full_name, model_options, normalize_host
from ..config import Settings
from ..dataset import Example
from ..errors import MailRouterError, TrainingError
from ..logs import event
from ..state import State
from ..tokens import keep, kept_dir
from . import registry
from .calibrate import from_report, record
from .evaluation import Report, evaluate
from .recorder import Recorder

log = logging.getLogger(__name__)

#: The chat template of a model created without a base folder at hand: Mistral v0.3's.
DEFAULT_CHAT = ChatTemplate.mistral_v3()

#: The tag suffix of the float model a version is quantised from, deleted once it is.
STAGING_SUFFIX = "-f16"


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


def ollama_models_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where Ollama keeps its blobs: ``OLLAMA_MODELS``, else ``~/.ollama/models``
    (``envconfig.Models``, ``envconfig/config.go`` line 87 of v0.13.0). Ollama reads its own
    environment: one that sets ``OLLAMA_MODELS`` must give mailrouter the same value."""
    found = environ.get("OLLAMA_MODELS")
    return Path(found).expanduser() if found else Path.home() / ".ollama" / "models"


def unused_blobs(models_dir: Path) -> list[str]:
    """Digests (``sha256:…``) of the blobs in an Ollama store that no model's manifest uses:
    what Ollama's ``PruneLayers`` would remove at its next start (``server/images.go`` line 490
    of v0.13.0). Manifests are ``manifests/<host>/<namespace>/<model>/<tag>`` (``Manifests``,
    ``server/manifest.go`` line 126), blobs ``blobs/sha256-<hex>`` (``GetBlobsPath``,
    ``server/modelpath.go`` line 125). After a publish this is empty."""
    used: set[str] = set()
    for path in (models_dir / "manifests").glob("*/*/*/*"):
        if path.is_file():
            manifest = json.loads(path.read_text(encoding="utf-8"))
            used.update(m.get("digest", "") for m in [manifest.get("config", {})])
            used.update(layer.get("digest", "") for layer in manifest.get("layers", []))
    found = (p.name.replace("-", ":", 1) for p in (models_dir / "blobs").glob("sha256-*"))
    return sorted(set(found) - used)


def disk_needs(settings: Settings, run_dir: Path, gguf_bytes: int) -> list[dict[Path, int]]:
    """What a publish has on disk at once, by folder, phase by phase: while it uploads, the GGUF
    in the run folder and (with Ollama on this machine) Ollama's copy; while Ollama quantises,
    its copy and the quantised file (never bigger), the local GGUF being gone by then."""
    host = normalize_host(settings.classifier.ollama_host)
    if not any(f"//{local}" in host for local in ("127.0.0.1", "localhost", "[::1]")):
        return [{run_dir: gguf_bytes}]  # Ollama's disk is another machine's
    store = ollama_models_dir()
    phases = [{run_dir: gguf_bytes, store: gguf_bytes}]
    if settings.training.quantize:
        phases.append({store: 2 * gguf_bytes})
    return phases


def check_disk(phases: Sequence[Mapping[Path, int]]) -> None:
    """Refuse to publish without room: on each file system, for the phase that needs the most
    there; the error names each folder and what it needs."""
    worst: dict[int, dict[Path, int]] = {}
    for phase in phases:
        by_device: dict[int, dict[Path, int]] = {}
        for path, needed in phase.items():
            by_device.setdefault(_existing(path).stat().st_dev, {})[path] = needed
        for device, needs in by_device.items():
            if sum(needs.values()) > sum(worst.get(device, {}).values()):
                worst[device] = needs
    for needs in worst.values():
        free = shutil.disk_usage(_existing(next(iter(needs)))).free
        if free < sum(needs.values()):
            where = " and ".join(f"{n / 1e9:.1f} GB at {p}" for p, n in needs.items())
            raise TrainingError(
                f"not enough disk space to publish: {where} (the GGUF, and Ollama's copy and "
                f"quantisation of it), {free / 1e9:.1f} GB free there; free some space, or "
                "lower training.keep_versions"
            )


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (Ollama creates its folder on first use)."""
    return next(p for p in (path, *path.parents) if p.exists())


# --- create --------------------------------------------------------------------------------


def _create(
    settings: Settings,
    api: ollama.Client,
    name: str,
    report: Callable[[str], None] | None = None,
    chat: ChatTemplate = DEFAULT_CHAT,
    **body: Any,
) -> None:
    """``/api/create`` streamed: its progress is logged and reported, an error ends it. The
    model's ``TEMPLATE`` is ``chat``'s user turn (for ``ollama run`` by hand: the router sends
    raw text), its stop sequences ``chat``'s."""
    try:
        stream = api.create(
            model=name,
            template=chat.ollama_template(),
            parameters={"stop": chat.stop, **model_options(settings.classifier)},
            stream=True,
            **body,
        )
        follow_create(stream, name, report)
    except ollama.ResponseError as exc:
        raise TrainingError(f"Ollama refused to create {name}: {exc.error}") from exc
    except (httpx.HTTPError, ConnectionError) as exc:
        raise TrainingError(f"Ollama: creating {name} failed: {exc}") from exc


def _blob(api: ollama.Client, path: Path) -> str:
    try:
        return api.create_blob(path)
    except (ollama.ResponseError, httpx.HTTPError, ConnectionError) as exc:
        raise TrainingError(f"Ollama: uploading {path.name} failed: {exc}") from exc


def follow_create(
    stream: Iterable[ollama.ProgressResponse], name: str, report: Callable[[str], None] | None
) -> None:
    """Log and report each new status of a streamed create; quantisation, which sends its
    progress as ``completed``/``total``, in steps of 10 %. An error line raises (the client turns
    it into :class:`ollama.ResponseError`)."""
    last = ""
    for part in stream:
        status = part.status or ""
        if part.total and part.completed is not None:
            status += f" {10 * int(10 * part.completed / part.total)}%"
        if status and status != last:
            last = status
            event(log, "training.ollama_create", model=name, status=status)
            if report is not None:
                report(f"Ollama: {status}")


def staging_name(name: str) -> str:
    """``mailrouter:v3`` → ``mailrouter:v3-f16``: the float model ``name`` is quantised from."""
    return name + STAGING_SUFFIX


def create_from_gguf(
    settings: Settings,
    api: ollama.Client,
    name: str,
    gguf: Path,
    report: Callable[[str], None] | None = None,
    chat: ChatTemplate = DEFAULT_CHAT,
) -> None:
    """Push ``gguf`` (then remove it here) and create ``name`` from it, with ``chat`` (the
    base model's chat template), leaving in Ollama's store
    no blob that no model uses.

    Quantising writes a new blob and keeps the one it read (``quantizeLayer``,
    ``server/create.go`` line 561 of v0.13.0), and no API deletes a blob (``/api/blobs`` is HEAD
    and POST only, ``server/routes.go`` line 1509): a GGUF pushed and created with ``quantize``
    stays on disk, used by no model, until Ollama restarts (``PruneLayers``, ``server/images.go``
    line 490; never with ``OLLAMA_NOPRUNE``). So the float file is created as a model of its own,
    ``<name>-f16``, ``name`` is created from it with ``quantize``, and ``<name>-f16`` is deleted:
    deleting a model removes each of its blobs no other model uses (``DeleteHandler`` →
    ``Manifest.RemoveLayers`` → ``Layer.Remove``, ``server/routes.go`` line 1011,
    ``server/layer.go`` line 104), whatever ``OLLAMA_NOPRUNE`` says.
    """
    files = {gguf.name: _blob(api, gguf)}
    gguf.unlink()  # Ollama has its own copy; this one is gigabytes
    quantize = settings.training.quantize
    if not quantize:
        _create(settings, api, name, report, chat, files=files)
        return
    staging = staging_name(name)
    try:
        _create(settings, api, staging, report, chat, files=files)
        _create(settings, api, name, report, chat, from_=staging, quantize=quantize)
    finally:
        _delete(api, staging)


def unload_models(settings: Settings) -> list[str]:
    """Ask Ollama to unload every model it holds (``/api/ps``, then ``/api/generate`` with no
    prompt and ``keep_alive: 0``, which ``GenerateHandler`` answers by expiring the runner,
    ``server/routes.go`` line 316 of v0.13.0): training then has that memory. The router loads its
    model again at its next email."""
    api = client(settings)
    try:
        names = [m.model or "" for m in api.ps().models]
        for name in names:
            api.generate(model=name, keep_alive=0)
    except (ollama.ResponseError, httpx.HTTPError, ConnectionError) as exc:
        raise TrainingError(f"Ollama: unloading its models before training failed: {exc}") from exc
    if names:
        event(log, "training.ollama_unloaded", models=",".join(names))
    return names


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
    status: Callable[[str], None] | None = None,
) -> Published:
    """Create ``vN``, check it through Ollama, calibrate its thresholds on ``valid_examples``,
    put it in service, prune old versions. ``status`` hears Ollama's create progress."""
    from .gguf import export_gguf  # numpy and the GGUF writer: heavy, for this step only

    api = client(settings)
    version = registry.next_version(state)
    name = version_name(settings, version)
    for leftover in model_names(api):  # a publish killed between its two creates
        if leftover.startswith(name.rsplit(":", 1)[0] + ":") and leftover.endswith(STAGING_SUFFIX):
            _delete(api, leftover)
    check_disk(disk_needs(settings, run_dir, float_gguf_bytes(base_dir)))
    gguf = run_dir / "model.gguf"
    exported = export_gguf(base_dir, adapter_dir, gguf, dtype=gguf_dtype(base_dir))
    size = exported.size_bytes
    event(log, "training.gguf", path=gguf, mb=round(size / 1e6, 1), seconds=exported.seconds)
    try:
        create_from_gguf(settings, api, name, gguf, status, ChatTemplate.from_model_dir(base_dir))
    finally:
        gguf.unlink(missing_ok=True)
    registry.add_version(state, version, name, {**metrics, "run": run_id})
    # The base's chat template and tokenizer: how the router renders and bounds its prompts.
    keep(base_dir, kept_dir(settings.models_dir, model_digests(api).get(name, "")))
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
        forgotten = forget_deleted_models(settings.models_dir, model_digests(api).values())
        event(log, "training.pruned", versions=",".join(removed), files=len(forgotten))
    return removed


def forget_deleted_models(models_dir: Path, digests: Iterable[str]) -> list[Path]:
    """Remove the prompt files and calibrations kept for Ollama models that exist no more.

    Both are keyed by model digest (a copy such as ``latest`` shares its version's), so what a
    model still on the server uses is kept, whatever its name.
    """
    alive = {kept_dir(models_dir, d) for d in digests} | {
        calibration.ollama_path(models_dir, d) for d in digests
    }
    stale = [
        path
        for path in [
            *(models_dir / "prompt").glob("ollama-*"),
            *(models_dir / "calibration").glob("ollama-*.json"),
        ]
        if path not in alive
    ]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def _delete(api: ollama.Client, name: str) -> None:
    try:
        api.delete(name)
    except ollama.ResponseError as exc:
        if exc.status_code != 404:
            raise TrainingError(f"Ollama: deleting {name} failed: {exc.error}") from exc
    except (httpx.HTTPError, ConnectionError) as exc:
        raise TrainingError(f"Ollama: deleting {name} failed: {exc}") from exc
