"""The base model: a local folder used as-is, or a Hugging Face repository fetched once.

``huggingface_hub.snapshot_download`` keeps files in the shared Hugging Face cache, resumes an
interrupted download and re-uses a complete snapshot offline. Only what mlx-lm loads is fetched:
the configuration, the tokenizer and the ``model*.safetensors`` shards. Mistral's own repository
also carries ``consolidated.safetensors``, the same 14.5 GB of weights in another layout, which
this skips. Every failure becomes a :class:`TrainingError` that says what to do.
"""

from __future__ import annotations

import logging
from pathlib import Path

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


def resolve_base_model(settings: Settings) -> Path:
    """The folder of ``training.base_model``: the local path, else the cached snapshot."""
    name = settings.training.base_model
    local = Path(name).expanduser()
    if local.exists():
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
    return download(name, token=hf_token(settings))


def download(repo_id: str, *, token: str | None, endpoint: str | None = None) -> Path:
    """Fetch (or find in the cache) the needed files of ``repo_id``; errors say how to fix them."""
    # huggingface_hub's download machinery: ~450 ms and 350 modules, for this step only
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    page = f"https://huggingface.co/{repo_id}"
    event(log, "training.base_model.fetch", repo=repo_id, token="set" if token else "not set")
    try:
        path = snapshot_download(
            repo_id, allow_patterns=ALLOW_PATTERNS, token=token or None, endpoint=endpoint
        )
    except GatedRepoError as exc:
        if token:
            raise TrainingError(
                f"{repo_id} is gated and this Hugging Face token has no access to it: accept the "
                f"licence at {page} with the account that owns the token, then retry"
            ) from exc
        raise TrainingError(
            f"{repo_id} is gated: accept its licence at {page}, create a read token at "
            "https://huggingface.co/settings/tokens and export HF_TOKEN=… (or "
            "`keyring set mailrouter huggingface`)"
        ) from exc
    except RepositoryNotFoundError as exc:
        hint = "" if token else " (private or gated models need HF_TOKEN)"
        raise TrainingError(
            f"{repo_id}: no such model on Hugging Face, or no access{hint}"
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise TrainingError(
            f"{repo_id} is not in the Hugging Face cache and the Hub cannot be reached (offline, "
            "or HF_HUB_OFFLINE=1): connect once to download it, or set training.base_model to a "
            "local folder"
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        if status in (401, 403):
            raise TrainingError(
                f"{repo_id}: Hugging Face refused access (HTTP {status}): check HF_TOKEN and "
                f"that the licence is accepted at {page}"
            ) from exc
        raise TrainingError(f"{repo_id}: download failed (HTTP {status}): {exc}") from exc
    except OSError as exc:
        raise TrainingError(f"{repo_id}: download failed: {exc}") from exc
    event(log, "training.base_model.ready", repo=repo_id, path=path)
    return Path(path)
