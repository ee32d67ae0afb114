"""Secrets from the environment or the macOS Keychain, never from a file in the repository.

The Keychain is reached through ``keyring``; on machines without a usable backend the lookup
quietly returns ``None`` so the caller can raise a ``SecretMissingError`` that names both ways to
provide the value.
"""

from __future__ import annotations

import logging
import os

SERVICE = "mailrouter"

log = logging.getLogger(__name__)


def keychain_get(account: str) -> str | None:
    """Read ``account`` from the Keychain (service ``mailrouter``); ``None`` when absent."""
    if os.environ.get("MAILROUTER_NO_KEYRING"):
        return None
    try:  # keyring and its backends: ~100 ms, only when a secret is read (config imports us)
        import keyring
        from keyring.errors import KeyringError, NoKeyringError
    except ImportError:  # pragma: no cover - keyring is a dependency
        return None
    try:
        return keyring.get_password(SERVICE, account)
    except (NoKeyringError, KeyringError, RuntimeError) as exc:
        log.debug("keychain unavailable for %s: %s", account, type(exc).__name__)
        return None


def keychain_set(account: str, value: str) -> None:
    """Store a secret in the Keychain; used by ``mailrouter init``."""
    import keyring  # ~100 ms: see keychain_get

    keyring.set_password(SERVICE, account, value)


def mask(value: str | None) -> str:
    """What a secret looks like in output: whether it is set, never its content."""
    return "********" if value else "(not set)"
