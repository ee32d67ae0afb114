"""Settings: a TOML file, overridden by ``MAILROUTER_*`` environment variables, secrets from the
environment or the Keychain.

Precedence, highest first: environment (``MAILROUTER_SMTP__HOST``), the TOML file, the defaults
below. The file is ``--config``, else ``$MAILROUTER_CONFIG``, else ``config/mailrouter.toml``; with
none of them the defaults alone apply, which is enough for the commands that need no mailbox.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from unidecode import unidecode

from .errors import ConfigError, SecretMissingError
from .keychain import keychain_get
from .rules import Rule

DEFAULT_CONFIG = Path("config/mailrouter.toml")
ENV_CONFIG = "MAILROUTER_CONFIG"

Security = Literal["tls", "starttls", "none"]
Action = Literal["forward", "spam", "triage"]

_LABEL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Department(_Section):
    """A place mail can go. The ``name`` is the label the model answers with."""

    name: str
    address: str | None = None
    description: str = ""
    aliases: list[str] = Field(default_factory=list)
    action: Action = "forward"

    @model_validator(mode="after")
    def _check(self) -> Department:
        if not _LABEL_RE.match(self.name):
            raise ValueError(
                f"department name {self.name!r} must be one word of letters, digits, - or _ "
                "(it is the label the model answers with)"
            )
        if self.action == "forward" and not self.address:
            raise ValueError(f"department {self.name!r} forwards mail, so it needs an address")
        return self


def default_departments() -> list[Department]:
    """The tutorial's five departments, with example.com addresses until ``mailrouter init``."""
    return [
        Department(
            name="RH",
            address="rh@example.com",
            description=(
                "Candidatures, stages, alternance, suivi de recrutement, questions du personnel"
            ),
            aliases=["ressources humaines", "hr", "recrutement", "human resources"],
        ),
        Department(
            name="Support",
            address="support@example.com",
            description="Pannes, bugs, problemes d'utilisation, livraisons et commandes en cours",
            aliases=["sav", "technique", "assistance", "help"],
        ),
        Department(
            name="Commercial",
            address="commercial@example.com",
            description="Devis, tarifs, demandes de produits, partenariats, nouveaux clients",
            aliases=["ventes", "sales", "vente"],
        ),
        Department(
            name="Finance",
            address="finance@example.com",
            description="Factures, paiements, relances, remboursements, comptabilite",
            aliases=["compta", "comptabilite", "accounting", "facturation"],
        ),
        Department(
            name="SPAM",
            description="Publicite non sollicitee, hameconnage, arnaques, newsletters",
            aliases=["spam", "pub", "junk", "indesirable"],
            action="spam",
        ),
    ]


class MailboxSettings(_Section):
    host: str = "imap.example.com"
    port: int = 993
    security: Security = "tls"
    allow_insecure: bool = False
    ca_file: Path | None = None
    username: str = "contact@example.com"
    password: SecretStr | None = None
    folder: str = "INBOX"
    use_folders: bool = True
    routed_folder: str = "MailRouter/Routed"
    triage_folder: str = "MailRouter/Triage"
    spam_folder: str = "MailRouter/Spam"
    idle: bool = True
    idle_seconds: int = Field(default=540, ge=10, le=600)
    poll_seconds: int = Field(default=60, ge=1)
    timeout_seconds: float = Field(default=60, gt=0)
    max_message_bytes: int = Field(default=25 * 1024 * 1024, gt=0)
    batch_size: int = Field(default=50, ge=1)
    automated: Literal["ignore", "triage"] = "ignore"
    #: Forwards of one sender's mail per sliding hour; beyond, mail is filed for a person (0: off).
    max_forwards_per_sender_per_hour: int = Field(default=20, ge=0)
    backlog: Literal["all", "none"] = "all"


