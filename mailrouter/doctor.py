"""``mailrouter doctor``: every outside dependency checked, one line each, with the fix.

Each check is a function ``(settings) -> Check`` that never raises: a failure is a result that
names what to do. ``required`` tells what ``serve`` cannot run without (config, mailbox, SMTP,
the classifier) from what only training needs (Hugging Face, MLX, disk space).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

from .classify.ollama import OllamaClassifier, full_name
from .classify.openai import OpenAIClassifier, completion_steps, first_choice
from .config import Settings, hf_token, imap_password, load_settings
from .corrections.authentication import MISSING_ID, Detection, detect_authserv_id, trusted_ids
from .dataset import SPLITS, Dataset
from .errors import ClassifierError, ConfigError, MailRouterError, ModelMissingError
from .mail.imap import Mailbox, connect_imap
from .mail.smtp import SmtpSender
from .prediction import ClassifyInput
from .training import blas

# Publishing a 7B model writes its float16 GGUF (14.5 GB), Ollama's copy of it (14.5 GB) and the
# quantised version (4.4 GB); the local GGUF goes once uploaded, Ollama's copy once quantised
# (training/publish.py, create_from_gguf), so less is on disk at once.
TRAINING_DISK_GB = 35.0
LOGPROBS_VERSION = (0, 12, 11)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True
    optional_because: str = "needed for training only"

    def line(self) -> str:
        mark = "✓" if self.ok else "✗"
        text = f"{mark} {self.name}: {self.detail}"
        if not self.ok and self.fix:
            text += f" — fix: {self.fix}"
        if not self.ok and not self.required:
            text += f" ({self.optional_because})"
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
    try:  # huggingface_hub: ~150 ms and 300 modules, for this online check only
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
        fix = "check the network (offline: set HF_HUB_OFFLINE=1 with the model in the cache)"
        return Check("Hugging Face", False, f"{base}: {_error(exc)}", fix, required=False)
    return Check("Hugging Face", True, f"{base}: access granted ({token_text})", required=False)


_MLX_PROBE = "import mlx.core as mx; print(mx.__version__, mx.default_device().type.name)"


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
    where = (
        "the GPU (Metal)" if device == "gpu" else "the CPU (training a 7B model needs a Mac's GPU)"
    )
    return Check("MLX", True, f"mlx {version} on {where}", required=False)


def check_blas(environ: Mapping[str, str] = os.environ) -> Check:
    """The BLAS MLX will train with: on Linux, the wheel's reference BLAS makes training on the
    CPU about twice as slow as OpenBLAS, which the training child preloads when installed."""
    choice = blas.for_this_machine(environ)
    if choice.key == "reference" and blas.OPT_OUT[0] not in environ:
        fix = "sudo apt-get install libopenblas0-pthread"
        why = "training on the CPU runs about twice as slow without it"
        return Check("BLAS", False, f"MLX will use {choice.describe()}", fix, False, why)
    return Check("BLAS", True, f"MLX will use {choice.describe()}", required=False)


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


# --- mail servers ------------------------------------------------------------------------------

# What the router does without each capability (it still works).
CAPABILITIES = {
    "IDLE": "no IDLE: the mailbox is polled every mailbox.poll_seconds",
    "MOVE": "no MOVE: filing is COPY + delete + expunge",
    "UIDPLUS": "no UIDPLUS: expunging after a copy may also expunge mail others deleted",
}


def check_imap(settings: Settings) -> list[Check]:
    """Log in, open the watched folder, and report the capabilities the router uses."""
    box = _quick(settings, "mailbox").mailbox
    where = f"{box.username} at {box.host}:{box.port} ({box.security})"
    try:
        client = connect_imap(box, imap_password(settings))
    except MailRouterError as exc:
        fix = "check [mailbox] host, port and security" if "Auth" not in type(exc).__name__ else ""
        return [Check("IMAP", False, f"{where}: {_error(exc)}", fix)]
    try:
        caps = {c.decode().upper() for c in client.capabilities()}
        info = client.select_folder(box.folder, readonly=True)
    except Exception as exc:
        return [
            Check(
                "IMAP",
                False,
                f"{where}: cannot open {box.folder!r}: {type(exc).__name__}: {exc}",
                "check mailbox.folder",
            )
        ]
    finally:
        with contextlib.suppress(Exception):
            client.logout()
    count = int(info.get(b"EXISTS", 0))
    checks = [Check("IMAP", True, f"logged in as {where}; {box.folder} holds {count} message(s)")]
    missing = [name for name in CAPABILITIES if name not in caps]
    have = ", ".join(f"{name} {'yes' if name in caps else 'no'}" for name in CAPABILITIES)
    if missing:
        why = "; ".join(CAPABILITIES[name] for name in missing)
        checks.append(Check("IMAP capabilities", False, have, "", False, f"routing works: {why}"))
    else:
        checks.append(Check("IMAP capabilities", True, have))
    return checks


#: How many of the newest messages are read to find the receiving server's authserv-id.
AUTHSERV_SAMPLE = 20


def mailbox_authserv_id(settings: Settings, count: int = AUTHSERV_SAMPLE) -> Detection | None:
    """The authserv-id on top of most of the ``count`` newest messages of the watched folder.

    Only headers are read, with a short timeout and no retry; a mailbox that cannot be read
    raises :class:`MailRouterError` (``init`` then says nothing, ``doctor`` says why).
    """
    mailbox = Mailbox.from_settings(_quick(settings, "mailbox"), reconnect_attempts=0)
    try:
        return detect_authserv_id(mailbox.newest_headers(count))
    finally:
        mailbox.close()


def check_authserv_id(settings: Settings) -> Check:
    """Whether ``trusted_authserv_id`` names the server on top of the mail actually received."""
    configured = settings.corrections.trusted_authserv_id.strip()
    name = "authserv-id"
    why = "corrections wait for a confirmation by mail until it is right"
    try:
        found = mailbox_authserv_id(settings)
    except MailRouterError as exc:
        return Check(name, False, f"cannot read the newest messages: {_error(exc)}", "", False, why)
    folder = settings.mailbox.folder
    if found is None:
        detail = f"no Authentication-Results header in the newest messages of {folder}"
        if configured:
            detail += f" to compare with trusted_authserv_id {configured!r}"
        fix = "read the headers of a mail received from outside (docs/security.md)"
        return Check(name, False, detail, fix, False, why)
    shown = (
        "no authserv-id (Microsoft 365)" if found.authserv_id == MISSING_ID else found.authserv_id
    )
    seen = f"{shown} on top of {found.count} of the {found.total} newest messages"
    line = f"put `trusted_authserv_id = {json.dumps(found.authserv_id)}` in [corrections]"
    if found.authserv_id.lower() in trusted_ids(configured):
        return Check(name, True, f"{seen} in {folder}, as configured", required=False)
    if not configured:
        return Check(
            name, False, f"{seen}; corrections.trusted_authserv_id is empty", line, False, why
        )
    detail = f"{seen}, not the configured {configured!r}"
    return Check(name, False, detail, f"if it is your receiving server, {line}", False, why)


def check_smtp(settings: Settings, send_test: bool = False) -> Check:
    """Connect and log in; with ``send_test``, send one real message to the triage address."""
    quick = _quick(settings, "smtp")
    s = quick.smtp
    auth = f"as {s.username}" if s.username else "without AUTH"
    where = f"{s.host}:{s.port} ({s.security}, {auth})"
    sender: SmtpSender | None = None
    try:
        sender = SmtpSender.from_settings(quick)
        sender.connect()  # connect and log in, nothing sent
        if send_test:
            sender.send(_test_message(settings), s.triage_address)
    except MailRouterError as exc:
        fix = "" if "login" in str(exc) else "check [smtp] host, port and security"
        return Check("SMTP", False, f"{where}: {_error(exc)}", fix)
    finally:
        if sender is not None:
            with contextlib.suppress(Exception):
                sender.close()
    if send_test:
        return Check("SMTP", True, f"{where}: test message sent to {s.triage_address}")
    return Check("SMTP", True, f"{where}: login ok (add --send-test to send a test message)")


def _test_message(settings: Settings) -> bytes:
    msg = EmailMessage()
    msg["From"] = settings.smtp.from_address
    msg["To"] = settings.smtp.triage_address
    msg["Subject"] = "MailRouter : message de test / test message"
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain=settings.smtp.from_address.rpartition("@")[2] or None)
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-MailRouter-Version"] = "doctor"
    msg.set_content(
        "Ce message a été envoyé par `mailrouter doctor --send-test` : l'envoi fonctionne.\n\n"
        "This message was sent by `mailrouter doctor --send-test`: sending works.\n"
    )
    return msg.as_bytes()


# --- classifier and data ------------------------------------------------------------------------

DOCTOR_TIMEOUT = 10.0


def _quick(settings: Settings, section: str) -> Settings:
    """The settings with a short network timeout: doctor answers in seconds, not minutes."""
    sub = getattr(settings, section)
    timeout = min(sub.timeout_seconds, DOCTOR_TIMEOUT)
    return settings.model_copy(
        update={section: sub.model_copy(update={"timeout_seconds": timeout})}
    )


def check_ollama(settings: Settings) -> list[Check]:
    """Server reachable and its version, logprobs support, and the model it would classify with."""
    conf = settings.classifier
    required = conf.backend == "ollama"
    why = f"classifier.backend = {conf.backend!r}"
    classifier = OllamaClassifier(_quick(settings, "classifier"))
    try:
        info = classifier.start()
    except ClassifierError as exc:
        fix = "if it is not installed: https://ollama.com/download"
        return [Check("Ollama", False, _error(exc), fix, required, why)]
    checks = [Check("Ollama", True, f"version {info.version} at {classifier.host}", "", required)]
    if info.logprobs:
        checks.append(
            Check("Ollama logprobs", True, "supported: confidence from token probabilities")
        )
    else:
        checks.append(
            Check(
                "Ollama logprobs",
                False,
                f"Ollama {info.version} < 0.12.11 has none (no_logprobs = {conf.no_logprobs!r})",
                "upgrade Ollama to 0.12.11 or later",
                False,
                "routing still works, without confidence",
            )
        )
    try:
        chosen = classifier.resolve_model(force=True)
    except ModelMissingError as exc:
        checks.append(Check("model", False, _error(exc), "", required, why))
        return checks
    except ClassifierError as exc:
        checks.append(Check("model", False, _error(exc), "check the Ollama server", required, why))
        return checks
    if chosen == full_name(conf.model):
        checks.append(Check("model", True, f"{chosen} (fine-tuned) is present", "", required))
    else:
        checks.append(
            Check(
                "model",
                True,
                f"zero-shot {chosen} until {full_name(conf.model)} exists (`mailrouter train`)",
                "",
                required,
            )
        )
    return checks


#: What doctor asks a model for one token of: any email would do.
SAMPLE = ClassifyInput(text="Bonjour, ma facture de novembre est fausse.", subject="Facture")


def check_openai(settings: Settings) -> list[Check]:
    """The OpenAI-compatible server: reachable with the key, the model listed in ``/v1/models``,
    and a one-token completion of the real prompt that comes with log-probabilities."""
    conf = settings.classifier
    try:
        classifier = OpenAIClassifier(_quick(settings, "classifier"))
        listed = classifier.models()
    except (ClassifierError, ConfigError) as exc:
        return [Check("OpenAI server", False, _error(exc), "check classifier.openai_base_url")]
    where = classifier.base_url
    checks = [Check("OpenAI server", True, f"{where} lists {len(listed)} model(s)")]
    if classifier.model in listed:
        checks.append(Check("model", True, f"{classifier.model} is listed"))
    else:
        fix = "set classifier.openai_model to the model id the server lists"
        detail = f"{classifier.model} is not among {', '.join(listed) or 'none'}"
        checks.append(Check("model", False, detail, fix))
        return checks
    try:
        answer = classifier.complete(classifier.render(SAMPLE), 1)
    except ClassifierError as exc:
        checks.append(Check("OpenAI logprobs", False, _error(exc), "check the server's log"))
        return checks
    steps = completion_steps(first_choice(answer).get("logprobs"))
    if steps and steps[0].top:
        detail = f"{len(steps[0].top)} alternatives per token: confidence from probabilities"
        checks.append(Check("OpenAI logprobs", True, detail))
    else:
        detail = f"a completion came without logprobs (no_logprobs = {conf.no_logprobs!r})"
        fix = "use a server that returns logprobs for /v1/completions (vLLM, llama.cpp)"
        why = "routing still works, without confidence"
        checks.append(Check("OpenAI logprobs", False, detail, fix, False, why))
    return checks


def check_dataset(settings: Settings) -> list[Check]:
    """Examples per split and per label, and what would make training fail."""
    required = settings.classifier.backend == "baseline"
    why = "the baseline classifier and training need examples"
    path = settings.examples_path
    try:
        stats = Dataset.from_settings(settings).stats()
    except MailRouterError as exc:
        return [Check("dataset", False, _error(exc), f"repair or restore {path}", required, why)]
    if stats.total == 0:
        fix = "`mailrouter dataset import FILE`, or copy the starter data/examples.jsonl there"
        return [Check("dataset", False, f"no examples in {path}", fix, required, why)]
    splits = ", ".join(f"{s} {stats.split_total(s)}" for s in SPLITS)
    labels = ", ".join(
        f"{label} " + "/".join(str(stats.counts[label].get(s, 0)) for s in SPLITS)
        for label in stats.labels
    )
    checks = [
        Check("dataset", True, f"{stats.total} examples ({splits})", required=required),
        Check("dataset labels", True, f"train/valid/test: {labels}", required=required),
    ]
    for warning in stats.warnings(settings.departments, settings.training.batch_size):
        checks.append(
            Check("dataset", False, warning, "add examples (`mailrouter dataset add`)", False)
        )
    return checks


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
    for check in _checks(settings, send_test):
        for result in check():
            add(result)
    return results


def _checks(settings: Settings, send_test: bool) -> list[Callable[[], list[Check]]]:
    return [
        lambda: check_imap(settings),
        lambda: [check_authserv_id(settings)],
        lambda: [check_smtp(settings, send_test)],
        lambda: check_ollama(settings),
        lambda: check_openai(settings) if settings.classifier.backend == "openai" else [],
        lambda: [check_hf(settings)],
        lambda: [check_mlx()],
        lambda: [check_blas()],
        lambda: [check_disk(settings)],
        lambda: check_dataset(settings),
    ]
