"""The base model: a local folder used as-is, or a Hugging Face repository fetched once.

``huggingface_hub.snapshot_download`` keeps files in the shared Hugging Face cache, resumes an
interrupted download and re-uses a complete snapshot offline. Only what mlx-lm loads is fetched:
the configuration, the tokenizer and the ``model*.safetensors`` shards. Mistral's own repository
also carries ``consolidated.safetensors``, the same 14.5 GB of weights in another layout, which
this skips. ``training.base_revision`` pins the commit (or tag) fetched, so a new upload to the
repository never changes the model trained on without a configuration change; each run records
the commit it used (:func:`base_record`). Every failure becomes a :class:`TrainingError` that says
what to do.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import Settings, hf_token
from ..errors import TrainingError
from ..logs import event

log = logging.getLogger(__name__)

#: What mlx-lm needs to load, train and fuse a model.
ALLOW_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "tokenizer.model",
    "*.jinja",
    "*.tiktoken",
    "*.txt",
]


def pinned_revision(settings: Settings, served: dict[str, Any] | None) -> str:
    """The commit to fetch: ``training.base_revision``, else the one the model in service was
    trained on (``served``, its :func:`base_record`) when it came from the same repository.

    Without this, an empty ``base_revision`` would take the repository's newest upload each night,
    and a candidate could differ from the model it is compared with by its base, not only by its
    data. Empty on the first run: the newest snapshot, whose commit that run then records.
    """
    if settings.training.base_revision:
        return settings.training.base_revision
    if served and served.get("name") == settings.training.base_model:
        return str(served.get("revision") or "")
    return ""


def resolve_base_model(settings: Settings, served: dict[str, Any] | None = None) -> Path:
    """The folder of ``training.base_model``: the local path, else the cached snapshot at
    :func:`pinned_revision`."""
    name = settings.training.base_model
    local = Path(name).expanduser()
    revision = settings.training.base_revision
    if local.exists():
        if revision:
            raise TrainingError(
                f"training.base_revision = {revision!r} is for a Hugging Face model, but "
                f"training.base_model = {name!r} is a local folder: leave base_revision empty"
            )
        if not (local / "config.json").is_file():
            raise TrainingError(
                f"training.base_model = {name!r} is a local path without config.json: "
                "point it at a Hugging Face model folder (config.json, tokenizer, safetensors)"
            )
        return local.resolve()
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise TrainingError(
            f"training.base_model = {name!r}: no such folder, and not a Hugging Face id "
            "of the form owner/name"
        )
    revision = pinned_revision(settings, served)
    return download(name, token=hf_token(settings), revision=revision or None)


def base_record(settings: Settings, base_dir: Path) -> dict[str, Any]:
    """What a run and the version it publishes record of their base: the name, and the commit of
    a Hugging Face snapshot (its folder, ``…/snapshots/<commit>``)."""
    commit = base_dir.name if base_dir.parent.name == "snapshots" else None
    return {"name": settings.training.base_model, "revision": commit}


def download(
    repo_id: str, *, token: str | None, endpoint: str | None = None, revision: str | None = None
) -> Path:
    """Fetch (or find in the cache) the needed files of ``repo_id`` at ``revision`` (a commit,
    branch or tag; ``None``: the newest); errors say how to fix them."""
    # huggingface_hub's download machinery: ~450 ms and 350 modules, for this step only
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    event(log, "training.base_model.fetch", repo=repo_id, revision=revision or "newest",
          token="set" if token else "not set")  # fmt: skip
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=ALLOW_PATTERNS,
            token=token or None,
            endpoint=endpoint,
        )
    except (HfHubHTTPError, OSError) as exc:
        raise _failure(exc, repo_id, token, revision) from exc
    event(log, "training.base_model.ready", repo=repo_id, path=path)
    return Path(path)


def _failure(
    exc: Exception, repo_id: str, token: str | None, revision: str | None
) -> TrainingError:
    """What went wrong fetching ``repo_id``, and what to do about it."""
    from huggingface_hub.errors import (  # loaded by download() already: for this step only
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"https://huggingface.co/{repo_id}"
    if isinstance(exc, GatedRepoError):
        if token:
            return TrainingError(
                f"{repo_id} is gated and this Hugging Face token has no access to it: accept the "
                f"licence at {page} with the account that owns the token, then retry"
            )
        return TrainingError(
            f"{repo_id} is gated: accept its licence at {page}, create a read token at "
            "https://huggingface.co/settings/tokens and export HF_TOKEN=… (or "
            "`keyring set mailrouter huggingface`)"
        )
    if isinstance(exc, RevisionNotFoundError):
        return TrainingError(
            f"{repo_id} has no revision {revision!r} (training.base_revision): give a commit, "
            f"branch or tag listed at {page}/commits/main"
        )
    if isinstance(exc, RepositoryNotFoundError):
        hint = "" if token else " (private or gated models need HF_TOKEN)"
        return TrainingError(f"{repo_id}: no such model on Hugging Face, or no access{hint}")
    if isinstance(exc, LocalEntryNotFoundError):
        return TrainingError(
            f"{repo_id} is not in the Hugging Face cache and the Hub cannot be reached (offline, "
            "or HF_HUB_OFFLINE=1): connect once to download it, or set training.base_model to a "
            "local folder"
        )
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        if status in (401, 403):
            return TrainingError(
                f"{repo_id}: Hugging Face refused access (HTTP {status}): check HF_TOKEN and "
                f"that the licence is accepted at {page}"
            )
        return TrainingError(f"{repo_id}: download failed (HTTP {status}): {exc}")
    return TrainingError(f"{repo_id}: download failed: {exc}")
