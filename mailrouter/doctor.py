"""``mailrouter doctor``: every outside dependency checked, one line each, with the fix.

Each check is a function ``(settings) -> Check`` that never raises: a failure is a result that
names what to do. ``required`` tells what ``serve`` cannot run without (config, mailbox, SMTP,
the classifier) from what only training needs (Hugging Face, MLX, disk space).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .config import Settings, load_settings
from .errors import MailRouterError

# A 7B model fused back to float16 (14.5 GB), its GGUF (14.5 GB) and the quantised copy Ollama
# keeps (4.4 GB) are on disk at once while a candidate is published.
TRAINING_DISK_GB = 35.0
LOGPROBS_VERSION = (0, 12, 11)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True

    def line(self) -> str:
        mark = "✓" if self.ok else "✗"
        text = f"{mark} {self.name}: {self.detail}"
        if not self.ok and self.fix:
            text += f" — fix: {self.fix}"
        if not self.ok and not self.required:
            text += " (needed for training only)"
        return text


def failed(checks: Iterable[Check]) -> bool:
    """True when a required check failed: doctor then exits non-zero."""
    return any(not c.ok and c.required for c in checks)


def _error(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return (
        text.splitlines()[0]
        if isinstance(exc, MailRouterError)
        else f"{type(exc).__name__}: {text}"
    )


# --- config --------------------------------------------------------------------------------


def check_config(config: Path | None) -> tuple[Check, Settings | None]:
    try:
        settings = load_settings(config)
    except MailRouterError as exc:
        return Check("config", False, str(exc), "edit the file named above"), None
    where = str(settings.source) if settings.source else "defaults (no config file)"
    if settings.source is None:
        return (
            Check(
                "config",
                False,
                where,
                "run `mailrouter init`, or pass --config",
            ),
            settings,
        )
    deps = ", ".join(settings.labels)
    return Check("config", True, f"{where}: {len(settings.labels)} departments ({deps})"), settings


# --- training prerequisites -------------------------------------------------------------------


def check_hf(settings: Settings) -> Check:
    """Token and licence of the base model; offline it says so instead of guessing."""
    from .config import hf_token

    base = settings.training.base_model
    if Path(base).expanduser().exists():
        return Check("base model", True, f"local path {base}", required=False)
    token = hf_token(settings)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    token_text = "token set" if token else "no token"
    if offline:
        return Check(
            "Hugging Face",
            True,
            f"{base}: {token_text}; licence not checked offline",
            required=False,
        )
    try:
        from huggingface_hub import auth_check
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - older huggingface_hub
        return Check(
            "Hugging Face", True, f"{base}: {token_text}; licence not checked", required=False
        )
    try:
        auth_check(base, token=token or None)
    except GatedRepoError:
        fix = f"accept the licence at https://huggingface.co/{base}"
        if not token:
            fix += " and set HF_TOKEN (or `keyring set mailrouter huggingface`)"
        return Check("Hugging Face", False, f"{base} is gated; {token_text}", fix, required=False)
    except RepositoryNotFoundError:
        return Check(
            "Hugging Face",
            False,
            f"{base} not found ({token_text})",
            "check [training] base_model (a private repo needs HF_TOKEN)",
            required=False,
        )
    except Exception as exc:  # network errors: a training-time concern, reported plainly
        return Check(
            "Hugging Face",
            False,
            _error(exc),
            "check the network or set HF_HUB_OFFLINE=1",
            required=False,
        )
    return Check("Hugging Face", True, f"{base}: access granted ({token_text})", required=False)


_MLX_PROBE = "import mlx.core as mx; print(mx.__version__, mx.default_device())"


def check_mlx(python: str = sys.executable, timeout: float = 60) -> Check:
    """MLX is probed in a child: a broken install cannot take doctor down, nor load it here."""
    try:
        res = subprocess.run(
            [python, "-c", _MLX_PROBE], capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("MLX", False, _error(exc), "reinstall: pip install 'mlx-lm'", required=False)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["import failed"])[-1]
        fix = "pip install mlx-lm" + (" 'mlx[cpu]'" if sys.platform != "darwin" else "")
        return Check("MLX", False, last, fix, required=False)
    version, _, device = res.stdout.strip().partition(" ")
    return Check("MLX", True, f"mlx {version} on {device}", required=False)


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(settings: Settings, need_gb: float = TRAINING_DISK_GB) -> Check:
    where = _existing_parent(settings.models_dir)
    free_gb = shutil.disk_usage(where).free / 1e9
    detail = f"{free_gb:.1f} GB free at {where} (training a 7B model needs about {need_gb:.0f} GB)"
    if free_gb < need_gb:
        return Check(
            "disk", False, detail, "free space or move data_dir to a larger disk", required=False
        )
    return Check("disk", True, detail, required=False)


# --- the whole run -------------------------------------------------------------------------


def run(
    config: Path | None,
    *,
    send_test: bool = False,
    emit: Callable[[Check], None] | None = None,
) -> list[Check]:
    """Run every check in order, emitting each line as soon as it is known."""
    results: list[Check] = []

    def add(check: Check) -> None:
        results.append(check)
        if emit:
            emit(check)

    first, settings = check_config(config)
    add(first)
    if settings is None:
        return results
    for check in _service_checks(settings, send_test):
        add(check())
    return results


def _service_checks(settings: Settings, send_test: bool) -> list[Callable[[], Check]]:
    return [
        lambda: check_hf(settings),
        check_mlx,
        lambda: check_disk(settings),
    ]
