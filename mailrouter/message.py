"""RFC 5322 bytes → :class:`Email`: the one parsed view of a message every module uses.

:func:`parse_email` never raises: what cannot be parsed is listed in ``defects`` and whatever text
can be recovered is kept, so broken mail reaches triage instead of crashing the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Email:
    """A parsed message. ``body`` is the clean text a classifier reads."""

    raw_size: int
    content_hash: str  # sha256 hex of the raw bytes
    message_id: str = ""  # with angle brackets, as in the header; "" when missing
    sender: str = ""  # bare address, lower-cased
    sender_name: str = ""
    to: tuple[str, ...] = ()
    subject: str = ""  # RFC 2047 decoded
    date: datetime | None = None
    in_reply_to: str = ""
    references: tuple[str, ...] = ()
    body: str = ""  # text/plain, or HTML converted; quoted replies and signature stripped
    full_text: str = ""  # the same text before quote and signature stripping
    headers: tuple[tuple[str, str], ...] = ()  # (lower-cased name, decoded value), in order
    defects: tuple[str, ...] = field(default=())
    truncated: bool = False

    @property
    def sender_domain(self) -> str:
        return self.sender.rpartition("@")[2] if "@" in self.sender else ""

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), ``None`` when absent."""
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]


def parse_email(raw: bytes, *, max_bytes: int = 25 * 1024 * 1024) -> Email:
    """Parse ``raw``; never raises."""
    raise NotImplementedError
