"""What the IMAP and SMTP adapters share: the TLS context and the plain-text guard.

TLS is verified against the system's CAs (plus ``ca_file`` when given); a connection without TLS
is allowed only towards the loopback interface, unless the configuration says ``allow_insecure``.
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

from ..errors import ConfigError


def is_loopback(host: str) -> bool:
    if host.lower() in {"localhost", "localhost.localdomain"}:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_plaintext(host: str, security: str, allow_insecure: bool, section: str) -> None:
    """Refuse ``security = "none"`` towards another machine unless explicitly allowed."""
    if security == "none" and not allow_insecure and not is_loopback(host):
        raise ConfigError(
            f'{section}.security = "none" sends the password in clear to {host}: use "tls" or '
            f'"starttls", or set {section}.allow_insecure = true on a trusted network'
        )


def tls_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """A verifying client context: certificates and host names are checked."""
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"ca_file {ca_file}: cannot be loaded: {exc}") from exc
