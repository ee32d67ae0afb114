"""The project's exception tree.

Every adapter converts the errors of the library it wraps (imapclient, smtplib, ollama, mlx) into
one of these at its boundary, with ``raise ... from exc``, so callers handle a handful of types and
every message tells the user how to fix the problem.
"""

from __future__ import annotations


class MailRouterError(Exception):
    """Base class: anything mailrouter raises on purpose."""

    exit_code = 1


class ConfigError(MailRouterError):
    """The config file or environment is invalid; the message names file, field and expectation."""

    exit_code = 2


class SecretMissingError(ConfigError):
    """A secret (password, token, key) is neither in the environment nor in the Keychain."""


class DataDirBusyError(MailRouterError):
    """Another process routes mail from the same data folder; the message names it."""

    exit_code = 75  # EX_TEMPFAIL: try again once the other process has stopped


class DatasetError(MailRouterError):
    """The dataset file is unreadable or an import source is malformed."""


class MailboxError(MailRouterError):
    """The IMAP server refused, dropped the connection or lacks something we need."""


class MailboxAuthError(MailboxError):
    """IMAP login failed: wrong user or password, or an app password is required."""


class SmtpError(MailRouterError):
    """Sending failed. ``permanent`` tells a 5xx (do not retry) from a 4xx or network error."""

    def __init__(self, message: str, *, permanent: bool = False, code: int | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.code = code


class ClassifierError(MailRouterError):
    """A classifier could not answer (server down, model missing, timeout)."""


class ModelMissingError(ClassifierError):
    """The configured model does not exist on the Ollama server; the message names the fix."""


class ClassifierRequestError(ClassifierError):
    """The classifier's server answered one request with an error: the server is up, so only
    the email of that request is affected (the others are asked and routed as usual)."""


class TrainingError(MailRouterError):
    """Training, evaluation or publishing of a candidate model failed."""