class SmtpSettings(_Section):
    host: str = "smtp.example.com"
    port: int = 587
    security: Security = "starttls"
    allow_insecure: bool = False
    ca_file: Path | None = None
    username: str = ""
    password: SecretStr | None = None
    from_address: str = "contact@example.com"
    triage_address: str = "accueil@example.com"
    timeout_seconds: float = Field(default=60, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    backoff_seconds: float = Field(default=2.0, ge=0)
    defer_seconds: float = Field(default=60.0, ge=0)


#: How the embedded baseline's model versions are named (``baseline@<data hash>``).
BASELINE_MODEL_PREFIX = "baseline@"


class ClassifierSettings(_Section):
    """``baseline_threshold`` applies to the embedded baseline's answers: its probabilities are
    spread over every department, so they run lower than an LLM's for the same certainty (at
    0.4 it routes about 80 % of the starter data's held-out mail, 93–96 % of it right)."""

    backend: Literal["ollama", "baseline", "mlx", "openai"] = "ollama"
    ollama_host: str = "http://127.0.0.1:11434"
    #: An OpenAI-compatible server (vLLM, llama.cpp's server): ``/v1/completions`` is under it.
    openai_base_url: str = "http://127.0.0.1:8000"
    #: The model id the server lists in ``/v1/models`` (empty: ``model``).
    openai_model: str = ""
    #: A bearer token the server asks for; else the Keychain's ``openai-api-key``, else none.
    openai_api_key: SecretStr | None = None
    #: A private CA for an ``https`` server (certificates and host names are always verified).
    openai_ca_file: Path | None = None
    #: The chat template the served model was trained with: empty (Mistral v0.3, as for Ollama
    #: without kept files), a built-in name (mistral, chatml, llama3, gemma) or a model folder
    #: (its chat template and tokenizer, e.g. a version's kept ``models/prompt/ollama-<digest>``).
    openai_template: str = ""
    model: str = "mailrouter:latest"
    zero_shot_model: str = "mistral"
    confidence_threshold: float = Field(default=0.6, ge=0, le=1)
    baseline_threshold: float = Field(default=0.4, ge=0, le=1)
    #: The precision each department's calibrated threshold aims at (see calibration.py).
    target_precision: float = Field(default=0.95, gt=0, le=1)
    strip_accents: bool = True
    #: The body is first cut to this many characters (start and end kept), before tokenizing.
    max_chars: int = Field(default=2000, ge=100)
    #: Every prompt, rendered with the model's chat template, fits in this many of its tokens
    #: (the email is cut to fit: prompt.build_prompt); Ollama's context (``num_ctx``) is sized
    #: from it.
    max_prompt_tokens: int = Field(default=400, ge=64)
    on_error: Literal["wait", "triage"] = "wait"
    no_logprobs: Literal["accept", "triage"] = "accept"
    timeout_seconds: float = Field(default=120, gt=0)
    keep_alive: str = "30m"
    num_predict: int = Field(default=8, ge=1)
    retry_seconds: float = Field(default=30, ge=0)
    concurrency: int = Field(default=4, ge=1, le=64)

    def threshold_for(self, model: str, calibrated: float | None = None) -> float:
        """The confidence below which an answer of ``model`` goes to triage: the threshold its
        model version calibrated for the department it names (``calibrated``, carried by the
        prediction), else the global one for that kind of model."""
        if calibrated is not None:
            return calibrated
        return (
            self.baseline_threshold
            if model.startswith(BASELINE_MODEL_PREFIX)
            else self.confidence_threshold
        )


#: The ``quantize`` values Ollama accepts at ``/api/create`` (it upper-cases them first):
#: ``ggml.ParseFileType``, ``fs/ggml/type.go`` line 57 in v0.13.0 (the same in v0.12.11); ``""``
#: publishes the float GGUF as it is.
OLLAMA_QUANTIZE = ("", "Q4_K_M", "Q4_K_S", "Q8_0", "F16", "F32")


class TrainingSettings(_Section):
    schedule: str = "0 2 * * *"
    misfire_grace_seconds: int = Field(default=12 * 3600, ge=0)
    base_model: str = "mlx-community/Mistral-7B-Instruct-v0.3-4bit"
    #: A commit (or tag) of a Hugging Face ``base_model``: what is downloaded; empty: the newest.
    base_revision: str = ""
    hf_token: SecretStr | None = None
    lora_rank: int = Field(default=8, ge=1)
    lora_scale: float = 20.0
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    lora_keys: list[str] = Field(default_factory=lambda: ["self_attn.q_proj", "self_attn.v_proj"])
    num_layers: int = Field(default=16, ge=-1)
    epochs: float = Field(default=3, gt=0)
    max_iters: int = Field(default=600, ge=1)
    learning_rate: float = Field(default=1e-5, gt=0)
    batch_size: int = Field(default=2, ge=1)
    mask_prompt: bool = True
    grad_checkpoint: bool = True
    seed: int = 0
    timeout_seconds: int = Field(default=4 * 3600, ge=10)
    quantize: str = "q4_K_M"
    keep_versions: int = Field(default=3, ge=1)
    min_accuracy_gain: float = 0.0
    min_baseline_gain: float = 0.0
    max_recall_drop: float = Field(default=0.10, ge=0, le=1)
    ollama_tolerance: float = Field(default=0.05, ge=0, le=1)
    publish: Literal["gguf"] = "gguf"
    max_seq_length: int = Field(default=2048, ge=64)
    val_batches: int = Field(default=25, ge=-1)
    nice: int = Field(default=10, ge=0, le=19)

    @field_validator("quantize")
    @classmethod
    def _ollama_quantize(cls, value: str) -> str:
        if value.upper() not in OLLAMA_QUANTIZE:
            raise ValueError(
                f"{value!r} is not a quantisation Ollama accepts at /api/create: one of "
                + ", ".join(q for q in OLLAMA_QUANTIZE if q)
                + ' (any case), or "" for the float model'
            )
        return value

    @field_validator("publish", mode="before")
    @classmethod
    def _no_adapter_route(cls, value: Any) -> Any:
        if value == "adapter":
            raise ValueError(
                '"adapter" was removed: Ollama cannot quantise a model created FROM an already '
                "quantised one (server/create.go, createModel) and newer releases no longer "
                'convert mlx-lm adapters; use "gguf" (the adapter merged into one GGUF)'
            )
        return value


class CorrectionsSettings(_Section):
    """Who may correct a route, and how a correction proves who wrote it (DESIGN §5).

    ``staff_domains`` match exactly (a subdomain only when listed). A correction applies at once
    when the topmost ``Authentication-Results`` of ``trusted_authserv_id`` shows it authentic;
    otherwise the claimed author is asked to confirm (``confirm_unauthenticated``) or it is
    refused. The caps bound what one sender, one domain and everyone together can do a day.
    """

    staff_domains: list[str] = Field(default_factory=lambda: ["example.com"])
    staff_addresses: list[str] = Field(default_factory=list)
    trusted_authserv_id: str = ""
    confirm_unauthenticated: bool = True
    confirm_days: int = Field(default=7, ge=1, le=60)
    reply_to: Literal["sender", "router"] = "sender"
    token_key: SecretStr | None = None
    daily_cap: int = Field(default=20, ge=0)
    daily_domain_cap: int = Field(default=60, ge=0)
    daily_total_cap: int = Field(default=100, ge=0)
    help_interval_seconds: int = Field(default=3600, ge=0)
    digest_schedule: str = "0 8 * * *"


class RoutingSettings(_Section):
    """``follow_threads``: a follow-up of a routed conversation goes where the conversation is."""

    follow_threads: bool = True


class LogSettings(_Section):
    """``max_bytes``/``backup_count``: the service rotates its own log file (launchd rotates
    nothing): at ``max_bytes`` it is renamed ``.1`` (``.2``…), ``backup_count`` are kept."""

    format: Literal["text", "json"] = "text"
    level: str = "INFO"
    file: Path | None = None
    max_bytes: int = Field(default=5_000_000, ge=10_000)
    backup_count: int = Field(default=5, ge=1, le=100)


def default_data_dir(platform: str, environ: Mapping[str, str], home: Path) -> Path:
    """Where the data folder lives when ``data_dir`` is not set: outside any checkout, so
    customer text is never committed by accident. macOS: ``~/Library/Application Support``;
    elsewhere the XDG rule (``$XDG_DATA_HOME`` when absolute, else ``~/.local/share``)."""
    if platform == "darwin":
        return home / "Library" / "Application Support" / "mailrouter"
    xdg = environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".local" / "share"
    return base / "mailrouter"


def _default_data_dir() -> Path:
    return default_data_dir(sys.platform, os.environ, Path.home())


class Settings(BaseSettings):
    """The whole configuration. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="MAILROUTER_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    data_dir: Path = Field(default_factory=_default_data_dir)
    mailbox: MailboxSettings = Field(default_factory=MailboxSettings)
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    classifier: ClassifierSettings = Field(default_factory=ClassifierSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    corrections: CorrectionsSettings = Field(default_factory=CorrectionsSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    departments: list[Department] = Field(default_factory=default_departments)
    rules: list[Rule] = Field(default_factory=list)

    # Where the values came from; not a setting.
    _source: Path | None = None

    @field_validator("data_dir")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _check_departments(self) -> Settings:
        if not self.departments:
            raise ValueError("at least one department is required")
        names = {d.name for d in self.departments}
        for rule in self.rules:
            if rule.department is not None and rule.department not in names:
                raise ValueError(
                    f"rule {rule.name!r}: department {rule.department!r} is not configured "
                    f"(one of {', '.join(sorted(names))})"
                )
        seen: dict[str, str] = {}
        for dep in self.departments:
            for word in [dep.name, *dep.aliases]:
                key = fold(word)
                if key in seen and seen[key] != dep.name:
                    raise ValueError(
                        f"{word!r} names both {seen[key]!r} and {dep.name!r}; "
                        "names and aliases must be unique"
                    )
                seen[key] = dep.name
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = settings_cls.model_config.get("toml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    # --- convenience -------------------------------------------------------------------------

    @property
    def source(self) -> Path | None:
        """The TOML file these settings were read from, if any."""
        return self._source

    @property
    def labels(self) -> list[str]:
        return [d.name for d in self.departments]

    def department(self, name: str) -> Department:
        for dep in self.departments:
            if dep.name == name:
                return dep
        raise KeyError(name)

    @property
    def examples_path(self) -> Path:
        return self.data_dir / "examples.jsonl"

    @property
    def state_path(self) -> Path:
        return self.data_dir / "state.db"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"


def fold(text: str) -> str:
    """Case- and accent-insensitive key for matching labels, aliases and commands."""
    return " ".join(unidecode(text).casefold().split())


def resolve_config_path(explicit: Path | str | None = None) -> Path | None:
    """``--config``, else ``$MAILROUTER_CONFIG``, else ``config/mailrouter.toml`` when it exists."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"{path}: no such configuration file (run `mailrouter init`)")
        return path
    env = os.environ.get(ENV_CONFIG)
    if env:
        path = Path(env)
        if not path.is_file():
            raise ConfigError(f"{path}: no such configuration file (named by ${ENV_CONFIG})")
        return path
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_settings(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Read the settings; every problem becomes one ``ConfigError`` naming file, field and fix."""
    path = resolve_config_path(config)
    where = str(path) if path else "defaults"
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        _refuse_exposed_secrets(path, data)

    class _FileSettings(Settings):
        model_config = {**Settings.model_config, "toml_file": path}

    try:
        settings = _FileSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, where)) from exc
    settings._source = path
    return settings


#: The fields of a config file that hold a secret.
SECRET_FIELDS = (
    ("mailbox", "password"),
    ("smtp", "password"),
    ("corrections", "token_key"),
    ("training", "hf_token"),
    ("classifier", "openai_api_key"),
)


def secrets_in(data: Mapping[str, Any]) -> list[str]:
    """The secret fields (``mailbox.password``…) that parsed config ``data`` sets."""
    found = []
    for section, name in SECRET_FIELDS:
        table = data.get(section)
        if isinstance(table, Mapping) and table.get(name):
            found.append(f"{section}.{name}")
    return found


def _refuse_exposed_secrets(path: Path, data: Mapping[str, Any]) -> None:
    """A config file that holds a secret must be private to its owner."""
    held = secrets_in(data)
    mode = path.stat().st_mode & 0o777
    if held and os.name == "posix" and mode & 0o077:
        raise ConfigError(
            f"{path} holds {', '.join(held)} and its group or others may read it (mode "
            f"{mode:o}): run `chmod 600 {path}`, or move the secrets to the environment or the "
            "Keychain"
        )


def _describe(exc: ValidationError, where: str) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        if err["type"] == "extra_forbidden":
            msg = "unknown field; `mailrouter config example` lists the valid ones"
        lines.append(f"{where}: {field}: {msg}{shown}")
    return "\n".join(lines)


def secret(settings_value: SecretStr | None, account: str, *, env: str, hint: str = "") -> str:
    """A secret from the settings (env or file), else the Keychain; raises with both fixes named."""
    if settings_value is not None and settings_value.get_secret_value():
        return settings_value.get_secret_value()
    found = keychain_get(account)
    if found:
        return found
    raise SecretMissingError(
        f"secret {account!r} is not set: export {env}=… or store it in the Keychain with "
        f"`keyring set mailrouter {account}`{hint}"
    )


def imap_password(settings: Settings) -> str:
    return secret(
        settings.mailbox.password,
        f"imap:{settings.mailbox.username}",
        env="MAILROUTER_MAILBOX__PASSWORD",
    )


def smtp_password(settings: Settings) -> str | None:
    """``None`` when SMTP needs no AUTH (empty username: a local relay)."""
    if not settings.smtp.username:
        return None
    return secret(
        settings.smtp.password,
        f"smtp:{settings.smtp.username}",
        env="MAILROUTER_SMTP__PASSWORD",
    )


def token_key(settings: Settings) -> bytes:
    """The HMAC key of correction tokens."""
    return secret(
        settings.corrections.token_key,
        "token-key",
        env="MAILROUTER_CORRECTIONS__TOKEN_KEY",
        hint=(
            "; make a new key with "
            '`python -c "import secrets; print(secrets.token_urlsafe(32))"` (a new key '
            "makes the links of forwards already sent invalid)"
        ),
    ).encode()


def check_serve_secrets(settings: Settings, *, dry_run: bool = False) -> None:
    """Every secret ``serve`` will need, before it touches the mailbox: the IMAP password, the
    token key, and the SMTP password when SMTP has a login. A dry run sends nothing, so it
    needs no SMTP password; it checks the token key, since the corrections it previews do."""
    imap_password(settings)
    token_key(settings)
    if not dry_run:
        smtp_password(settings)


def openai_api_key(settings: Settings) -> str | None:
    """The OpenAI-compatible server's bearer token, or ``None`` (a server without one)."""
    value = settings.classifier.openai_api_key
    if value is not None and value.get_secret_value():
        return value.get_secret_value()
    return keychain_get("openai-api-key")


def hf_token(settings: Settings) -> str | None:
    """The Hugging Face token, or ``None`` (public models need none)."""
    value = settings.training.hf_token
    if value is not None and value.get_secret_value():
        return value.get_secret_value()
    return os.environ.get("HF_TOKEN") or keychain_get("huggingface")


def masked_dump(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data, secrets shown as set / not set."""
    data = settings.model_dump(mode="json")

    def walk(node: Any, model: Any) -> None:
        if isinstance(node, dict) and isinstance(model, BaseModel):
            for key, value in node.items():
                attr = getattr(model, key, None)
                if isinstance(attr, SecretStr) or (
                    attr is None and key in {"password", "token_key", "hf_token", "openai_api_key"}
                ):
                    node[key] = "********" if attr else "(not set)"
                else:
                    walk(value, attr)
        elif isinstance(node, list) and isinstance(model, Sequence):
            for sub, submodel in zip(node, model, strict=False):
                walk(sub, submodel)

    walk(data, settings)
    return data
